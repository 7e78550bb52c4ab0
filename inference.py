"""
Separate the vocals of songs with a trained U-Net.

    python inference.py --audio song.wav            # writes song_vocals.wav and song_accompaniment.wav
    python inference.py --audio a.mp3 b.flac albums/ --output-dir separated/
    python inference.py                             # the first test track of train.py's dataset

This file holds the one separator path of the project (audio -> mask -> stems), which
train.py (validation), evaluate.py and bench.py import:
1. the input is resampled to 8192 Hz and cut into 128-frame patches on a fixed grid;
2. the U-Net predicts a mask per patch; overlapping patches are cross-faded into one mask;
3. that mask is interpolated onto a short-time Fourier transform of the *original* recording
   (its own rate and channels; above 4096 Hz, where the network sees nothing, the mask is
   extended), so the output keeps the full band; the inverse STFT gives the vocals, and the
   accompaniment is what remains;
4. by default all of this runs twice, the second time on the input delayed by half a network
   hop, and the two realigned results are averaged (--shifts).
Everything runs as a stream over blocks of the file, so memory stays flat for any duration and
the result does not depend on the block size.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

import data_generator as dg
from unet_model import CheckpointError, amp_dtype, load_model

DEFAULT_CHECKPOINT = "checkpoints/best_model.pth"
READ_SECONDS = 30  # input block length; any value gives the same output
PLOT_SECONDS = 600  # --plot pictures the first 10 minutes
FULL_BAND_BLOCK = 128  # full-rate STFT frames processed together (Wiener statistics are per block)
MASK_EXTENSION_BINS = 128  # 'mean' extension: above 4096 Hz, the mean of the top 128 bins (3-4 kHz)
EXTENSIONS = ("mean", "edge", "zero")
MASK_CHANNELS = ("each", "mid")
DEFAULT_SHIFTS = 2  # copies on offset frame grids whose stems are averaged (measured: README, results)


# -----------------------------------------------------------------------------
# the full-rate STFT on which the mask is applied

def full_band_stft_size(rate):
    """(n_fft, hop) of the STFT applied at the input's own rate: about the 125 ms window of the
    8192 Hz analysis, with 75 % overlap, which reconstructs masked spectrograms better than the
    paper's 25 % (IRM vocals SDR 8.72 dB against 8.57 dB on the MUSDB18 previews). The size is
    the nearest multiple of 4 with no prime factor above 5: at 44.1 kHz 5400 rather than 5512
    (= 2^3 * 13 * 53), which makes the FFTs 1.5x faster."""
    target = dg.N_FFT * rate / dg.SAMPLE_RATE
    n_fft = min((n for n in range(4, 2 * int(target) + 8, 4) if is_5_smooth(n)), key=lambda n: abs(n - target))
    return n_fft, n_fft // 4


def is_5_smooth(n):
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


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


# -----------------------------------------------------------------------------
# mask sources: the U-Net, or the oracle mask for evaluation's reference rows

def model_mask_fn(model, device, batch_size=16, amp=True, exponent=1.0):
    """mask_fn for StreamingSeparator: normalised patches (channels, n, 512, 128) -> masks.
    amp: mixed precision where the device runs it natively (see unet_model.amp_dtype).
    exponent: the masks are raised to this power (train.py fits it on the validation songs and
    stores it in the checkpoint as mask_exponent; see checkpoint_mask_exponent)."""
    dtype = amp_dtype(device, amp)

    @torch.inference_mode()
    def mask_fn(patches, first_patch):
        flat = patches.reshape(-1, 1, *patches.shape[-2:])
        masks = []
        for i in range(0, flat.shape[0], batch_size):
            x = flat[i:i + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                masks.append(model(x).float().cpu())
        masks = torch.cat(masks).reshape(patches.shape)
        return masks if exponent == 1.0 else masks.pow(exponent)
    return mask_fn


def checkpoint_mask_exponent(checkpoint, override=None):
    """The exponent the model's masks are raised to: `override` if given, else the one train.py
    fitted on the validation songs (checkpoints without one: 1, the masks as predicted). The
    L1 loss makes the network's masks cautious where it is unsure, as a median is; the
    signal-to-distortion ratio prefers fuller masks, and an exponent below 1 gives them
    (README, results)."""
    return float(override) if override is not None else float(checkpoint.get("mask_exponent", 1.0))


def oracle_mask_fn(target, mixture, overlap=0.5):
    """mask_fn that returns the ideal ratio mask of a known target, patch by patch.
    target, mixture: (channels, samples) at 8192 Hz, resampled as the separator resamples."""
    hop = dg.patch_hop(overlap)
    target_mag = dg.stft(torch.as_tensor(target)).abs()
    mixture_mag = dg.stft(torch.as_tensor(mixture)).abs()
    masks = dg.to_patches(dg.oracle_mask(target_mag, mixture_mag), hop)  # (channels, n, 512, 128)

    def mask_fn(patches, first_patch):
        out = torch.zeros_like(patches)
        part = masks[:, first_patch:first_patch + patches.shape[1]]
        out[:, :part.shape[1]] = part
        return out
    return mask_fn


# -----------------------------------------------------------------------------
# the streaming separator

class StreamingSeparator:
    """Separates one recording fed in blocks of any size.

    rate, channels: of the input. mask_fn: normalised patches (channels, n, 512, 128) -> masks.
    target: what the mask extracts ('vocals' or 'accompaniment').
    mask_channels: 'each' predicts a mask per input channel; 'mid' one mask from the channels'
    mean, applied to every channel (half the network time for stereo).
    process(block (channels, samples)) and finish() return (vocals, accompaniment), each
    (channels, k) float32: the samples that became final. Their concatenation has exactly the
    input's length. Every stage works on a grid fixed by the file's start (patches every `hop`
    frames, full-rate frames every hop_f samples), so block sizes do not change the result.
    """

    def __init__(self, rate, channels, mask_fn, target="vocals", overlap=0.5, batch_size=16,
                 wiener=False, accompaniment="residual", extension="mean", mask_channels="each",
                 record_seconds=0):
        if extension not in EXTENSIONS:
            raise ValueError(f"extension must be one of {EXTENSIONS}, got {extension!r}")
        self.rate, self.channels, self.mask_fn, self.extension = rate, channels, mask_fn, extension
        self.mid = mask_channels == "mid"
        low_channels = 1 if self.mid else channels  # channels of the 8192 Hz signal and of the mask
        self.target, self.wiener, self.accompaniment = target, wiener, accompaniment
        self.patch_hop = dg.patch_hop(overlap)
        self.batch_size = batch_size
        self.resampler = None if rate == dg.SAMPLE_RATE else soxr.ResampleStream(
            rate, dg.SAMPLE_RATE, low_channels, dtype="float32", quality="HQ")
        self.done = False
        # 8192 Hz signal: buffer, global index of its first sample, samples received
        self.low = torch.zeros(low_channels, 0)
        self.low_start = self.low_total = 0
        self.next_patch = 0
        # cross-faded masks: running sums from frame acc_start; final masks from mask_start
        self.acc = torch.zeros(low_channels, dg.N_BINS, 0)
        self.acc_weight = torch.zeros(0)
        self.acc_start = 0
        self.mask = torch.zeros(low_channels, dg.N_BINS, 0)
        self.mask_start = 0
        self.mask_total = None  # frames of mask once the input has ended
        # full-rate signal and STFT
        self.n_fft, self.hop = full_band_stft_size(rate)
        self.window = torch.hann_window(self.n_fft)
        self.window_sums = {}  # frames per block -> overlap-added squared window
        self.interp = frequency_interpolation(rate, self.n_fft)
        self.high = torch.zeros(channels, 0)
        self.high_start = self.high_total = 0
        self.next_frame = 0
        self.out = torch.zeros(2 if accompaniment == "complement" else 1, channels, 0)
        self.out_weight = torch.zeros(0)
        self.out_start = 0  # global index of out[..., 0]; everything before was emitted
        # for pictures: the first record_seconds of the 8192 Hz mixture and of the mask
        self.record_samples = int(record_seconds * dg.SAMPLE_RATE)
        self.recorded_low, self.recorded_mask = [], []

    # -- public ---------------------------------------------------------------
    def process(self, block):
        block = np.ascontiguousarray(block, dtype=np.float32)
        self.high = torch.cat([self.high, torch.from_numpy(block)], dim=1)
        self.high_total += block.shape[1]
        if self.mid:
            block = block.mean(axis=0, keepdims=True)
        low = block if self.resampler is None else self.resampler.resample_chunk(block.T).T
        self._add_low(low)
        return self._run()

    def finish(self):
        if self.resampler is not None:
            self._add_low(self.resampler.resample_chunk(np.zeros((0, self.low.shape[0]), np.float32), last=True).T)
        self.done = True
        return self._run()

    # -- stages ---------------------------------------------------------------
    def _add_low(self, low):
        low = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))
        if self.low_total < self.record_samples:
            self.recorded_low.append(low[:, :self.record_samples - self.low_total].clone())
        self.low = torch.cat([self.low, low], dim=1)
        self.low_total += low.shape[1]

    def recording(self):
        """(mixture (channels, samples) at 8192 Hz, mask (channels, 512, frames)) recorded so far."""
        low = torch.cat(self.recorded_low, dim=1) if self.recorded_low else torch.zeros(self.low.shape[0], 0)
        mask = torch.cat(self.recorded_mask, dim=-1) if self.recorded_mask else torch.zeros(self.low.shape[0], dg.N_BINS, 0)
        return low, mask[..., :dg.n_frames(low.shape[1])]

    def _run(self):
        self._run_patches()
        parts = self._run_full_band() or [self._emit()]
        return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(2))

    def _patch_samples(self, first, count):
        """8192 Hz sample range [start, end) that patches first .. first+count-1 read."""
        start = first * self.patch_hop * dg.HOP_LENGTH - dg.N_FFT // 2
        end = ((first + count - 1) * self.patch_hop + dg.PATCH_FRAMES - 1) * dg.HOP_LENGTH + dg.N_FFT // 2
        return start, end

    def _run_patches(self):
        while True:
            if self.done:
                total = dg.n_patches(dg.n_frames(self.low_total), self.patch_hop)
                count = min(self.batch_size, total - self.next_patch)
                if count <= 0:
                    break
            else:  # wait for a full batch: big batches keep the network fast
                count = self.batch_size
                if self._patch_samples(self.next_patch, count)[1] > self.low_total:
                    break
            self._predict_patches(self.next_patch, count)
        if self.done:
            self.mask_total = dg.n_frames(self.low_total)
        self._finalise_mask()

    def _predict_patches(self, first, count):
        start, end = self._patch_samples(first, count)
        segment = slice_padded(self.low, start - self.low_start, end - self.low_start, self.low_total - self.low_start)
        magnitude = dg.stft(segment, center=False).abs()  # (channels, 512, frames of these patches)
        patches = dg.to_patches(magnitude, self.patch_hop)  # (channels, count, 512, 128)
        (normalised,) = dg.normalise(patches)
        total, weight = dg.overlap_add(self.mask_fn(normalised, first), self.patch_hop)
        offset = first * self.patch_hop - self.acc_start
        grow = offset + total.shape[-1] - self.acc.shape[-1]
        if grow > 0:
            self.acc = torch.nn.functional.pad(self.acc, (0, grow))
            self.acc_weight = torch.nn.functional.pad(self.acc_weight, (0, grow))
        self.acc[..., offset:offset + total.shape[-1]] += total
        self.acc_weight[offset:offset + total.shape[-1]] += weight
        self.next_patch = first + count
        # 8192 Hz samples before the next patch are no longer needed
        keep = self._patch_samples(self.next_patch, 1)[0] - self.low_start
        if keep > 0:
            self.low = self.low[:, keep:]
            self.low_start += keep

    def _finalise_mask(self):
        """Move frames no future patch touches from the running sums to the final mask."""
        final = self.next_patch * self.patch_hop if not self.done else self.acc_start + self.acc.shape[-1]
        if self.mask_total is not None:
            final = min(final, self.mask_total)
        n = final - self.acc_start
        if n <= 0:
            return
        final_mask = self.acc[..., :n] / self.acc_weight[:n]
        self.mask = torch.cat([self.mask, final_mask], dim=-1)
        if self.acc_start * dg.HOP_LENGTH < self.record_samples:
            self.recorded_mask.append(final_mask.clone())
        self.acc, self.acc_weight = self.acc[..., n:], self.acc_weight[n:]
        self.acc_start = final
        if self.mask_total is not None:  # drop the zero-padded frames past the end
            self.acc = self.acc[..., :0]

    def _mask_position(self, frames):
        """Fractional 8192 Hz mask frame at the centre of full-rate frames (a tensor)."""
        return frames.double() * self.hop * dg.SAMPLE_RATE / (self.rate * dg.HOP_LENGTH)

    def _run_full_band(self):
        """Separate every full-rate block that has its samples and mask; emit after each one,
        which keeps the output sums as short as a block. Returns the emitted parts."""
        parts = []
        mask_end = self.mask_start + self.mask.shape[-1]
        total_frames = self.high_total // self.hop + 1 if self.done else None
        while True:
            first = self.next_frame
            last = first + FULL_BAND_BLOCK  # exclusive; blocks sit on a fixed grid of frames
            if total_frames is not None:
                last = min(last, total_frames)
                if last <= first:
                    break
            else:
                needs_samples = (last - 1) * self.hop + self.n_fft // 2
                needs_mask = int(self._mask_position(torch.tensor(last - 1)).floor()) + 2
                if needs_samples > self.high_total or needs_mask > mask_end:
                    break
            self._separate_frames(first, last)
            self.next_frame = last
            parts.append(self._emit())
        return parts

    def _separate_frames(self, first, last):
        half = self.n_fft // 2
        start, end = first * self.hop - half, (last - 1) * self.hop + half
        segment = slice_padded(self.high, start - self.high_start, end - self.high_start, self.high_total - self.high_start)
        spec = torch.stft(segment, self.n_fft, self.hop, window=self.window, center=False, return_complex=True)
        mask = self._full_band_mask(first, last)
        estimates = [mask * spec]
        if self.accompaniment == "complement":
            estimates.append((1 - mask) * spec)
        if self.wiener:
            estimates = wiener_filter(mask, spec, len(estimates))
        if self.target == "accompaniment":  # the mask extracted the accompaniment
            estimates = [spec - estimates[0]] + ([estimates[0]] if len(estimates) > 1 else [])
        frames = torch.fft.irfft(torch.stack(estimates), n=self.n_fft, dim=-2) * self.window[:, None]
        self._overlap_add(frames, start)

    def _full_band_mask(self, first, last):
        """The 8192 Hz mask, interpolated onto full-rate frames first..last-1 and bins, and
        extended above 4096 Hz. Returns (channels, n_fft // 2 + 1, last - first)."""
        position = self._mask_position(torch.arange(first, last))
        newest = self.mask_start + self.mask.shape[-1] - 1
        low = position.floor().long().clamp(max=newest)
        high = (low + 1).clamp(max=newest)
        weight = (position - low).clamp(0, 1).float()
        m = self.mask[..., low - self.mask_start] * (1 - weight) + self.mask[..., high - self.mask_start] * weight
        bin_low, bin_high, bin_weight, n_above = self.interp
        inside = m[:, bin_low] * (1 - bin_weight[:, None]) + m[:, bin_high] * bin_weight[:, None]
        if self.extension == "mean":
            above = m[:, -MASK_EXTENSION_BINS:].mean(dim=1, keepdim=True)
        elif self.extension == "edge":
            above = m[:, -1:]
        else:  # what resampling the 8192 Hz output would give: nothing above 4096 Hz
            above = torch.zeros_like(m[:, -1:])
        above = above.expand(-1, n_above, -1)
        # frames before `low` are not needed by any later full-rate frame
        drop = int(position[-1].floor()) - self.mask_start
        if drop > 0:
            self.mask = self.mask[..., drop:]
            self.mask_start += drop
        return torch.cat([inside, above], dim=1)

    def _overlap_add(self, frames, start):
        """frames: (estimates, channels, n_fft, n) windowed time frames whose first starts at
        global sample `start`; added into the output sums with the squared window."""
        n = frames.shape[-1]
        length = (n - 1) * self.hop + self.n_fft
        folded = torch.nn.functional.fold(frames.flatten(0, 1), (1, length), (1, self.n_fft), stride=(1, self.hop))
        folded = folded.reshape(*frames.shape[:2], length)
        if n not in self.window_sums:  # the same for every block of n frames
            squares = self.window.square()[None, :, None].expand(1, -1, n)
            self.window_sums[n] = torch.nn.functional.fold(squares, (1, length), (1, self.n_fft),
                                                           stride=(1, self.hop)).reshape(length)
        weight = self.window_sums[n]
        offset = start - self.out_start
        if offset < 0:  # the first frames reach before the file's start
            folded, weight, length, offset = folded[..., -offset:], weight[-offset:], length + offset, 0
        grow = offset + length - self.out.shape[-1]
        if grow > 0:
            self.out = torch.nn.functional.pad(self.out, (0, grow))
            self.out_weight = torch.nn.functional.pad(self.out_weight, (0, grow))
        self.out[..., offset:offset + length] += folded
        self.out_weight[offset:offset + length] += weight

    def _emit(self):
        """Samples no future frame touches, divided by the window sum; with the accompaniment."""
        if self.done and self.next_frame >= self.high_total // self.hop + 1:
            final = self.high_total
        else:
            final = min(self.next_frame * self.hop - self.n_fft // 2, self.high_total)
        n = final - self.out_start
        if n <= 0:
            empty = np.zeros((self.channels, 0), np.float32)
            return empty, empty
        estimates = self.out[..., :n] / self.out_weight[:n].clamp(min=1e-8)
        mixture = self.high[:, self.out_start - self.high_start:final - self.high_start]
        vocals = estimates[0]
        accompaniment = estimates[1] if self.accompaniment == "complement" else mixture - vocals
        self.out, self.out_weight = self.out[..., n:], self.out_weight[n:]
        self.out_start = final
        keep = min(self.out_start, self.next_frame * self.hop - self.n_fft // 2) - self.high_start
        if keep > 0:
            self.high = self.high[:, keep:]
            self.high_start += keep
        return vocals.numpy(), accompaniment.numpy()


def shift_delays(rate, shifts):
    """Input samples by which each of `shifts` copies is delayed: k / shifts of the network's
    hop (768 samples at 8192 Hz), k = 0 .. shifts - 1."""
    if shifts < 1:
        raise ValueError(f"shifts must be at least 1, got {shifts}")
    hop = dg.HOP_LENGTH * rate / dg.SAMPLE_RATE
    return [round(k * hop / shifts) for k in range(shifts)]


def delayed(audio, samples):
    """audio (channels, n) with `samples` zeros in front."""
    return np.concatenate([np.zeros((audio.shape[0], samples), audio.dtype), audio], axis=1)


class ShiftAveragedSeparator:
    """StreamingSeparator's interface over one separator per delay, the k-th reading the input
    delayed by delays[k] samples; their stems are realigned and averaged.

    Why: the network's frames overlap by only 25 % (hop 768 of 1024 samples), so its mask samples
    time coarsely and where the frames fall matters. Copies whose frames fall a fraction of a hop
    apart average that out: measured +0.25 to +0.34 dB vocals SDR with 2 copies (README, results).
    mask_fns: one per copy (an oracle mask depends on the delay; a model's does not).
    """

    def __init__(self, rate, channels, mask_fns, delays, record_seconds=0, **options):
        self.separators = [StreamingSeparator(rate, channels, fn, record_seconds=0 if k else record_seconds, **options)
                           for k, fn in enumerate(mask_fns)]
        self.skip = list(delays)  # output samples each copy has still to drop
        empty = np.zeros((channels, 0), np.float32)
        self.pending = [(empty, empty) for _ in delays]  # realigned output not yet averaged
        for k, delay in enumerate(delays):
            if delay:
                self._take(k, self.separators[k].process(np.zeros((channels, delay), np.float32)))

    def process(self, block):
        for k, separator in enumerate(self.separators):
            self._take(k, separator.process(block))
        return self._average()

    def finish(self):
        for k, separator in enumerate(self.separators):
            self._take(k, separator.finish())
        return self._average()

    def recording(self):
        return self.separators[0].recording()

    def _take(self, k, stems):
        drop = min(self.skip[k], stems[0].shape[1])
        self.skip[k] -= drop
        self.pending[k] = tuple(np.concatenate([old, new[:, drop:]], axis=1) for old, new in zip(self.pending[k], stems))

    def _average(self):
        n = min(p[0].shape[1] for p in self.pending)  # samples every copy has produced
        stems = tuple(np.mean([p[i][:, :n] for p in self.pending], axis=0, dtype=np.float32) for i in range(2))
        self.pending = [tuple(x[:, n:] for x in p) for p in self.pending]
        return stems


def make_separator(rate, channels, mask_fn, shifts=DEFAULT_SHIFTS, **options):
    """The separator for one recording: a StreamingSeparator, or with shifts > 1 the average of
    `shifts` of them on frame grids a fraction of a hop apart. mask_fn: one for every copy, or a
    list with one per copy. options as for StreamingSeparator."""
    mask_fns = list(mask_fn) if isinstance(mask_fn, (list, tuple)) else [mask_fn] * shifts
    if len(mask_fns) != shifts:
        raise ValueError(f"{len(mask_fns)} mask functions for {shifts} shifts")
    if shifts == 1:
        return StreamingSeparator(rate, channels, mask_fns[0], **options)
    return ShiftAveragedSeparator(rate, channels, mask_fns, shift_delays(rate, shifts), **options)


def slice_padded(buffer, start, end, valid):
    """buffer[:, start:end] with zeros outside [0, valid) (indices relative to the buffer)."""
    a, b = max(start, 0), min(end, valid)
    part = buffer[:, a:b] if b > a else buffer[:, :0]
    return torch.nn.functional.pad(part, (a - start, end - start - (a - start) - part.shape[1]))


def wiener_filter(mask, spec, n_estimates, eps=1e-10):
    """One pass of the multichannel Wiener filter (as in open-unmix / norbert) over one block.

    The masked spectrograms give each source a power spectral density v_j(f, t) and a spatial
    covariance R_j(f) (channels x channels, from this block); each source is then
    v_j R_j (sum_k v_k R_k)^-1 x. For stereo this uses where the voice sits between the
    speakers, which a per-channel mask cannot. mask: (channels, bins, frames) real;
    spec: (channels, bins, frames) complex. Returns n_estimates complex spectrograms:
    [vocals] or [vocals, accompaniment].
    """
    channels = spec.shape[0]
    x = spec.permute(1, 2, 0).to(torch.complex128)  # (bins, frames, channels)
    sources = [mask.permute(1, 2, 0) * x, (1 - mask.permute(1, 2, 0)) * x]
    eye = torch.eye(channels, dtype=torch.complex128)
    psd, cov = [], []
    for y in sources:
        v = y.abs().square().mean(dim=-1)  # (bins, frames)
        r = torch.einsum("ftc,ftd->fcd", y, y.conj()) / (v.sum(dim=1)[:, None, None] + eps)
        psd.append(v)
        cov.append(r)
    mix_cov = sum(v[..., None, None] * r[:, None] for v, r in zip(psd, cov)) + eps * eye
    inverse = torch.linalg.inv(mix_cov)
    out = []
    for v, r in zip(psd[:n_estimates], cov[:n_estimates]):
        gain = v[..., None, None] * (r[:, None] @ inverse)
        out.append((gain @ x[..., None]).squeeze(-1).permute(2, 0, 1).to(spec.dtype))
    return out


def separate(audio, rate, mask_fn, return_mask=False, **options):
    """Whole-array separation: audio (channels, samples) -> (vocals, accompaniment), each
    (channels, samples) float32 at the same rate; with return_mask, also the 8192 Hz mask
    (channels, 512, frames). options as for StreamingSeparator."""
    if return_mask:
        options["record_seconds"] = audio.shape[1] / rate + 1
    separator = make_separator(rate, audio.shape[0], mask_fn, **options)
    parts = [separator.process(audio), separator.finish()]
    stems = tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(2))
    return stems + (separator.recording()[1],) if return_mask else stems


# -----------------------------------------------------------------------------
# files in, files out

def separate_file(path, outputs, mask_fn, fmt="wav", progress=None, plot=None, **options):
    """Stream one audio file through the separator into its two stem files.

    outputs: {'vocals': path, 'accompaniment': path}. Each is written to a temporary file
    beside it and renamed only once complete, so a failure never leaves a half-written stem or
    destroys an earlier one. plot: a PNG path for a picture of the first minutes.
    Returns the input's (rate, channels, frames).
    """
    info = dg.check_audio_file(path)
    rate, channels = info.samplerate, info.channels
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    temporary = {stem: dg.partial_path(p) for stem, p in outputs.items()}
    writers = {}
    try:
        for stem, tmp in temporary.items():
            writers[stem] = sf.SoundFile(str(tmp), "w", rate, channels, subtype=subtype, format=fmt.upper())
        separator = make_separator(rate, channels, mask_fn, record_seconds=PLOT_SECONDS if plot else 0, **options)
        frames = 0

        def write(parts):
            for stem, part in zip(dg.STEMS, parts):
                writers[stem].write(np.clip(part.T, -1, 1) if fmt == "flac" else part.T)

        with dg.open_audio(path) as reader:
            while True:
                block = dg.read_block(reader, path, READ_SECONDS * rate)
                if block.shape[0] == 0:
                    break
                dg.check_audio_samples(path, block)
                frames += block.shape[0]
                write(separator.process(block.T))
                if progress is not None:
                    progress(block.shape[0] / rate)
        dg.check_audio_length(path, info, frames)
        write(separator.finish())
        for w in writers.values():
            w.close()
        if plot:
            save_separation_plot(plot, *separator.recording(), title=Path(path).name)
        for stem, tmp in temporary.items():
            os.replace(tmp, outputs[stem])
        return rate, channels, frames
    finally:
        for w in writers.values():
            if not w.closed:
                w.close()
        for tmp in temporary.values():
            if tmp.exists():
                tmp.unlink()


def separation_figure(mixture, mask, title=""):
    """Matplotlib figure of the mixture spectrogram, the predicted mask and the vocal spectrogram
    (mask x mixture) at 8192 Hz. mixture: (channels, samples); mask: (channels, 512, frames)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    magnitude = dg.stft(torch.as_tensor(mixture)).abs().mean(0).numpy()  # channels averaged for the picture
    mask = torch.as_tensor(mask).mean(0).numpy()
    frames = min(magnitude.shape[-1], mask.shape[-1])
    magnitude, mask = magnitude[:, :frames], mask[:, :frames]
    extent = (0, frames * dg.HOP_LENGTH / dg.SAMPLE_RATE, 0, dg.SAMPLE_RATE / 2)
    db = lambda x: 20 * np.log10(x + 1e-5)
    top = db(magnitude).max()
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True, constrained_layout=True)
    panels = [(db(magnitude), "mixture (dB)", "magma", top - 80, top),
              (mask, "predicted mask", "viridis", 0, 1),
              (db(magnitude * mask), "vocals = mask x mixture (dB)", "magma", top - 80, top)]
    for ax, (image, name, cmap, low, high) in zip(axes, panels):
        im = ax.imshow(image, origin="lower", aspect="auto", extent=extent, cmap=cmap, vmin=low, vmax=high,
                       interpolation="nearest")
        ax.set_title(name)
        ax.set_ylabel("Hz")
        fig.colorbar(im, ax=ax)
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title)
    return fig


def save_separation_plot(path, mixture, mask, title=""):
    """separation_figure as a PNG, written atomically."""
    import matplotlib.pyplot as plt
    fig = separation_figure(mixture, mask, title)
    dg.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def expand_inputs(paths):
    """Files and folders (their audio files, sorted) -> list of Paths; folders must hold audio."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in dg.AUDIO_EXTENSIONS and not f.name.startswith("."))
            if not found:
                raise dg.DataError(f"{p}: folder holds no audio files ({', '.join(dg.AUDIO_EXTENSIONS)})")
            files.extend(found)
        else:
            files.append(p)
    return files


def output_paths(path, output_dir, template, fmt):
    """{'vocals': Path, 'accompaniment': Path} for one input; template fields: {track} (input
    name without extension), {stem}, {ext}."""
    folder = Path(output_dir) if output_dir else Path(path).parent
    return {stem: folder / template.format(track=Path(path).stem, stem=stem, ext=fmt) for stem in dg.STEMS}


def check_outputs(outputs, inputs):
    """Refuse outputs that would overwrite an input or each other, or land in a folder that
    cannot be written."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    paths = [Path(p) for p in outputs.values()]
    if len({p.resolve() for p in paths}) < len(paths):
        raise dg.DataError(f"--filename gives the same name to both stems ({paths[0]}); include {{stem}}")
    for p in paths:
        if p.resolve() in resolved_inputs:
            raise dg.DataError(f"{p}: output would overwrite an input file; change --output-dir or --filename")
        folder = p.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise dg.DataError(f"{folder}: cannot create output folder ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise dg.DataError(f"{folder}: output folder is not writable")


def main():
    parser = argparse.ArgumentParser(
        description="Separate vocals and accompaniment with a trained U-Net. Writes "
                    "<track>_vocals.wav and <track>_accompaniment.wav beside each input "
                    "(or in --output-dir) at the input's sample rate, channels and length.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio", nargs="+", default=None, metavar="PATH",
                        help="audio files (wav, flac, ogg, mp3, aiff) or folders of them; without it, "
                             "the first test track of the dataset train.py would use is separated")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained model from train.py")
    parser.add_argument("--output-dir", default=None, help="where the stems go (default: beside each input; "
                        "outputs/ for a dataset track)")
    parser.add_argument("--filename", default="{track}_{stem}.{ext}", help="output name template; "
                        "fields {track}, {stem}, {ext}")
    parser.add_argument("--format", default="wav", choices=["wav", "flac"], help="output format "
                        "(wav is 32-bit float, flac 24-bit)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--n-channels", type=int, default=None, help="accepted for compatibility with the "
                        "original scripts; the checkpoint already knows its width")
    parser.add_argument("--no-amp", action="store_true", help="full float32 instead of bf16/fp16 autocast "
                        "(used on CUDA and on CPUs with native bf16)")
    parser.add_argument("--overlap", type=float, default=0.5, help="overlap of neighbouring 128-frame patches")
    parser.add_argument("--mask-exponent", type=float, default=None, help="raise the masks to this power "
                        "(default: the exponent train.py fitted on the validation songs and stored in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per network call")
    parser.add_argument("--shifts", type=int, default=DEFAULT_SHIFTS, help="average this many separations whose "
                        "frames fall 1/shifts of a hop apart (1: one pass, about 2/3 of the time; 4: no better than 2)")
    parser.add_argument("--wiener", action="store_true", help="refine the masks with a multichannel "
                        "Wiener filter (uses the stereo image)")
    parser.add_argument("--accompaniment", default="residual", choices=["residual", "complement"],
                        help="accompaniment as mixture minus vocals, or by the complementary mask")
    parser.add_argument("--mask-channels", default="each", choices=MASK_CHANNELS,
                        help="a mask per channel, or one mask from the channels' mean for all (half the "
                             "network time, 0.3 dB less vocals SDR on the MUSDB18 previews)")
    parser.add_argument("--plot", action="store_true", help="also save <track>_mask.png: mixture spectrogram, "
                        "predicted mask and vocal spectrogram of the first 10 minutes")
    parser.add_argument("--musdb-root", default=None, help="dataset for the no --audio case (as in train.py)")
    parser.add_argument("--synthetic", action="store_true", help="no --audio: use the synthetic set's test song")
    args = parser.parse_args()

    try:
        validate_args(args)
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        model, checkpoint = load_model(args.checkpoint, device, expected_spec=dg.SPEC_CONFIG)
        config = checkpoint["model_config"]
        if args.n_channels is not None and args.n_channels != config["n_channels"]:
            print(f"note: --n-channels {args.n_channels} ignored; the checkpoint has n_channels={config['n_channels']}")
        target = checkpoint.get("target", "vocals")
        exponent = checkpoint_mask_exponent(checkpoint, args.mask_exponent)
        # the validation SDR train.py measured with this exponent, when it scored it (else with the masks as predicted)
        sdr = (checkpoint.get("mask_exponent_sdr") or {}).get(exponent, float("nan"))
        sdr_text = (f"validation SDR {sdr:.2f} dB" if np.isfinite(sdr) else
                    f"validation SDR {checkpoint.get('best_val_sdr', float('nan')):.2f} dB with the masks as predicted")
        print(f"model: {args.checkpoint} (n_channels={config['n_channels']}, target={target}, "
              f"epoch {checkpoint.get('epoch', '?')}, mask exponent {exponent:g}, {sdr_text}) on {device}")
        mask_fn = model_mask_fn(model, device, args.batch_size, amp=not args.no_amp, exponent=exponent)
        options = dict(target=target, overlap=args.overlap, batch_size=args.batch_size, shifts=args.shifts,
                       wiener=args.wiener, accompaniment=args.accompaniment, mask_channels=args.mask_channels)
        if args.audio is None:
            return separate_dataset_track(args, mask_fn, options)
        inputs = expand_inputs(args.audio)
    except (dg.DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    return separate_files(inputs, args, mask_fn, options)


def validate_args(args):
    if not 0 <= args.overlap < 1:
        raise dg.DataError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.batch_size < 1:
        raise dg.DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.shifts < 1:
        raise dg.DataError(f"--shifts must be at least 1, got {args.shifts}")
    if args.mask_exponent is not None and not args.mask_exponent > 0:
        raise dg.DataError(f"--mask-exponent must be positive, got {args.mask_exponent}")
    for field in ("{track}", "{stem}"):
        if field not in args.filename:
            raise dg.DataError(f"--filename must contain {field} (got {args.filename!r})")


def separate_files(inputs, args, mask_fn, options):
    """Separate each input; a bad file is reported and skipped. Exit status 1 if any failed."""
    from tqdm import tqdm
    failed = 0
    started = time.time()
    bar = tqdm(inputs, desc="files", unit="file", disable=len(inputs) < 2)
    for path in bar:
        try:
            info = dg.check_audio_file(path)  # first, so that a bad input creates nothing
            outputs = output_paths(path, args.output_dir, args.filename, args.format)
            check_outputs(outputs, inputs)
            plot = outputs["vocals"].with_name(f"{Path(path).stem}_mask.png") if args.plot else None
            seconds = info.frames / info.samplerate
            t0 = time.time()
            with tqdm(total=round(seconds, 1), desc=Path(path).name[:30], unit="s", leave=False,
                      disable=seconds < 60, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio") as inner:
                rate, channels, frames = separate_file(path, outputs, mask_fn, args.format, plot=plot,
                                                       progress=lambda s: inner.update(round(s, 1)), **options)
            elapsed = time.time() - t0
            tqdm.write(f"{path}: {frames / rate:.1f} s, {rate} Hz, {channels} ch -> {outputs['vocals']}, "
                       f"{outputs['accompaniment']}" + (f", {plot}" if plot else "")
                       + f" ({elapsed:.1f} s, {frames / rate / elapsed:.0f}x real time)")
        except dg.DataError as e:
            failed += 1
            tqdm.write(f"error: {e}")
    if len(inputs) > 1:
        print(f"{len(inputs) - failed} of {len(inputs)} files separated in {time.time() - started:.1f} s"
              + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def separate_dataset_track(args, mask_fn, options):
    """The original behaviour: separate the first test track of train.py's dataset, write its
    mixture and stems to outputs/, and score them against the true stems."""
    source = dg.find_data_source(args.musdb_root, synthetic=args.synthetic)
    name, mixture, rate, reference = first_test_track(source)
    folder = Path(args.output_dir or "outputs")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"no --audio given: separating {name} from the {source.describe()}")
    vocals, accompaniment = separate(mixture, rate, mask_fn, **options)
    written = {"mixture": mixture, "vocals": vocals, "accompaniment": accompaniment}
    for stem, audio in written.items():
        path = folder / dg.safe_name(f"{name}_{stem}.wav")
        atomic_write(path, audio, rate)
        print(f"  wrote {path}")
    for stem, estimate in (("vocals", vocals), ("accompaniment", accompaniment)):
        print(f"  {stem}: SDR {sdr(reference[stem], estimate):.2f} dB (the mixture itself scores "
              f"{sdr(reference[stem], mixture):.2f} dB)")
    return 0


def first_test_track(source):
    """(name, mixture (channels, samples), rate, {'vocals', 'accompaniment'} references) of the
    first test track; MUSDB18 folders without a test subset (the shared previews) give their
    first validation track."""
    if source.kind == "synthetic":
        track = dg.synthetic_track("test", 0, rate=44100)
        return track.name, track.mixture, 44100, {"vocals": track.vocals, "accompaniment": track.accompaniment}
    tracks = dg.musdb_tracks(source, "test") or dg.musdb_tracks(source, "train", "valid")
    if not tracks:
        raise dg.DataError(f"{source.root}: no test or validation tracks")
    t = tracks[0]
    stems = np.asarray(t.stems, dtype=np.float32)
    return t.name, stems[0].T.copy(), int(t.rate), {"vocals": stems[4].T.copy(),
                                                   "accompaniment": (stems[1] + stems[2] + stems[3]).T.copy()}


def sdr(reference, estimate):
    """Signal-to-distortion ratio in dB over the whole signal (a quick check; evaluate.py gives
    BSSEval v4 with museval)."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return 10 * np.log10((np.sum(reference ** 2) + 1e-9) / (np.sum((reference - estimate) ** 2) + 1e-9))


def atomic_write(path, audio, rate, fmt="wav"):
    """Write (channels, samples) audio to path through a temporary file and a rename."""
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    dg.atomic_write(path, lambda tmp: sf.write(str(tmp), np.asarray(audio).T, rate, subtype=subtype, format=fmt.upper()))


if __name__ == "__main__":
    sys.exit(main())
