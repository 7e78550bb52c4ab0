"""
Separate the vocals of songs with a trained U-Net.

    python inference.py --audio song.wav            # writes song_vocals.wav and song_accompaniment.wav
    python inference.py --audio a.mp3 b.flac albums/ --output-dir separated/
    python inference.py                             # the first test track of train.py's dataset

The one separator path of the project (audio -> mask -> stems), also used by train.py and evaluate.py:
1. the input is resampled to 8192 Hz and cut into 128-frame patches every 96 frames;
2. the U-Net predicts a mask per patch; overlapping patches are cross-faded into one mask;
3. that mask is interpolated onto an STFT of the *original* recording (its own rate and
   channels; above 4096 Hz, where the network sees nothing, it is extended by its mean over
   the top of the band); the inverse STFT gives the vocals, the accompaniment is what remains;
4. with --shifts, steps 1-2 run on copies of the input delayed by fractions of a network hop,
   and their masks, realigned, are averaged before step 3.
It runs as a stream over blocks of the file: memory stays flat for any duration, and the
result does not depend on the block size.
"""
import argparse
import collections
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

import data_generator as dg
from unet_model import CheckpointError, amp_dtype, load_model

DEFAULT_CHECKPOINT = "checkpoints/best_model.pth"
DEFAULT_SHIFTS = 2  # copies on offset frame grids whose masks are averaged (see StreamingSeparator)
PATCH_HOP = 96  # frames between patches: a quarter overlap for the cross-fade (RESULTS.md: patches further apart
# separated worse; half overlap costs the network a third more time for the same quality on whole songs)
PATCHES_PER_CALL = 8  # patches (about 70 s) gathered per channel before the network runs: a stereo file makes one
# batch of 16, as fast per patch as larger ones on CPU; more would hold more of a long file in memory at once
FULL_BAND_BLOCK = 256  # full-rate STFT frames (about 16 s) separated together: few big tensor operations, flat memory
WIENER_FRAMES = 64  # full-rate frames (about 4 s) that share the Wiener filter's statistics
MASK_EXTENSION_BINS = 128  # above 4096 Hz the mask is the mean of its top 128 bins (3-4 kHz)
READ_SECONDS = 30  # input block length; any value gives the same output
PLOT_SECONDS = 600  # --plot pictures the first 10 minutes


# -----------------------------------------------------------------------------
# mask sources: the U-Net, or the oracle mask for evaluation's reference rows

