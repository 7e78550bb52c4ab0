"""The separator engine, audio -> mask -> stems: the one path that train.py's validation, inference.py, evaluate.py,
bench.py and live.py all call.
1. the input is resampled to 8192 Hz and cut into 128-frame patches every 96 frames;
2. the U-Net predicts a mask per patch; overlapping patches are cross-faded into one mask;
3. that mask is interpolated onto an STFT of the *original* recording (its own rate and channels; above 4096 Hz,
   where the network sees nothing, it is extended by its mean over the top of the band); the inverse STFT gives
   the vocals, the accompaniment is what remains;
4. with shifts, steps 1-2 run on copies of the input delayed by fractions of a network hop, and their masks,
   realigned, are averaged before step 3.
It runs as a stream over blocks of any size: memory stays flat and the result does not depend on the blocks.
Offline, a sample is final once every patch that reaches it has been masked (about 12 s of look-ahead). With a
shorter look-ahead (live.py), patches lie on a finer grid and a frame's mask is the cross-fade of the patches that
had arrived when the input had run the look-ahead past it: the newest frames are masked from near a patch's end.
"""
import math

import numpy as np
import soxr
import torch

import data_generator as dg
from unet_model import amp_dtype, load_model
from utils import DataError, add_device_arg, choose_device

DEFAULT_CHECKPOINT = "checkpoints/best_model.pth"
DEFAULT_SHIFTS = 2  # copies on offset frame grids whose masks are averaged (see StreamingSeparator)
PATCH_HOP = 96  # frames between patches: a quarter overlap for the cross-fade (patches further apart separated
# worse; half overlap costs the network a third more time for the same quality on whole songs)
PATCHES_PER_CALL = 8  # patches (about 70 s) gathered per channel before the network runs: a stereo file makes one
# batch of 16, as fast per patch as larger ones on CPU; more would hold more of a long file in memory at once
FULL_BAND_BLOCK = 256  # full-rate STFT frames (about 16 s) separated together: few big tensor operations, flat memory
MASK_EXTENSION_BINS = 128  # above 4096 Hz the mask is the mean of its top 128 bins (3-4 kHz)
LIVE_HOP = 4  # frames between the patches of a live separator: a new mask every 0.375 s, within the CPU of a laptop
LIVE_SHIFTS = 1  # a live separator runs the network once: the CPU goes to a finer patch grid instead
LIVE_MARGIN = 0.2  # seconds of a live latency kept for the computation: the network's call, the CPU's other work
LIVE_FILL_SECONDS = 1.0  # a live patch reaching back before the stream holds the stream again once it has this much:
# a shorter loop is a buzz the network never heard (experiments/2026-12-06-live-separation.md)


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
    is silent, so that a voice panned hard to one side keeps its own mask. Mono or more than two channels: the
    masks as they are."""
    if masks.shape[0] != 2:
        return masks
    left, right = magnitude
    similarity = 2 * left * right / (left.square() + right.square()).clamp(min=1e-12)
    return masks + similarity * (masks.mean(dim=0, keepdim=True) - masks)


def oracle_mask_fn(target, mixture, hop=PATCH_HOP):
    """mask_fn that returns the ideal ratio mask of a known target, patch by patch on a `hop` grid.
    target, mixture: (channels, samples) at 8192 Hz, resampled as the separator resamples."""
    magnitudes = [dg.stft(torch.tensor(x)).abs() for x in (target, mixture)]  # a copy: x may be a read-only cache
    mask = Timeline(*magnitudes[0].shape[:-1])
    mask.append(dg.oracle_mask(*magnitudes))  # (channels, 512, frames), zeros outside

    def mask_fn(patches, first_patch):
        frames = mask.read(first_patch * hop, (first_patch + patches.shape[1] - 1) * hop + dg.PATCH_FRAMES)
        return dg.to_patches(frames, hop)
    return mask_fn


def load_mask_fn(path, cpu=False):
    """(mask_fn, checkpoint, one line describing the model) for a train.py checkpoint, on CUDA
    unless cpu is set or there is none. Raises CheckpointError."""
    device = choose_device(cpu)
    model, checkpoint = load_model(path, device, expected_spec=dg.SPEC_CONFIG)
    line = (f"model: {path} (n_channels={checkpoint['model_config']['n_channels']}, "
            f"target={checkpoint.get('target', 'vocals')}, epoch {checkpoint.get('epoch', '?')}, "
            f"validation SDR {checkpoint.get('best_val_sdr', float('nan')):.2f} dB) on {device}")
    return model_mask_fn(model, device), checkpoint, line


# -----------------------------------------------------------------------------
# the streaming separator

class Timeline:
    """The part of a signal still needed: data[..., i] is its value at index start + i of the recording's own grid
    (samples or frames); `end` is how far it has been received. It lives in a buffer with room to grow, so that
    appending a block costs the block, not the signal kept (a live stream appends a few milliseconds at a time)."""

    def __init__(self, *shape):
        self.buffer, self.first, self.start, self.length = torch.zeros(*shape, 0), 0, 0, 0

    @property
    def data(self):
        return self.buffer[..., self.first:self.first + self.length]

    @property
    def end(self):
        return self.start + self.length

    def _grow(self, n):
        """n more values, zeros, past the end (the buffer past the end has never been written)."""
        if self.first + self.length + n > self.buffer.shape[-1]:
            kept = self.data
            self.buffer = kept.new_zeros(*kept.shape[:-1], 2 * (self.length + n))
            self.buffer[..., :self.length] = kept
            self.first = 0
        self.length += n

    def add(self, values, at):
        """Add values (..., n) from index `at` on; parts before `start` (forgotten) are dropped."""
        cut = max(self.start - at, 0)
        values, offset = values[..., cut:], at + cut - self.start
        if offset + values.shape[-1] > self.length:
            self._grow(offset + values.shape[-1] - self.length)
        self.data[..., offset:offset + values.shape[-1]] += values

    def append(self, values):
        self._grow(values.shape[-1])
        self.data[..., self.length - values.shape[-1]:] = values

    def read(self, a, b):
        """Values a .. b-1 (none if b < a), zeros outside what was received (before the file's start, past its end)."""
        b = max(a, b)
        lo = max(a, self.start)
        hi = max(min(b, self.end), lo)
        return torch.nn.functional.pad(self.data[..., lo - self.start:hi - self.start], (lo - a, b - hi))

    def forget_before(self, index):
        index = min(index, self.end)  # what was not received cannot go: later values keep their place
        if index > self.start:
            self.first, self.length, self.start = self.first + index - self.start, self.end - index, index


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
    """The 8192 Hz mask of one copy of a recording fed in blocks at 8192 Hz, delayed by `delay` samples (silence in
    front, for shifts). Patch p covers frames p * hop .. p * hop + 127 and is masked once its samples have arrived
    (offline in groups of PATCHES_PER_CALL); `fading` (OverlapAdd) cross-fades the patch masks until a frame is
    final, when it moves to `mask` (Timeline, (channels, 512, frames)) on the copy's frame grid.
    Offline (lookahead None) a frame is final when no later patch reaches it. With a look-ahead of L samples, frame
    j is final once the input reaches j * 768 + L, and its mask is the cross-fade of the patches whose samples end
    by then, whatever the blocks; the first patches start before the recording (in silence) where that is needed
    to give its first frames a mask in time."""

    def __init__(self, channels, mask_fn, delay=0, hop=PATCH_HOP, lookahead=None):
        self.mask_fn, self.delay, self.hop, self.lookahead, self.done = mask_fn, delay, hop, lookahead, False
        self.low = Timeline(channels)  # the 8192 Hz copy, kept until no later patch reads it
        self.fading, self.mask = OverlapAdd(channels, dg.N_BINS), Timeline(channels, dg.N_BINS)
        first_end = patch_samples(0, 1, hop)[1]
        self.next_patch = 0 if lookahead is None else min(0, (lookahead - first_end) // (hop * dg.HOP_LENGTH))
        self.feed(torch.zeros(channels, delay))

    def feed(self, block, last=False):
        """block: (channels, samples) float32 tensor at 8192 Hz; last: the input ends with it."""
        self.low.append(block)
        self.done = last
        while (count := self._patches_ready()) > 0:
            self._predict(self.next_patch, count)
        self.mask.append(self.fading.take(self._final_frames()))

    def _final_frames(self):
        """How many frames from the recording's start have their final mask."""
        if self.done:
            return dg.n_frames(self.low.end)
        if self.lookahead is None:
            return self.next_patch * self.hop
        return max(self.next_patch * self.hop, (self.low.end - self.lookahead) // dg.HOP_LENGTH + 1)

    def _patches_ready(self):
        """How many patches from next_patch on to mask now: offline a full group (or the rest at the end); with a
        look-ahead, every patch whose samples have arrived, a group at most and never across a group's border
        (groups share what fills patches past the end, see _predict)."""
        room = PATCHES_PER_CALL - self.next_patch % PATCHES_PER_CALL
        if self.done:
            return min(room, dg.n_patches(dg.n_frames(self.low.end), self.hop) - self.next_patch)
        if self.lookahead is None:
            return room if patch_samples(self.next_patch, room, self.hop)[1] <= self.low.end else 0
        arrived = (self.low.end - patch_samples(0, 1, self.hop)[1]) // (self.hop * dg.HOP_LENGTH) + 1
        return max(0, min(room, arrived - self.next_patch))

    def _predict(self, first, count):
        start, end = patch_samples(first, count, self.hop)
        segment = self.low.read(start, end)
        if self.done and end > self.low.end:  # past the recording's end: its music again, not silence (dg.loop_to),
            # from the start of the patches' group: offline, that of the network call
            origin = max(0, patch_samples(first - first % PATCHES_PER_CALL, 1, self.hop)[0])
            music = self.low.read(origin, self.low.end)
            segment = torch.cat([segment[..., :self.low.end - start], dg.loop_to(music, end - self.low.end)], dim=-1)
        if start < -dg.N_FFT // 2:  # live, the first seconds: patches that start before the recording
            step = self.hop * dg.HOP_LENGTH
            patches = torch.stack([early_patch(segment[..., i * step:i * step + dg.PATCH_SAMPLES], start + i * step)
                                   for i in range(count)], dim=1)
        else:
            patches = dg.to_patches(dg.stft(segment, center=False).abs(), self.hop)  # (channels, count, 512, 128)
        window = dg.patch_window().expand(count, -1)
        if self.lookahead is not None:  # a frame takes no patch that ends after its deadline
            ends = torch.tensor([patch_samples(p, 1, self.hop)[1] for p in range(first, first + count)])
            earliest = -((self.lookahead - ends) // dg.HOP_LENGTH) - torch.arange(first, first + count) * self.hop
            window = window * (torch.arange(dg.PATCH_FRAMES) >= earliest[:, None])
        total, weight = dg.overlap_add(self.mask_fn(patches, first), self.hop, window)
        self.fading.add(total, weight, first * self.hop)
        self.next_patch = first + count
        group = self.next_patch - self.next_patch % PATCHES_PER_CALL
        self.low.forget_before(patch_samples(min(self.next_patch, group), 1, self.hop)[0])

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
    that out). State lives on grids fixed by the file's start, so the block sizes cannot change the result.
    hop, lookahead: the copies' patch grid and look-ahead (MaskStream); with a look-ahead, frames are separated
    as soon as they are ready rather than FULL_BAND_BLOCK at a time."""

    def __init__(self, rate, channels, mask_fns, delays=(0,), target="vocals", hop=PATCH_HOP, lookahead=None):
        self.rate, self.target, self.live, self.done = rate, target, lookahead is not None, False
        self.resampler = None if rate == dg.SAMPLE_RATE else soxr.ResampleStream(  # one for every copy
            rate, dg.SAMPLE_RATE, channels, dtype="float32", quality="HQ")
        self.copies = [MaskStream(channels, fn, delay, hop, lookahead) for fn, delay in zip(mask_fns, delays)]
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
            block = self.resampler.resample_chunk(np.ascontiguousarray(block.T), last=last).T  # soxr: samples first
        low = torch.from_numpy(np.ascontiguousarray(block))
        for copy in self.copies:
            copy.feed(low, last)

    def _run(self):
        """The stems' newly final samples, after separating every block of frames that is ready."""
        parts = [self._emit()]
        while self._separate_next_block():
            parts.append(self._emit())
        return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(2))

    def _frames_ready(self):
        """How many full-rate frames from the start have their samples and, in every copy, the two 8192 Hz mask
        frames around their centre."""
        ready = (self.mixture.end - self.n_fft // 2) // self.hop + 1
        for copy in self.copies:
            scale = dg.SAMPLE_RATE * self.hop / self.rate
            ready = min(ready, math.ceil(((copy.mask.end - 1) * dg.HOP_LENGTH - copy.delay) / scale) + 1)
            while ready > 0 and int(self._mask_position(copy, ready - 1)) + 2 > copy.mask.end:
                ready -= 1
        return ready

    def _separate_next_block(self):
        """Separate the next block of full-rate frames if its samples and masks have arrived (live: every ready one)."""
        first = self.next_frame
        last = min(first + FULL_BAND_BLOCK, self._n_frames() if self.done else self._frames_ready())
        if last <= first or not (self.done or self.live or last == first + FULL_BAND_BLOCK):
            return False
        start, end = first * self.hop - self.n_fft // 2, (last - 1) * self.hop + self.n_fft // 2
        frames = self.mixture.read(start, end).unfold(-1, self.n_fft, self.hop)  # (channels, frames, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # frames-major: each FFT reads contiguous memory
        estimate = self._full_band_mask(first, last) * spec
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


def early_patch(segment, start):
    """Magnitudes (channels, 512, 128) of a live patch's samples (channels, PATCH_SAMPLES) that start at sample
    `start` < 0 of the recording: once the patch holds LIVE_FILL_SECONDS of the recording, what comes before it is
    that music again and again, ending where the recording starts (as dg.loop_to fills the end offline): the network
    trained on patches full of music, and silence there cost it (experiments/2026-12-06-live-separation.md)."""
    music = segment[..., -start:]
    if start < -dg.N_FFT // 2 and music.shape[-1] >= LIVE_FILL_SECONDS * dg.SAMPLE_RATE:
        segment = torch.cat([dg.loop_to(music.flip(-1), -start).flip(-1), music], dim=-1)
    return dg.stft(segment, center=False).abs()


def patch_samples(first, count, hop=PATCH_HOP):
    """8192 Hz sample range [start, end) that patches first .. first+count-1 of a `hop` grid read."""
    start = first * hop * dg.HOP_LENGTH - dg.N_FFT // 2
    end = ((first + count - 1) * hop + dg.PATCH_FRAMES - 1) * dg.HOP_LENGTH + dg.N_FFT // 2
    return start, end


def full_band_stft_size(rate):
    """(n_fft, hop) of the STFT at the input's own rate: about the 125 ms window of the 8192 Hz analysis, at
    50 % overlap (the paper's 25 % reconstructs masked spectrograms worse; 75 % separated no better with
    trained masks, for twice the FFT work); the size is the nearest multiple of 4 with no prime factor above 5,
    for which FFTs are fast (at 44.1 kHz 5400, not 5512 = 2^3*13*53)."""
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


def shift_delays(shifts):
    """8192 Hz samples by which each of `shifts` copies is delayed: k / shifts of the network's
    hop (768 samples), k = 0 .. shifts - 1. (At 8192 Hz, so that the copies share one resampling.)"""
    return [round(k * dg.HOP_LENGTH / shifts) for k in range(shifts)]


def delayed(audio, samples):
    """audio (channels, n) with `samples` zeros in front."""
    return np.concatenate([np.zeros((audio.shape[0], samples), audio.dtype), audio], axis=1)


def make_separator(rate, channels, mask_fn, shifts=DEFAULT_SHIFTS, **options):
    """The StreamingSeparator of one recording with `shifts` copies of the input (shift_delays). mask_fn: one
    for every copy, or a list with one per copy (an oracle mask depends on the delay; a model's does not).
    options: target, and hop and lookahead of a live separator (live_options)."""
    mask_fns = list(mask_fn) if isinstance(mask_fn, (list, tuple)) else [mask_fn] * shifts
    return StreamingSeparator(rate, channels, mask_fns, shift_delays(len(mask_fns)), **options)


def separate(audio, rate, mask_fn, return_mask=False, shifts=DEFAULT_SHIFTS, **options):
    """Whole-array separation: audio (channels, samples) -> stems (2, channels, samples) float32, vocals then
    accompaniment, at the same rate; with return_mask, also the 8192 Hz mask (channels, 512, frames).
    options: as make_separator's."""
    separator = make_separator(rate, audio.shape[0], mask_fn, shifts, **options)
    parts = [separator.process(audio), separator.finish()]
    stems = np.stack([np.concatenate([p[i] for p in parts], axis=1) for i in range(2)])
    if not return_mask:
        return stems
    first_fn = mask_fn[0] if isinstance(mask_fn, (list, tuple)) else mask_fn
    return stems, predicted_mask(dg.resample(audio, rate, dg.SAMPLE_RATE), first_fn)


def live_options(latency, rate):
    """hop and lookahead (make_separator's options) under which every output sample is final `latency` seconds of
    input after it, less LIVE_MARGIN for the computation: the look-ahead left to the mask is what remains after
    the full-rate STFT's half window, the mask's interpolation between two frames and the resampler's delay (the
    copies' delays cancel). From about 12 s on it covers every patch of the offline grid, which then gives the
    offline separation. Raises DataError if the latency leaves the mask no patch in time."""
    n_fft, _ = full_band_stft_size(rate)
    fixed = dg.HOP_LENGTH + soxr_delay(rate) + 2  # 8192 Hz samples; 2 for rounding between the rates
    lookahead = math.floor((latency - LIVE_MARGIN - n_fft / 2 / rate) * dg.SAMPLE_RATE) - fixed
    if lookahead >= patch_samples(0, 1)[1]:
        return dict(hop=PATCH_HOP, lookahead=lookahead)
    if lookahead < dg.N_FFT // 2:  # not even the newest patch's last frame would be in time
        shortest = LIVE_MARGIN + n_fft / 2 / rate + (fixed + dg.N_FFT // 2) / dg.SAMPLE_RATE
        raise DataError(f"--latency {latency:g} s is too short at {rate} Hz: give at least {shortest:.2f} s")
    return dict(hop=min(LIVE_HOP, (lookahead - dg.N_FFT // 2) // dg.HOP_LENGTH + 1), lookahead=lookahead)


def soxr_delay(rate):
    """8192 Hz samples by which soxr's streaming resampler from `rate` holds back its output at most, measured on
    three seconds fed in small blocks."""
    if rate == dg.SAMPLE_RATE:
        return 0
    stream, block, out, held = soxr.ResampleStream(rate, dg.SAMPLE_RATE, 1, dtype="float32", quality="HQ"), 256, 0, 0
    for fed in range(block, 3 * rate, block):
        out += len(stream.resample_chunk(np.zeros((block, 1), np.float32)))
        held = max(held, math.ceil(fed * dg.SAMPLE_RATE / rate) - out)
    return held


def predicted_mask(low, mask_fn):
    """The mask of a whole 8192 Hz signal computed in one piece, for pictures (the separator computes the
    same mask in pieces; past the end of songs longer than one network call it repeats less of the song):
    low (channels, samples) -> (channels, 512, frames)."""
    low = torch.as_tensor(low)
    patches = dg.to_patches(dg.stft(dg.fill_patch_grid(low, PATCH_HOP)).abs(), PATCH_HOP)
    return dg.from_patches(mask_fn(patches, 0), PATCH_HOP, dg.n_frames(low.shape[-1]))


def separation_figure(mixture, mask, title=""):
    """Matplotlib figure of the mixture spectrogram, the predicted mask and the vocal spectrogram
    (mask x mixture) at 8192 Hz. mixture: (channels, samples); mask: (channels, 512, frames)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    magnitude = dg.stft(torch.as_tensor(mixture)).abs().mean(0).numpy()  # channels averaged for the picture
    frames = min(magnitude.shape[-1], mask.shape[-1])
    magnitude, mask = magnitude[:, :frames], torch.as_tensor(mask).mean(0).numpy()[:, :frames]
    db = lambda x: 20 * np.log10(x + 1e-5)  # noqa: E731
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


# -----------------------------------------------------------------------------
# the options of every script that separates

def add_model_args(parser):
    """--checkpoint and --cpu, for every script that runs a trained model."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained model from train.py")
    add_device_arg(parser)


def add_separator_args(parser):
    """The separator's options, shared by inference.py and evaluate.py (check_separator_args)."""
    parser.add_argument("--shifts", type=int, default=DEFAULT_SHIFTS, help="average the masks of this many "
                        "copies of the input whose frames fall 1/shifts of a hop apart (1: one pass, the fastest)")


def check_separator_args(args):
    """Raise DataError for separator options no separator can use."""
    if args.shifts < 1:
        raise DataError(f"--shifts must be at least 1, got {args.shifts}")
