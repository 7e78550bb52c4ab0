"""The lab's step 1, audio -> tensors for the U-Net singing-voice separator (Jansson et al., ISMIR 2017): the
paper's STFT cut into patches, normalisation, the oracle mask the network learns, and training batches of random
remixes. `python data_generator.py` is a sanity check of all this on the dataset train.py would use (datasets.py),
with a PNG of one patch.
"""
import copy
import math
from pathlib import Path

import numpy as np
import torch

import datasets
from audio import SAMPLE_RATE, STEMS, resample
from utils import DataError, Parser, atomic_write, run_cli

# the paper's spectrogram settings; checkpoints store them and the separator checks them -----------
N_FFT = 1024  # Hann window length in samples, at SAMPLE_RATE = 8192 Hz (audio.py): the network hears up to 4096 Hz
HOP_LENGTH = 768  # samples between frames
N_BINS = N_FFT // 2  # 512: the Nyquist bin is dropped so the U-Net halves it cleanly 6 times
PATCH_FRAMES = 128  # frames per network input (about 12 s)
PATCH_SAMPLES = (PATCH_FRAMES - 1) * HOP_LENGTH + N_FFT  # samples that make one patch: 98560
NORMALISATION = "sounding_frames_mean"  # magnitudes divided by the mixture patch's mean over frames with sound
EPS = 1e-8

SPEC_CONFIG = dict(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_bins=N_BINS,
                   patch_frames=PATCH_FRAMES, normalisation=NORMALISATION)


# STFT, patches, normalisation, oracle mask --------------------------------------------------------

def stft(audio, center=True):
    """The paper's STFT, Nyquist bin dropped: (..., samples) float -> (..., 512, frames) complex.
    center=True: frame f centred on sample f * 768, the end padded to a whole hop (which exceeds
    half the window) so that the last samples fall in a frame; False: the caller holds the edges."""
    shape = audio.shape
    audio = audio.reshape(-1, shape[-1])
    if center:
        audio = torch.nn.functional.pad(audio, (0, -shape[-1] % HOP_LENGTH))
    spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT, device=audio.device),
                      center=center, pad_mode="constant", return_complex=True)
    return spec[:, :N_BINS].reshape(*shape[:-1], N_BINS, spec.shape[-1])


def istft(spec, length):
    """Inverse of stft(center=True): (..., 512, frames) complex -> (..., length) float."""
    shape = spec.shape
    spec = torch.nn.functional.pad(spec.reshape(-1, *shape[-2:]), (0, 0, 0, 1))  # Nyquist bin back
    audio = torch.istft(spec, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT, device=spec.device),
                        center=True, length=length)
    return audio.reshape(*shape[:-2], length)