def model_mask_fn(model, device, batch_size=16):
    """mask_fn for the separator: magnitude patches (channels, n, 512, 128) and the index of the first -> masks
    of the same shape. Each patch is normalised as in training; batch_size patches per network call, mixed
    precision where the device has it; the two channels of a stereo recording are linked (link_channels)."""
    dtype = amp_dtype(device)

    @torch.inference_mode()
    def mask_fn(patches, first_patch):
        (normalised,) = dg.normalise(patches)
        flat = normalised.reshape(-1, 1, *patches.shape[-2:])
        masks = []
        for i in range(0, flat.shape[0], batch_size):
            x = flat[i:i + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                masks.append(model(x).float().cpu())
        return link_channels(torch.cat(masks).reshape(patches.shape), patches)
    return mask_fn


def link_channels(masks, magnitude):
    """Stereo masks (2, ...) pulled towards their mean wherever the two channels sound alike, by the similarity
    2|L||R| / (|L|^2 + |R|^2) of their magnitudes (same shape): 1 where both carry the same sound, e.g. a centred
    voice, whose two masks estimate one thing, so that their mean halves the network's error; 0 where one side
    is silent, so that a voice panned hard to one side keeps its own mask (RESULTS.md, section 0). Mono or more
    than two channels: the masks as they are."""
    if masks.shape[0] != 2:
        return masks
    left, right = magnitude
    similarity = 2 * left * right / (left.square() + right.square()).clamp(min=1e-12)
    return masks + similarity * (masks.mean(dim=0, keepdim=True) - masks)


def oracle_mask_fn(target, mixture):
    """mask_fn that returns the ideal ratio mask of a known target, patch by patch.
    target, mixture: (channels, samples) at 8192 Hz, resampled as the separator resamples."""
    magnitudes = (dg.stft(torch.tensor(x)).abs() for x in (target, mixture))  # a copy: x may be a read-only cache
    masks = dg.to_patches(dg.oracle_mask(*magnitudes), PATCH_HOP)  # (channels, n, 512, 128)

    def mask_fn(patches, first_patch):
        part = masks[:, first_patch:first_patch + patches.shape[1]]
        return torch.nn.functional.pad(part, (0, 0, 0, 0, 0, patches.shape[1] - part.shape[1]))
    return mask_fn


def load_mask_fn(path, cpu=False):
    """(mask_fn, checkpoint, one line describing the model) for a train.py checkpoint, on CUDA
    unless cpu is set or there is none. Raises CheckpointError."""
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    model, checkpoint = load_model(path, device, expected_spec=dg.SPEC_CONFIG)
    line = (f"model: {path} (n_channels={checkpoint['model_config']['n_channels']}, "
            f"target={checkpoint.get('target', 'vocals')}, epoch {checkpoint.get('epoch', '?')}, "
            f"validation SDR {checkpoint.get('best_val_sdr', float('nan')):.2f} dB) on {device}")
    return model_mask_fn(model, device), checkpoint, line


# -----------------------------------------------------------------------------
# the streaming separator

class Timeline:
    """The part of a signal still needed: data[..., i] is its value at index start + i of the
    recording's own grid (samples or frames); `end` is how far it has been received."""

    def __init__(self, *shape):
        self.data, self.start = torch.zeros(*shape, 0), 0

    @property
    def end(self):
        return self.start + self.data.shape[-1]

    def add(self, values, at):
        """Add values (..., n) from index `at` on; parts before `start` (forgotten) are dropped."""
        cut = max(self.start - at, 0)
        values, offset = values[..., cut:], at + cut - self.start
        grow = offset + values.shape[-1] - self.data.shape[-1]
        if grow > 0:
            self.data = torch.nn.functional.pad(self.data, (0, grow))
        self.data[..., offset:offset + values.shape[-1]] += values

    def append(self, values):
        self.data = torch.cat([self.data, values], dim=-1)

    def read(self, a, b):
        """Values a .. b-1 (none if b < a), zeros outside what was received (before the file's start, past its end)."""
        b = max(a, b)
        lo = max(a, self.start)
        hi = max(min(b, self.end), lo)
        return torch.nn.functional.pad(self.data[..., lo - self.start:hi - self.start], (lo - a, b - hi))

    def forget_before(self, index):
        index = min(index, self.end)  # what was not received cannot go: later values keep their place
        if index > self.start:
            self.data, self.start = self.data[..., index - self.start:], index


class OverlapAdd:
    """Weighted sums of overlapping pieces; sums / weights is final where no later piece reaches."""

    def __init__(self, *shape):
        self.sums, self.weights = Timeline(*shape), Timeline()

    def add(self, values, weights, at):
        self.sums.add(values, at)
        self.weights.add(weights, at)

    def take(self, until):
        """The weighted means from the first not yet taken to `until` (exclusive), now final."""
        start = self.sums.start
        final = self.sums.read(start, until) / self.weights.read(start, until).clamp(min=1e-8)
        self.sums.forget_before(until)
        self.weights.forget_before(until)
        return final


class MaskStream:
    """The 8192 Hz mask of one copy of a recording fed in blocks at 8192 Hz, delayed by `delay` samples
    (silence in front, for --shifts). The network masks each group of patches as soon as its samples have
    arrived; `fading` (OverlapAdd) cross-fades the patch masks until no later patch reaches a frame, which
    then moves to `mask` (Timeline, (channels, 512, frames)) on the copy's frame grid."""

    def __init__(self, channels, mask_fn, delay=0):
        self.mask_fn, self.delay, self.done = mask_fn, delay, False
        self.low = Timeline(channels)  # the 8192 Hz copy, kept until no later patch reads it
        self.next_patch, self.fading = 0, OverlapAdd(channels, dg.N_BINS)
        self.mask = Timeline(channels, dg.N_BINS)
        self.feed(torch.zeros(channels, delay))

    def feed(self, block, last=False):
        """block: (channels, samples) float32 tensor at 8192 Hz; last: the input ends with it."""
        self.low.append(block)
        self.done = last
        while (count := self._patches_ready()) > 0:
            self._predict(self.next_patch, count)
        self.mask.append(self.fading.take(dg.n_frames(self.low.end) if last else self.next_patch * PATCH_HOP))

    def _patches_ready(self):
        """How many patches from next_patch on to predict now (a full group, or the rest at the end)."""
        if self.done:
            return min(PATCHES_PER_CALL, dg.n_patches(dg.n_frames(self.low.end), PATCH_HOP) - self.next_patch)
        return PATCHES_PER_CALL if patch_samples(self.next_patch, PATCHES_PER_CALL)[1] <= self.low.end else 0

    def _predict(self, first, count):
        start, end = patch_samples(first, count)
        segment = self.low.read(start, end)
        if self.done and end > self.low.end:  # past the recording's end: its music again, not silence (dg.loop_to)
            music = segment[..., max(0, -start):self.low.end - start]
            segment = torch.cat([segment[..., :self.low.end - start], dg.loop_to(music, end - self.low.end)], dim=-1)
        magnitude = dg.stft(segment, center=False).abs()  # (channels, 512, frames of these patches)
        patches = dg.to_patches(magnitude, PATCH_HOP)  # (channels, count, 512, 128)
        total, weight = dg.overlap_add(self.mask_fn(patches, first), PATCH_HOP)
        self.fading.add(total, weight, first * PATCH_HOP)
        self.next_patch = first + count
        self.low.forget_before(patch_samples(self.next_patch, 1)[0])

    def take(self, position):
        """The mask interpolated linearly in time at fractional frames `position` (float64, rising)
        -> (channels, 512, len(position)); frames before the last position are then forgotten."""
        newest = self.mask.end - 1
        low = position.floor().long().clamp(max=newest)
        high = (low + 1).clamp(max=newest)
        weight = (position - low).clamp(0, 1).float()
        m = self.mask.data
        m = m[..., low - self.mask.start] * (1 - weight) + m[..., high - self.mask.start] * weight
        self.mask.forget_before(int(position[-1].floor()))  # later full-rate frames start there
        return m


class StreamingSeparator:
    """Separates one recording fed in blocks of any size: process(block (channels, samples)) and finish()
    return (vocals, accompaniment), each (channels, k) float32, the samples that became final; together
    exactly the input's length. mask_fns: one per copy of the input, delayed by `delays` samples at 8192 Hz.
    Each full-rate STFT frame of `mixture` is masked with the copies' mean mask at its centre (the network's
    frames overlap by only a quarter, so where they fall matters: copies a fraction of a hop apart average
    that out). State lives on grids fixed by the file's start, so the block sizes cannot change the result."""

    def __init__(self, rate, channels, mask_fns, delays=(0,), target="vocals", wiener=False):
        self.rate, self.target, self.wiener, self.done = rate, target, wiener, False
        self.resampler = None if rate == dg.SAMPLE_RATE else soxr.ResampleStream(  # one for every copy
            rate, dg.SAMPLE_RATE, channels, dtype="float32", quality="HQ")
        self.copies = [MaskStream(channels, fn, delay) for fn, delay in zip(mask_fns, delays)]
        self.n_fft, self.hop = full_band_stft_size(rate)
        self.window = torch.hann_window(self.n_fft)
        self.bins = frequency_interpolation(rate, self.n_fft)
        self.mixture = Timeline(channels)
        self.next_frame, self.vocals = 0, OverlapAdd(channels)

    def process(self, block):
        block = np.asarray(block, dtype=np.float32)  # often the transpose of a file's (samples, channels) block
        self.mixture.append(torch.from_numpy(block))  # one copy into the timeline, whatever the memory order
        self._feed_copies(block, last=False)
        return self._run()

    def finish(self):
        self.done = True
        self._feed_copies(np.zeros((self.mixture.data.shape[0], 0), np.float32), last=True)
        return self._run()

    def _feed_copies(self, block, last):
        """Resample a block (channels, samples) of the input to 8192 Hz once, for every copy."""
        if self.resampler is not None:
            block = self.resampler.resample_chunk(np.ascontiguousarray(block.T), last=last).T  # soxr: (samples, channels)
        low = torch.from_numpy(np.ascontiguousarray(block))
        for copy in self.copies:
            copy.feed(low, last)

    def _run(self):
        """The stems' newly final samples, after separating every block of frames that is ready."""
        parts = [self._emit()]
        while self._separate_next_block():
            parts.append(self._emit())
        return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(2))

    def _separate_next_block(self):
        """Separate the next block of full-rate frames if its samples and masks have arrived."""
        first, last = self.next_frame, self.next_frame + FULL_BAND_BLOCK
        if self.done:
            last = min(last, self._n_frames())
            if last <= first:
                return False
        elif ((last - 1) * self.hop + self.n_fft // 2 > self.mixture.end
              or any(int(self._mask_position(copy, last - 1)) + 2 > copy.mask.end for copy in self.copies)):
            return False
        start, end = first * self.hop - self.n_fft // 2, (last - 1) * self.hop + self.n_fft // 2
        frames = self.mixture.read(start, end).unfold(-1, self.n_fft, self.hop)  # (channels, frames, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # frames-major: each FFT reads contiguous memory
        mask = self._full_band_mask(first, last)
        if self.wiener:  # the Wiener statistics are per WIENER_FRAMES frames, on the file's grid
            estimate = torch.cat([wiener_filter(mask[:, i:i + WIENER_FRAMES], spec[:, i:i + WIENER_FRAMES])
                                  for i in range(0, last - first, WIENER_FRAMES)], dim=1)
        else:
            estimate = mask * spec
        if self.target == "accompaniment":  # the mask extracted the accompaniment
            estimate = spec - estimate
        frames = torch.fft.irfft(estimate, n=self.n_fft, dim=-1) * self.window  # (channels, frames, n_fft)
        weight = overlap_add_frames(self.window.square().expand(1, frames.shape[1], -1), self.hop)[0]
        self.vocals.add(overlap_add_frames(frames, self.hop), weight, start)
        self.next_frame = last
        return True

    def _n_frames(self):
        """Full-rate frames of the whole recording: the last one centred at or past its end, so that every sample
        lies between two frame centres, where the two windows' squares add up to at least a half."""
        return -(-self.mixture.end // self.hop) + 1

    def _mask_position(self, copy, frames):
        """Fractional frame of a copy's 8192 Hz mask at the centre of full-rate frames (an int or tensor)."""
        return (frames * self.hop * (dg.SAMPLE_RATE / self.rate) + copy.delay) / dg.HOP_LENGTH

    def _full_band_mask(self, first, last):
        """The copies' mean 8192 Hz mask, interpolated linearly onto full-rate frames first .. last-1 and
        their bins, above 4096 Hz its mean over the top of the band -> (channels, last - first, n_fft // 2 + 1)."""
        frames = torch.arange(first, last, dtype=torch.float64)
        m = sum(copy.take(self._mask_position(copy, frames)) for copy in self.copies) / len(self.copies)
        m = m.transpose(1, 2)  # (channels, frames, 512)
        bin_low, bin_high, bin_weight, n_above = self.bins
        inside = m[..., bin_low] * (1 - bin_weight) + m[..., bin_high] * bin_weight
        above = m[..., -MASK_EXTENSION_BINS:].mean(dim=-1, keepdim=True).expand(-1, -1, n_above)
        return torch.cat([inside, above], dim=-1)

    def _emit(self):
        """(vocals, accompaniment) of the samples no later frame reaches."""
        reached = self.next_frame * self.hop - self.n_fft // 2  # where the next frame begins
        finished = self.done and self.next_frame >= self._n_frames()
        final = self.mixture.end if finished else min(reached, self.mixture.end)
        start = self.vocals.sums.start
        vocals = self.vocals.take(final)
        accompaniment = self.mixture.read(start, final) - vocals
        self.mixture.forget_before(min(self.vocals.sums.start, reached))
        return vocals.numpy(), accompaniment.numpy()


def patch_samples(first, count):
    """8192 Hz sample range [start, end) that patches first .. first+count-1 read."""
    start = first * PATCH_HOP * dg.HOP_LENGTH - dg.N_FFT // 2
    end = ((first + count - 1) * PATCH_HOP + dg.PATCH_FRAMES - 1) * dg.HOP_LENGTH + dg.N_FFT // 2
    return start, end


def full_band_stft_size(rate):
    """(n_fft, hop) of the STFT at the input's own rate: about the 125 ms window of the 8192 Hz analysis, at
    50 % overlap (the paper's 25 % reconstructs masked spectrograms worse; 75 % separated no better with
    trained masks, for twice the FFT work: RESULTS.md); the size is the nearest multiple of 4 with no prime
    factor above 5, for which FFTs are fast (at 44.1 kHz 5400, not 5512 = 2^3*13*53)."""
    def is_5_smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    target = dg.N_FFT * rate / dg.SAMPLE_RATE
    n_fft = min((n for n in range(4, 2 * int(target) + 8, 4) if is_5_smooth(n)), key=lambda n: abs(n - target))
    return n_fft, n_fft // 2


def overlap_add_frames(frames, hop):
    """(channels, n, n_fft) frames `hop` apart, n_fft a multiple of hop -> their sum (channels,
    (n - 1) * hop + n_fft): a frame is n_fft // hop pieces of one hop, each added in place."""
    channels, n, n_fft = frames.shape
    pieces = frames.reshape(channels, n, n_fft // hop, hop)
    out = torch.zeros(channels, n - 1 + n_fft // hop, hop)
    for k in range(n_fft // hop):
        out[:, k:k + n] += pieces[:, :, k]
    return out.reshape(channels, -1)


def frequency_interpolation(rate, n_fft):
    """How each full-rate bin reads the 512-bin mask: (low_index, high_index, weight) for bins
    below 4096 Hz and the number of bins above, which take the extension value."""
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * rate / n_fft
    position = freqs / (dg.SAMPLE_RATE / dg.N_FFT)  # fractional index into the 512 bins
    inside = position <= dg.N_BINS - 1
    position = position[inside]
    low = position.floor().long()
    high = (low + 1).clamp(max=dg.N_BINS - 1)
    return low, high, (position - low).float(), int((~inside).sum())


def wiener_filter(mask, spec, eps=1e-10):
    """The masked source refined by one pass of the multichannel Wiener filter (as in open-unmix / norbert)
    over one block. The mask and its complement give each source a power spectral density v_j(f, t) and a
    spatial covariance R_j(f) from this block; the source is v_j R_j (sum_k v_k R_k)^-1 x, which uses where
    the voice sits between stereo speakers. mask: (channels, frames, bins) real; spec: the same, complex."""
    x = spec.permute(2, 1, 0).to(torch.complex128)  # (bins, frames, channels)
    psd, cov = [], []
    for y in (mask.permute(2, 1, 0) * x, (1 - mask.permute(2, 1, 0)) * x):
        v = y.abs().square().mean(dim=-1)  # (bins, frames)
        psd.append(v)
        cov.append(torch.einsum("ftc,ftd->fcd", y, y.conj()) / (v.sum(dim=1)[:, None, None] + eps))
    mix_cov = sum(v[..., None, None] * r[:, None] for v, r in zip(psd, cov))
    inverse = torch.linalg.inv(mix_cov + eps * torch.eye(spec.shape[0], dtype=torch.complex128))
    gain = psd[0][..., None, None] * (cov[0][:, None] @ inverse)
    return (gain @ x[..., None]).squeeze(-1).permute(2, 1, 0).to(spec.dtype)


def shift_delays(shifts):
    """8192 Hz samples by which each of `shifts` copies is delayed: k / shifts of the network's
    hop (768 samples), k = 0 .. shifts - 1. (At 8192 Hz, so that the copies share one resampling.)"""
    return [round(k * dg.HOP_LENGTH / shifts) for k in range(shifts)]


def delayed(audio, samples):
    """audio (channels, n) with `samples` zeros in front."""
    return np.concatenate([np.zeros((audio.shape[0], samples), audio.dtype), audio], axis=1)


def make_separator(rate, channels, mask_fn, shifts=DEFAULT_SHIFTS, **options):
    """The StreamingSeparator of one recording with `shifts` copies of the input (shift_delays). mask_fn: one
    for every copy, or a list with one per copy (an oracle mask depends on the delay; a model's does not)."""
    mask_fns = list(mask_fn) if isinstance(mask_fn, (list, tuple)) else [mask_fn] * shifts
    return StreamingSeparator(rate, channels, mask_fns, shift_delays(len(mask_fns)), **options)


def separate(audio, rate, mask_fn, target="vocals", return_mask=False, shifts=DEFAULT_SHIFTS, wiener=False):
    """Whole-array separation: audio (channels, samples) -> stems (2, channels, samples) float32, vocals then
    accompaniment, at the same rate; with return_mask, also the 8192 Hz mask (channels, 512, frames)."""
    separator = make_separator(rate, audio.shape[0], mask_fn, shifts, target=target, wiener=wiener)
    parts = [separator.process(audio), separator.finish()]
    stems = np.stack([np.concatenate([p[i] for p in parts], axis=1) for i in range(2)])
    if not return_mask:
        return stems
    first_fn = mask_fn[0] if isinstance(mask_fn, (list, tuple)) else mask_fn
    return stems, predicted_mask(dg.resample(audio, rate, dg.SAMPLE_RATE), first_fn)


def predicted_mask(low, mask_fn):
    """The mask of a whole 8192 Hz signal computed in one piece, for pictures (the separator computes the
    same mask in pieces; past the end of songs longer than one network call it repeats less of the song):
    low (channels, samples) -> (channels, 512, frames)."""
    low = torch.as_tensor(low)
    patches = dg.to_patches(dg.stft(dg.fill_patch_grid(low, PATCH_HOP)).abs(), PATCH_HOP)
    return dg.from_patches(mask_fn(patches, 0), PATCH_HOP, dg.n_frames(low.shape[-1]))


# -----------------------------------------------------------------------------
# files in, files out

def separate_file(path, outputs, mask_fn, fmt="wav", plot=None, **options):
    """Stream one audio file through the separator into its two stem files, outputs {'vocals': path,
    'accompaniment': path}: each is written to a temporary file beside it and renamed only once complete, so a
    failure never leaves a half-written stem or destroys an earlier one. plot: a PNG path for a picture of the
    first minutes. options: shifts, target, wiener. Returns the input's (rate, channels, frames)."""
    info = dg.check_audio_file(path)
    temporary = {stem: dg.partial_path(p) for stem, p in outputs.items()}
    try:
        separator = make_separator(info.samplerate, info.channels, mask_fn, **options)
        with contextlib.ExitStack() as stack:
            writers = {stem: stack.enter_context(sf.SoundFile(
                str(tmp), "w", info.samplerate, info.channels, format=fmt.upper(),
                subtype="FLOAT" if fmt == "wav" else "PCM_24")) for stem, tmp in temporary.items()}
            frames = stream_file(path, info, separator, writers)
        if plot:
            save_separation_plot(plot, path, mask_fn)
        for stem, tmp in temporary.items():
            os.replace(tmp, outputs[stem])
        return info.samplerate, info.channels, frames
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def stream_file(path, info, separator, writers):
    """Read the file block by block through the separator into the writers -> frames read; DataError if damaged.
    The stems are written by a second thread while the separator works on the next blocks: encoding and the
    transposing copies release the GIL and mostly run while a core would otherwise wait. At most two blocks' stems
    wait for it, so memory stays bounded, and a block that only gathers samples (its patches are not ready yet)
    does not wait for the large write before it. (Reading stays here: the decoder silences the process's stderr
    while it runs, which must not hide this thread's messages.)"""
    def write(stems):
        for stem, part in zip(dg.STEMS, stems):
            writers[stem].write(part.T if writers[stem].subtype == "FLOAT" else np.clip(part.T, -1, 1))

    frames, queued = 0, collections.deque()
    with dg.open_audio(path) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        while (block := dg.read_block(reader, path, READ_SECONDS * info.samplerate)).shape[0]:
            dg.check_audio_samples(path, block)
            frames += block.shape[0]
            queued.append(writer.submit(write, separator.process(block.T)))
            while len(queued) > 2:  # bounded memory; a failed write stops the file here
                queued.popleft().result()
        dg.check_audio_length(path, info, frames)
        queued.append(writer.submit(write, separator.finish()))
        for job in queued:
            job.result()
    return frames


def separation_figure(mixture, mask, title=""):
    """Matplotlib figure of the mixture spectrogram, the predicted mask and the vocal spectrogram
    (mask x mixture) at 8192 Hz. mixture: (channels, samples); mask: (channels, 512, frames)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    magnitude = dg.stft(torch.as_tensor(mixture)).abs().mean(0).numpy()  # channels averaged for the picture
    frames = min(magnitude.shape[-1], mask.shape[-1])
    magnitude, mask = magnitude[:, :frames], torch.as_tensor(mask).mean(0).numpy()[:, :frames]
    db = lambda x: 20 * np.log10(x + 1e-5)
    top = db(magnitude).max()
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True, constrained_layout=True)
    for ax, (image, name, cmap, low, high) in zip(axes, [
            (db(magnitude), "mixture (dB)", "magma", top - 80, top), (mask, "predicted mask", "viridis", 0, 1),
            (db(magnitude * mask), "vocals = mask x mixture (dB)", "magma", top - 80, top)]):
        fig.colorbar(ax.imshow(image, origin="lower", aspect="auto", cmap=cmap, vmin=low, vmax=high,
                               extent=(0, frames * dg.HOP_LENGTH / dg.SAMPLE_RATE, 0, dg.SAMPLE_RATE / 2),
                               interpolation="nearest"), ax=ax)
        ax.set(title=name, ylabel="Hz")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title)
    return fig


def save_separation_plot(path, audio_path, mask_fn):
    """separation_figure of the first minutes of an audio file as a PNG, written atomically."""
    import matplotlib.pyplot as plt
    with dg.open_audio(audio_path) as reader:
        low = dg.resample(dg.read_block(reader, audio_path, PLOT_SECONDS * reader.samplerate).T, reader.samplerate,
                          dg.SAMPLE_RATE)
    fig = separation_figure(low, predicted_mask(low, mask_fn), Path(audio_path).name)
    dg.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def expand_inputs(paths):
    """Files and folders (their audio files, sorted) -> list of Paths; folders must hold audio."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.suffix.lower() in dg.AUDIO_EXTENSIONS and not f.name.startswith("."))
            if not found:
                raise dg.DataError(f"{p}: folder holds no audio files ({', '.join(dg.AUDIO_EXTENSIONS)})")
            files.extend(found)
        else:
            files.append(p)
    return files


def output_paths(path, output_dir, template, fmt):
    """{'vocals': Path, 'accompaniment': Path} of one input; fields: {track} (name without suffix), {stem}, {ext}."""
    folder = Path(output_dir) if output_dir else Path(path).parent
    return {stem: folder / template.format(track=Path(path).stem, stem=stem, ext=fmt) for stem in dg.STEMS}


def check_outputs(outputs, inputs):
    """Refuse outputs that would overwrite an input or each other, or whose folder cannot be written."""
    paths = [Path(p) for p in outputs.values()]
    if len({p.resolve() for p in paths}) < len(paths):
        raise dg.DataError(f"--filename gives the same name to both stems ({paths[0]}); include {{stem}}")
    for p in paths:
        if p.resolve() in {Path(i).resolve() for i in inputs}:
            raise dg.DataError(f"{p}: output would overwrite an input file; change --output-dir or --filename")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise dg.DataError(f"{p.parent}: cannot create output folder ({e.strerror})") from None
        if not os.access(p.parent, os.W_OK):
            raise dg.DataError(f"{p.parent}: output folder is not writable")


# -----------------------------------------------------------------------------
# command line

def add_separator_args(parser):
    """The separator's options, shared by inference.py and evaluate.py (check_separator_args)."""
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--shifts", type=int, default=DEFAULT_SHIFTS, help="average the masks of this many "
                        "copies of the input whose frames fall 1/shifts of a hop apart (1: one pass, the fastest)")
    parser.add_argument("--wiener", action="store_true", help="refine the masks with a multichannel "
                        "Wiener filter (uses the stereo image)")


def check_separator_args(args):
    """Raise DataError for separator options no separator can use."""
    if args.shifts < 1:
        raise dg.DataError(f"--shifts must be at least 1, got {args.shifts}")


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
        "Separate vocals and accompaniment with a trained U-Net. Writes <track>_vocals.wav and "
        "<track>_accompaniment.wav beside each input (or in --output-dir) at its rate, channels and length."))
    parser.add_argument("--audio", nargs="+", default=None, metavar="PATH", help="audio files (wav, flac, ogg, "
                        "mp3, aiff) or folders of them; without it, the first test track of train.py's dataset")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained model from train.py")
    parser.add_argument("--output-dir", default=None, help="where the stems go (default: beside each input; "
                        "outputs/ for a dataset track)")
    parser.add_argument("--filename", default="{track}_{stem}.{ext}", help="output name; fields {track} {stem} {ext}")
    parser.add_argument("--format", default="wav", choices=["wav", "flac"], help="wav: 32-bit float; flac: 24-bit")
    parser.add_argument("--n-channels", type=int, default=None, help="accepted for compatibility with the "
                        "original scripts; the checkpoint already knows its width")
    add_separator_args(parser)
    parser.add_argument("--plot", action="store_true", help="also save <track>_mask.png: mixture spectrogram, "
                        "predicted mask and vocal spectrogram of the first 10 minutes")
    parser.add_argument("--musdb-root", default=None, help="dataset for the no --audio case (as in train.py)")
    parser.add_argument("--synthetic", action="store_true", help="no --audio: use the synthetic set's test song")
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as every error here
    args = parser.parse_args()
    try:
        check_separator_args(args)
        if "{track}" not in args.filename or "{stem}" not in args.filename:
            raise dg.DataError(f"--filename must contain {{track}} and {{stem}} (got {args.filename!r})")
        mask_fn, checkpoint, line = load_mask_fn(args.checkpoint, args.cpu)
        if args.n_channels not in (None, checkpoint["model_config"]["n_channels"]):
            print(f"warning: --n-channels {args.n_channels} ignored; the checkpoint knows its width", file=sys.stderr)
        print(line)
        options = dict(target=checkpoint.get("target", "vocals"), shifts=args.shifts, wiener=args.wiener)
        if args.audio is None:
            return separate_dataset_track(args, mask_fn, options)
        inputs = expand_inputs(args.audio)
    except (dg.DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    return separate_files(inputs, args, mask_fn, options)


def separate_files(inputs, args, mask_fn, options):
    """Separate each input; a bad file gets its error line on stderr and is skipped -> exit status, 1 if any failed."""
    from tqdm import tqdm
    failed, started = 0, time.time()
    for path in tqdm(inputs, desc="files", unit="file", disable=len(inputs) < 2):
        try:
            info = dg.check_audio_file(path)  # first, so that a bad input creates nothing
            outputs = output_paths(path, args.output_dir, args.filename, args.format)
            check_outputs(outputs, inputs)
            plot = outputs["vocals"].with_name(f"{Path(path).stem}_mask.png") if args.plot else None
            t0 = time.time()
            separate_file(path, outputs, mask_fn, args.format, plot=plot, **options)
            seconds, elapsed = info.frames / info.samplerate, time.time() - t0
            tqdm.write(f"{path}: {seconds:.1f} s, {info.samplerate} Hz, {info.channels} ch -> "
                       + ", ".join(map(str, [*outputs.values()] + ([plot] if plot else [])))
                       + f" ({elapsed:.1f} s, {seconds / elapsed:.0f}x real time)")
        except (dg.DataError, OSError) as e:
            failed += 1
            reason = e if isinstance(e, dg.DataError) else f"{path}: cannot write the stems ({e.strerror or e})"
            tqdm.write(f"error: {reason}", file=sys.stderr)
    if len(inputs) > 1:
        print(f"{len(inputs) - failed} of {len(inputs)} files separated in {time.time() - started:.1f} s"
              + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def separate_dataset_track(args, mask_fn, options):
    """The original behaviour: separate the first test track of train.py's dataset (the first validation track if
    there is none, as in the shared previews), write its mixture and stems to outputs/, score them against the truth."""
    from evaluate import global_sdr  # evaluate imports this module; at call time both are loaded
    source = dg.find_data_source(args.musdb_root, synthetic=args.synthetic)
    if source.kind == "synthetic":
        track = dg.load_tracks(source, "test", n_songs=1, progress=False)[0]
        stems = dict(mixture=track.mixture, vocals=track.vocals, accompaniment=track.accompaniment)
        name, rate = track.name, dg.SAMPLE_RATE
    else:
        tracks = dg.musdb_tracks(source, "test") or dg.musdb_tracks(source, "train", "valid")
        if not tracks:
            raise dg.DataError(f"{source.root}: no test or validation tracks")
        name, rate, stems = tracks[0].name, int(tracks[0].rate), dg.musdb_stems(tracks[0])
    print(f"no --audio given: separating {name} from the {source.describe()}")
    estimates = dict(zip(dg.STEMS, separate(stems["mixture"], rate, mask_fn, **options)), mixture=stems["mixture"])
    for stem, audio in estimates.items():
        path = Path(args.output_dir or "outputs") / dg.safe_name(f"{name}_{stem}.wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        dg.atomic_write(path, lambda tmp: sf.write(str(tmp), audio.T, rate, subtype="FLOAT", format="WAV"))
        print(f"  wrote {path}")
    for stem in dg.STEMS:
        print(f"  {stem}: SDR {global_sdr(stems[stem], estimates[stem]):.2f} dB over the whole track "
              f"(the mixture itself scores {global_sdr(stems[stem], stems['mixture']):.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