def n_frames(n_samples):
    """Frames stft(center=True) gives for n_samples: enough to cover every sample."""
    return -(-n_samples // HOP_LENGTH) + 1


def patch_hop(overlap):
    """Frames between patch starts for an overlap in [0, 1): 0.5 -> 64."""
    return max(1, round(PATCH_FRAMES * (1 - overlap)))


def n_patches(frames, hop):
    """Patches of PATCH_FRAMES on a grid of `hop` needed to cover `frames` frames (at least 1)."""
    return 1 + max(0, math.ceil((frames - PATCH_FRAMES) / hop))


def to_patches(spec, hop):
    """Cut a spectrogram into overlapping patches, zero-padding the end: (..., bins, frames) ->
    (..., n_patches, bins, 128); patch p starts at frame p * hop."""
    frames = spec.shape[-1]
    padded = torch.nn.functional.pad(spec, (0, (n_patches(frames, hop) - 1) * hop + PATCH_FRAMES - frames))
    return padded.unfold(-1, PATCH_FRAMES, hop).movedim(-2, -3)


def loop_to(audio, length):
    """(..., n) -> (..., length): audio again and again from its start. A patch reaching past a recording's end is
    filled so, because the network trained on patches full of music (filled_remix): zeros there would be an
    input it never saw, and the masks of short clips such as the 7 s previews would suffer
    (experiments/2026-11-27-validation-swing-loop-fill.md)."""
    if audio.shape[-1] == 0:
        return audio.new_zeros(*audio.shape[:-1], length)
    return audio.repeat(*([1] * (audio.dim() - 1)), -(-length // audio.shape[-1]))[..., :length]


def fill_patch_grid(audio, hop):
    """(..., samples) at SAMPLE_RATE -> the samples whose stft() fills the last patch of a `hop` grid, the end
    filled with loop_to as the streaming separator fills it: to_patches then pads nothing."""
    frames = (n_patches(n_frames(audio.shape[-1]), hop) - 1) * hop + PATCH_FRAMES
    return loop_to(audio, (frames - 1) * HOP_LENGTH)


def patch_window(device="cpu"):
    """(128,) cross-fade weights over a patch's frames: a triangle that never reaches zero, so that
    neighbouring patches blend without seams and frames covered once keep their value."""
    position = torch.arange(PATCH_FRAMES, device=device, dtype=torch.float32) + 0.5
    return 1 - (position - PATCH_FRAMES / 2).abs() / (PATCH_FRAMES / 2) + 1 / PATCH_FRAMES


def overlap_add(patches, hop, window=None):
    """Weighted overlap-add, the inverse of to_patches once divided: patches (..., n, bins, 128), each weighted
    by its row of window (n, 128), by default patch_window -> total (..., bins, frames) and weight (frames,),
    frames = (n - 1) * hop + 128."""
    count = patches.shape[-3]
    window = patch_window(patches.device).expand(count, -1) if window is None else window
    frames = (count - 1) * hop + PATCH_FRAMES
    total = patches.new_zeros(*patches.shape[:-3], patches.shape[-2], frames)
    weight = patches.new_zeros(frames)
    for p in range(count):  # a handful of patches per call; clarity beats fold() here
        total[..., p * hop:p * hop + PATCH_FRAMES] += patches[..., p, :, :] * window[p]
        weight[p * hop:p * hop + PATCH_FRAMES] += window[p]
    return total, weight


def from_patches(patches, hop, frames):
    """Patches back to a spectrogram of `frames` frames: (..., n, bins, 128) -> (..., bins, frames)."""
    total, weight = overlap_add(patches, hop)
    return (total / weight)[..., :frames]


def normalise(mixture_mag, *others):
    """Divide magnitudes (..., 512, 128) by the mixture patch's mean over frames with sound, so that the mask
    ignores loudness and zeros padding a short clip; targets share the mixture's scale for the L1,1 loss."""
    sounding = (mixture_mag.amax(dim=-2, keepdim=True) > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    scale = mixture_mag.sum(dim=(-2, -1), keepdim=True) / (mixture_mag.shape[-2] * sounding) + EPS
    return tuple(m / scale for m in (mixture_mag,) + others)


def oracle_mask(target_mag, mixture_mag):
    """The ideal ratio mask the U-Net learns: |target| / |mixture| clipped to [0, 1], 0 where the
    mixture is silent; any shape."""
    return (target_mag / (mixture_mag + EPS)).clamp(0, 1)


# training examples: random remixes cut into patches -----------------------------------------------

SPEED_RANGE = (0.85, 1.15)  # speed factors of the tape-style change: about +-2.5 semitones


def augment_channel(audio, rng):
    """The mono network's channel swap: (channels, samples) -> (samples,) of a random channel."""
    return audio[rng.integers(audio.shape[0])]


def random_start(total, rng, length=PATCH_SAMPLES):
    """Start of a random excerpt of `length` from `total` samples; negative for a shorter track,
    which is then used whole at a random offset in zeros."""
    if total >= length:
        return int(rng.integers(0, total - length + 1))
    return -int(rng.integers(0, length - total + 1))


def excerpt(audio, start, length=PATCH_SAMPLES):
    """Samples [start, start + length) of (channels, samples) audio, zero outside it: (channels, length) float32."""
    out = np.zeros((audio.shape[0], length), dtype=np.float32)
    a, b = max(start, 0), min(start + length, audio.shape[1])
    if b > a:
        out[:, a - start:b - start] = audio[:, a:b]
    return out


def change_speed(audio, factor, length=PATCH_SAMPLES):
    """Play (channels, n) audio `factor` times faster, as a tape would (pitch and tempo together), cut or padded
    to (channels, length) float32. resample's rates only set the ratio; LQ is plenty for augmentation."""
    out = resample(audio, audio.shape[1], length * audio.shape[1] / (length * factor), quality="LQ")[:, :length]
    return np.ascontiguousarray(np.pad(out, ((0, 0), (0, length - out.shape[1]))), dtype=np.float32)


AS_MIXED_SHARE = 0.5  # of the remixes whose vocals come from a track that has its own accompaniment, the share
# that keeps it, in time: the song as mixed, at a random speed. The model separates songs as mixed, where voice and
# band share key, tempo and onsets, which remixes of two songs never do (experiments/2026-11-29-as-mixed-share.md).


def draw_sources(sources, weights, rng):
    """The tracks and speeds of one remix: ([track per stem], [speed factor per stem], as_mixed). Stem i's track
    comes from a source drawn with probability weights[:, i] (no draw when one source lends that stem); as_mixed:
    both stems are one track's, at one speed, with probability AS_MIXED_SHARE where the vocals' source also lends
    accompaniment (weights[source, 1] > 0), else drawn apart."""
    def draw_track(p):
        lenders = np.flatnonzero(p)
        source = lenders[0] if len(lenders) == 1 else rng.choice(len(sources), p=p)
        return source, sources[source][rng.integers(len(sources[source]))]
    (source, vocals), (_, accompaniment) = draw_track(weights[:, 0]), draw_track(weights[:, 1])
    factors = [rng.uniform(*SPEED_RANGE) for _ in STEMS]
    if weights[source, 1] > 0 and rng.random() < AS_MIXED_SHARE:
        return [vocals, vocals], [factors[0]] * 2, True
    return [vocals, accompaniment], factors, False


def clip_at_speed(audio, factor, rng, room, gain=1.0):
    """One source of a filled patch, (channels, samples) -> (n,) float32, n <= room: a random channel
    at `factor` times the speed and `gain` times the level, a short track from its start, a long one
    from a random offset."""
    total = audio.shape[1]
    start = random_start(total, rng, math.ceil(PATCH_SAMPLES * factor)) if total / factor > PATCH_SAMPLES else 0
    length = min(total - start, math.ceil(room * factor))
    part = augment_channel(np.asarray(audio[:, start:start + length], dtype=np.float32), rng) * np.float32(gain)
    # as change_speed, but keeping the length the resampler gives: the next clip follows without a gap
    part = resample(part[None], length, length / factor, quality="LQ")[0]
    return np.ascontiguousarray(part[:room], dtype=np.float32)


def filled_remix(sources, weights, rng):
    """Short clips laid end to end so that the patch holds music throughout: (vocals, accompaniment), each
    (PATCH_SAMPLES,) float32. A segment's sources start together; the next starts where the longer ends."""
    out = np.zeros((len(STEMS), PATCH_SAMPLES), dtype=np.float32)
    position = 0
    while position < PATCH_SAMPLES:
        picks, factors, as_mixed = draw_sources(sources, weights, rng)
        # as mixed, the accompaniment's clip repeats the vocals' draws (start, channel) from a copy of the stream
        streams = [copy.deepcopy(rng), rng] if as_mixed else [rng, rng]
        clips = [clip_at_speed(getattr(track, name), factor, stream, PATCH_SAMPLES - position, track.gain(name))
                 for name, track, factor, stream in zip(STEMS, picks, factors, streams)]
        for row, clip in zip(out, clips):
            row[position:position + len(clip)] = clip
        position += max(len(clip) for clip in clips)
    return out[0], out[1]


def random_remix(sources, weights, rng):
    """One mono example, (vocals, accompaniment) each (PATCH_SAMPLES,) float32, from a random channel at a random
    speed: a song as mixed (AS_MIXED_SHARE of the draws that can be) or stems from tracks and offsets drawn apart,
    so that examples are not only the songs as mixed. Drawn tracks both shorter than a patch are followed by more
    (filled_remix). weights: (n_sources, 2), each column the probabilities of the sources for that stem (as
    training_batch makes them)."""
    picks, factors, as_mixed = draw_sources(sources, weights, rng)
    spans = [int(np.ceil(t.vocals.shape[1] / f)) for t, f in zip(picks, factors)]  # after the speed change
    if max(spans) < PATCH_SAMPLES:  # filled_remix draws afresh; this draw stays so a seed gives the batches it gave
        return filled_remix(sources, weights, rng)
    lengths = [int(np.ceil(PATCH_SAMPLES * f)) for f in factors]  # samples to read to fill the patch at that speed
    starts = [random_start(t.vocals.shape[1], rng, n) for t, n in zip(picks, lengths)]
    streams = [rng, rng]
    if as_mixed:  # one start, and one channel: the accompaniment's draw repeats the vocals' from a copy of the stream
        starts[1], streams[0] = starts[0], copy.deepcopy(rng)
    stems = []
    for name, track, start, factor, length, stream in zip(STEMS, picks, starts, factors, lengths, streams):
        part = augment_channel(excerpt(getattr(track, name), start, length), stream) * np.float32(track.gain(name))
        stems.append(change_speed(part[None], factor)[0])
    return stems[0], stems[1]


def default_weights(source, n_sources):
    """(n_sources, 2) how often each training source lends a remix's (vocals, accompaniment), before normalising.
    With MUSDB18 (or the synthetic set) first, the stems folders lend their vocals only: the model is for MUSDB18's
    kind of music, and more singers over its bands helped there, where karaoke bands drawn alike cost
    (experiments/2026-11-28-mir1k-vocals-only.md). A run on stems folders alone draws both stems from every folder."""
    weights = np.ones((n_sources, len(STEMS)))
    if source.kind != "stems":
        weights[1:, STEMS.index("accompaniment")] = 0
    return weights


def describe_weights(weights):
    """(n_sources, 2) weights -> 'sources drawn for the vocals 1 : 1, for the accompaniment 1 : 0'"""
    ratio = lambda column: " : ".join(f"{w:g}" for w in column)
    return f"sources drawn for the vocals {ratio(weights[:, 0])}, for the accompaniment {ratio(weights[:, 1])}"


def training_batch(sources, batch_size, rng, weights=None):
    """A batch of random remixes (random_remix) drawn with the numpy Generator rng from sources, a list of
    sources' track lists ([tracks] for one), drawn with probability weights: (n_sources,) for both stems or
    (n_sources, 2) for (vocals, accompaniment) apart, default equal.
    -> (vocals, accompaniment), each (batch, PATCH_SAMPLES) float32 numpy arrays."""
    weights = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
    weights = np.broadcast_to(weights.reshape(len(sources), -1), (len(sources), len(STEMS)))
    weights = weights / weights.sum(axis=0)
    pairs = [random_remix(sources, weights, rng) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def patch_spectrograms(vocals, accompaniment, target="vocals"):
    """Network input and loss target of patch-length waveforms, vocals and accompaniment each
    (batch, PATCH_SAMPLES) on any device: normalised magnitudes, each (batch, 1, 512, 128)."""
    mixture_mag = stft(vocals + accompaniment, center=False).abs()
    target_mag = stft(vocals if target == "vocals" else accompaniment, center=False).abs()
    return tuple(m.unsqueeze(1) for m in normalise(mixture_mag, target_mag))


def validation_patches(track, target="vocals"):
    """Every patch of every channel of a track as mixed, on inference's half-overlapping grid, the end filled
    as the separator fills it (loop_to): (mixture, target) normalised magnitudes, each (n, 1, 512, 128)."""
    hop = patch_hop(0.5)
    vocals, accompaniment = (fill_patch_grid(torch.from_numpy(np.array(x, dtype=np.float32)), hop)
                             for x in (track.vocals, track.accompaniment))  # copies: the cache is read-only
    mixture_mag = to_patches(stft(vocals + accompaniment).abs(), hop).flatten(0, 1)
    target_mag = to_patches(stft(vocals if target == "vocals" else accompaniment).abs(), hop).flatten(0, 1)
    return tuple(m.unsqueeze(1) for m in normalise(mixture_mag, target_mag))



# sanity check: python data_generator.py -----------------------------------------------------------

def save_patch_picture(mixture, target, mask, path, title=""):
    """PNG of one patch's mixture and target magnitudes (dB) and oracle mask, each (512, 128)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    db = [20 * np.log10(np.asarray(x) + 1e-4) for x in (mixture, target)]
    panels = [("mixture |X| (dB)", db[0], db[0].max() - 80, db[0].max(), "magma"),
              ("target |Y| (dB)", db[1], db[1].max() - 80, db[1].max(), "magma"),
              ("oracle mask |Y| / |X|", np.asarray(mask), 0, 1, "viridis")]
    for ax, (name, image, low, high, cmap) in zip(axes, panels):
        im = ax.imshow(image, origin="lower", aspect="auto", vmin=low, vmax=high, cmap=cmap,
                       extent=(0, PATCH_FRAMES * HOP_LENGTH / SAMPLE_RATE, 0, SAMPLE_RATE / 2))
        ax.set(title=name, xlabel="time (s)")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("frequency (Hz)")
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), suffix=".png")
    plt.close(fig)


def print_statistics(name, mixture, target):
    """Shapes and ranges of normalised magnitudes (n, 1, 512, 128) and of their oracle mask (which
    it returns), and the L1,1 loss of a few masks: the scale on which train.py's losses read."""
    mask = oracle_mask(target, mixture)
    print(f"{name}: mixture and target {tuple(mixture.shape)}")
    for label, x in (("normalised mixture", mixture), ("normalised target", target), ("oracle mask", mask)):
        print(f"  {label:18}: min {x.min():.3f} mean {x.mean():.3f} max {x.max():.2f} std {x.std():.3f}")
    losses = [f"{k} {(m * mixture - target).abs().mean():.4f}" for k, m in (("oracle", mask), ("0.5", 0.5), ("1", 1))]
    print(f"  L1,1 loss of the masks: {', '.join(losses)}")
    return mask


def main(argv=None):
    parser = Parser("Sanity check of the data pipeline: finds the dataset train.py would use, prints shapes and value "
                    "ranges, and saves a PNG of one patch.")
    datasets.add_data_args(parser, training=True)
    parser.add_argument("--output", default="data_sanity_check.png", help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the training batch")
    args = parser.parse_args(argv)
    if args.n_songs < 1:
        parser.error(f"--n-songs must be at least 1, got {args.n_songs}")
    if not Path(args.output).parent.is_dir():
        parser.error(f"--output {args.output}: no such folder {Path(args.output).parent}")
    source = datasets.find_data_source(args.musdb_root, args.download, args.synthetic, stems=args.stems)
    print(f"dataset: {source.describe()}")
    sources = datasets.training_sources(source, args.n_songs, args.cache_dir, seed=args.seed)
    if not all(sources):
        raise DataError(f"{source.describe()}: no training tracks")
    valid = datasets.load_tracks(source, "valid", None, args.cache_dir, seed=args.seed)
    for train in sources:
        lengths = [t.vocals.shape[1] for t in train]
        shortest, longest = min(lengths) / SAMPLE_RATE, max(lengths) / SAMPLE_RATE
        print(f"training source: {len(train)} tracks of {shortest:.1f}-{longest:.1f} s "
              f"({n_frames(min(lengths))}-{n_frames(max(lengths))} frames), stems scaled by {train[0].gains}")
    print(f"validation: {len(valid)} tracks")
    print(f"STFT: {SAMPLE_RATE} Hz, Hann {N_FFT}, hop {HOP_LENGTH}, {N_BINS} bins; "
          f"patch {N_BINS} x {PATCH_FRAMES} frames = {PATCH_SAMPLES} samples ({PATCH_SAMPLES / SAMPLE_RATE:.1f} s)")
    weights = default_weights(source, len(sources))
    if len(sources) > 1:
        print(describe_weights(weights))
    vocals, accompaniment = training_batch(sources, 16, np.random.default_rng(args.seed), weights)
    mixture, target = patch_spectrograms(torch.from_numpy(vocals), torch.from_numpy(accompaniment))
    mask = print_statistics("training batch (random remixes)", mixture, target)
    if valid:  # every patch of the validation songs as mixed
        print_statistics("validation set (songs as mixed)", *map(torch.cat, zip(*map(validation_patches, valid))))
    i = int(target.mean(dim=(1, 2, 3)).argmax())  # the patch with the most target energy shows the most
    save_patch_picture(mixture[i, 0], target[i, 0], mask[i, 0], args.output, f"{source.describe()}: one training patch")
    print(f"saved {Path(args.output).resolve()}")


if __name__ == "__main__":
    run_cli(main)
