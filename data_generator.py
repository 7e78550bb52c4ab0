"""
Audio -> tensors for the U-Net singing-voice separator (Jansson et al., ISMIR 2017).

Everything about turning sound into network inputs lives here, and train.py,
inference.py, evaluate.py and bench.py import it rather than copy it:
- reading audio files and resampling (soundfile + soxr);
- the STFT of the paper: 8192 Hz, Hann window 1024, hop 768, Nyquist bin dropped -> 512 bins;
- 128-frame patches with overlap, and their weighted overlap-add back into a spectrogram;
- per-patch normalisation and the oracle mask |target| / |mixture| clipped to [0, 1];
- the datasets: MUSDB18 (stems or HQ wav, decoded once and cached at 8192 Hz), the 7-second
  preview download, and a built-in synthetic multitrack set that needs nothing at all;
- training batches: random remixes of vocals and accompaniment with random gains and channels.

`python data_generator.py` is a sanity check: it finds the dataset train.py would use, prints
shapes and value ranges, and saves a PNG of one patch.
"""
import argparse
import hashlib
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

# -----------------------------------------------------------------------------
# the spectrogram settings of the paper; checkpoints store them and inference checks them
SAMPLE_RATE = 8192  # Hz: the network sees audio up to 4096 Hz
N_FFT = 1024  # Hann window length in samples
HOP_LENGTH = 768  # samples between frames
N_BINS = N_FFT // 2  # 512: the Nyquist bin is dropped so the U-Net halves it cleanly 6 times
PATCH_FRAMES = 128  # frames per network input (about 12 s)
PATCH_SAMPLES = (PATCH_FRAMES - 1) * HOP_LENGTH + N_FFT  # samples that make one patch: 98560
NORMALISATION = "sounding_frames_mean"  # magnitudes divided by the mixture patch's mean over frames with sound
EPS = 1e-8

SPEC_CONFIG = dict(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_bins=N_BINS,
                   patch_frames=PATCH_FRAMES, normalisation=NORMALISATION)
STEMS = ("vocals", "accompaniment")  # what the separator writes; either can be the training target
REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = REPO_DIR / "cache"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
PREVIEW_DIR = REPO_DIR / "MUSDB18" / "MUSDB18-7"  # where --download puts the 7 s previews


class DataError(Exception):
    """A problem with the user's input (file, folder, dataset) that deserves one clear line."""


# -----------------------------------------------------------------------------
# audio files

def load_audio(path):
    """Read a whole audio file (wav, flac, ogg, mp3, aiff).

    Returns (audio, rate): audio is float32 of shape (channels, samples), values as stored
    (normally within [-1, 1]). Raises DataError with a one-line reason for anything unusable:
    missing, empty, not audio, truncated, corrupt, no samples, NaN or Inf.
    """
    path = Path(path)
    info = check_audio_file(path)
    with open_audio(path) as reader:
        audio = read_block(reader, path, info.frames)
    check_audio_length(path, info, audio.shape[0])
    audio = np.ascontiguousarray(audio.T)
    check_audio_samples(path, audio)
    return audio, info.samplerate


def check_audio_file(path):
    """Fail early, in one line, on a path that cannot hold audio. Returns soundfile's info."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        with quiet_stderr():
            info = sf.info(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable audio file ({short_reason(e)})") from None
    if info.frames == 0:
        raise DataError(f"{path}: contains no audio samples")
    cut = wav_truncation(path)
    if cut is not None:
        raise DataError(f"{path}: truncated WAV file (its header promises {cut[0]:,} bytes of audio, "
                        f"the file holds {cut[1]:,})")
    return info


def wav_truncation(path):
    """(declared, present) bytes of a RIFF/WAVE data chunk cut short, else None. libsndfile
    quietly plays what is left of such a file; we would rather say it is damaged."""
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        size, position = os.path.getsize(path), 12
        while position + 8 <= size:
            f.seek(position)
            chunk, length = f.read(4), int.from_bytes(f.read(4), "little")
            if chunk == b"data":
                present = size - position - 8
                streaming = length in (0, 0xFFFFFFFF)  # size unknown when written, or RF64
                return (length, present) if length > present and not streaming else None
            position += 8 + length + (length & 1)
    return None


def open_audio(path):
    """soundfile.SoundFile for reading, with decoder chatter kept off the terminal."""
    try:
        with quiet_stderr():
            return sf.SoundFile(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable audio file ({short_reason(e)})") from None


def read_block(reader, path, frames):
    """Up to `frames` samples from an open SoundFile: (samples, channels) float32."""
    try:
        with quiet_stderr():
            return reader.read(frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: corrupt audio data ({short_reason(e)})") from None


def check_audio_length(path, info, frames_read):
    """Compressed files whose data stops early decode to fewer samples than their header
    promises; more than 1 % (and 0.1 s) missing is a damaged file, not a short song."""
    missing = info.frames - frames_read
    if missing > max(0.01 * info.frames, 0.1 * info.samplerate):
        raise DataError(f"{path}: truncated or corrupt ({frames_read:,} of {info.frames:,} samples decode)")


def check_audio_samples(path, audio):
    """Reject audio a separator cannot work with: no samples, NaN or Inf."""
    if audio.shape[-1] == 0:
        raise DataError(f"{path}: contains no audio samples")
    if not np.isfinite(audio).all():
        raise DataError(f"{path}: contains NaN or infinite samples")


def short_reason(error):
    """First line of a decoder's exception message, worded for a user."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "does not exist or is not a regular file" in text:  # libsndfile's words for undecodable data
        return "format not recognised or data corrupt"
    return text.split(": ", 1)[-1].strip() if text.startswith("Error opening") else text


class quiet_stderr:
    """Silence C libraries (mpg123 prints resync notes on damaged mp3s) for a moment, so a
    bad file costs the user one line, not a screenful."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except (OSError, ValueError):
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def resample(audio, rate, new_rate, quality="HQ"):
    """Resample (channels, samples) float32 audio with soxr (high quality unless told otherwise)."""
    if rate == new_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    out = soxr.resample(np.ascontiguousarray(audio.T, dtype=np.float32), rate, new_rate, quality=quality)
    return np.ascontiguousarray(out.T)


# -----------------------------------------------------------------------------
# STFT, patches, normalisation, oracle mask

_windows = {}


def hann_window(length, device="cpu"):
    key = (length, str(device))
    if key not in _windows:
        _windows[key] = torch.hann_window(length, device=device)
    return _windows[key]


def stft(audio, center=True):
    """Complex STFT of the paper, Nyquist bin dropped.

    audio: (..., samples) float tensor at 8192 Hz.
    center=True: frame f is centred on sample f * 768, with zeros beyond both ends, and there
    are n_frames(samples) frames. Because the hop (768) exceeds half the window (512), the end
    is padded to a whole hop so the last samples still fall inside a frame.
    center=False is for callers that already hold the neighbouring samples.
    Returns (..., 512, frames) complex.
    """
    shape = audio.shape
    audio = audio.reshape(-1, shape[-1])
    if center:
        audio = torch.nn.functional.pad(audio, (0, -shape[-1] % HOP_LENGTH))
    spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=hann_window(N_FFT, audio.device),
                      center=center, pad_mode="constant", return_complex=True)
    return spec[:, :N_BINS].reshape(*shape[:-1], N_BINS, spec.shape[-1])


def istft(spec, length):
    """Inverse of stft(center=True): (..., 512, frames) complex -> (..., length) float."""
    shape = spec.shape
    spec = torch.nn.functional.pad(spec.reshape(-1, *shape[-2:]), (0, 0, 0, 1))  # Nyquist bin back
    audio = torch.istft(spec, N_FFT, HOP_LENGTH, window=hann_window(N_FFT, spec.device),
                        center=True, length=length)
    return audio.reshape(*shape[:-2], length)


def n_frames(n_samples):
    """Frames stft(center=True) gives for n_samples: enough to cover every sample."""
    return -(-n_samples // HOP_LENGTH) + 1


def patch_hop(overlap):
    """Frames between patch starts for an overlap in [0, 1): 0.5 -> 64."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return max(1, round(PATCH_FRAMES * (1 - overlap)))


def n_patches(frames, hop):
    """Patches of PATCH_FRAMES on a grid of `hop` needed to cover `frames` frames (at least 1)."""
    return 1 + max(0, math.ceil((frames - PATCH_FRAMES) / hop))


def to_patches(spec, hop):
    """Cut a spectrogram into overlapping patches, zero-padding the end.

    spec: (..., bins, frames) -> (..., n_patches, bins, 128); patch p starts at frame p * hop.
    """
    frames = spec.shape[-1]
    count = n_patches(frames, hop)
    padded = torch.nn.functional.pad(spec, (0, (count - 1) * hop + PATCH_FRAMES - frames))
    return padded.unfold(-1, PATCH_FRAMES, hop).movedim(-2, -3)


def patch_window(device="cpu"):
    """Cross-fade weights over a patch's frames: a triangle that never reaches zero, so
    neighbouring patches blend without seams and frames covered once keep their value.
    Returns (128,)."""
    position = torch.arange(PATCH_FRAMES, device=device, dtype=torch.float32) + 0.5
    return 1 - (position - PATCH_FRAMES / 2).abs() / (PATCH_FRAMES / 2) + 1 / PATCH_FRAMES


def overlap_add(patches, hop):
    """Weighted overlap-add of patches; the inverse of to_patches when followed by a division.

    patches: (..., n_patches, bins, 128) -> (total (..., bins, frames), weight (frames,)),
    frames = (n_patches - 1) * hop + 128. total / weight is the weighted mean over patches.
    """
    count = patches.shape[-3]
    window = patch_window(patches.device)
    frames = (count - 1) * hop + PATCH_FRAMES
    total = patches.new_zeros(*patches.shape[:-3], patches.shape[-2], frames)
    weight = patches.new_zeros(frames)
    for p in range(count):  # a handful of patches per call; clarity beats fold() here
        total[..., p * hop:p * hop + PATCH_FRAMES] += patches[..., p, :, :] * window
        weight[p * hop:p * hop + PATCH_FRAMES] += window
    return total, weight


def from_patches(patches, hop, frames):
    """Patches back to a spectrogram of `frames` frames: (..., n, bins, 128) -> (..., bins, frames)."""
    total, weight = overlap_add(patches, hop)
    return (total / weight)[..., :frames]


def normalise(mixture_mag, *others):
    """Divide magnitudes by the mean magnitude of each mixture patch over its frames that hold
    any sound.

    The mask the U-Net predicts should not depend on how loud the song is, so every patch is
    brought to the same level: mean 1 over the frames with sound. Frames of digital silence do
    not count, so that music keeps one level whether it fills the patch or shares it with the
    zeros that pad a song's last patch or a 7 s clip (counting them lifted a padded clip 1.75
    times above the level the network trained at, which cost 0.6 dB; README, results).
    Targets share the mixture's scale so that the L1,1 loss compares like with like; silence
    stays zero. mixture_mag: (..., 512, 128); others: same shape. Returns the scaled tensors.
    """
    sounding = (mixture_mag.amax(dim=-2, keepdim=True) > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    scale = mixture_mag.sum(dim=(-2, -1), keepdim=True) / (mixture_mag.shape[-2] * sounding) + EPS
    return tuple(m / scale for m in (mixture_mag,) + others)


def oracle_mask(target_mag, mixture_mag):
    """The ideal ratio mask the U-Net learns: |target| / |mixture| clipped to [0, 1] (0 where
    the mixture is silent)."""
    return (target_mag / (mixture_mag + EPS)).clamp(0, 1)


# -----------------------------------------------------------------------------
# datasets: every source ends as a list of Tracks with stems at 8192 Hz

@dataclass
class Track:
    """One song's stems at SAMPLE_RATE. vocals, accompaniment: (channels, samples) float32
    (memory-mapped from the cache for MUSDB18). `source` says where it came from."""
    name: str
    vocals: np.ndarray
    accompaniment: np.ndarray
    source: str = ""

    def stem(self, name):
        return self.vocals if name == "vocals" else self.accompaniment

    @property
    def mixture(self):
        return self.vocals + self.accompaniment


@dataclass
class DataSource:
    """Which dataset train.py uses: kind is 'musdb' or 'synthetic'."""
    kind: str
    root: Path = None
    is_wav: bool = False

    def describe(self):
        if self.kind == "synthetic":
            return "built-in SYNTHETIC multitrack set (generated in code, not real music)"
        layout = "MUSDB18-HQ wav" if self.is_wav else "MUSDB18 .stem.mp4"
        return f"{layout} at {self.root}"


def musdb_layout(root):
    """(is_wav, n_tracks) of a MUSDB18 folder (train/ and test/ inside), or None if it holds
    no tracks in either layout."""
    root = Path(root)
    stems = [p for sub in ("train", "test") for p in (root / sub).glob("*.stem.mp4")]
    if stems:
        return False, len(stems)
    wavs = [p for sub in ("train", "test") for p in (root / sub).glob("*/mixture.wav")]
    if wavs:
        return True, len(wavs)
    return None


def find_data_source(musdb_root=None, download=False, synthetic=False, interactive=None):
    """Pick the dataset, in this order: --musdb-root; MUSDB18/musdb18 (or musdb18hq, or an
    earlier preview download) inside the repo; the 7-second previews via musdb's download
    (asked on an interactive terminal, or forced by --download); the synthetic set.
    Prints what it chose and why. Returns a DataSource."""
    if synthetic:
        return DataSource("synthetic")
    if musdb_root is not None:
        root = Path(musdb_root).expanduser()
        if not root.is_dir():
            raise DataError(f"--musdb-root {root}: no such folder")
        layout = musdb_layout(root)
        if layout is None:
            raise DataError(f"--musdb-root {root}: no MUSDB18 tracks found (expected train/ and "
                            f"test/ holding *.stem.mp4 files or track folders with mixture.wav)")
        return DataSource("musdb", root, layout[0])
    for root in (REPO_DIR / "MUSDB18" / "musdb18", REPO_DIR / "MUSDB18" / "musdb18hq", PREVIEW_DIR):
        layout = musdb_layout(root)
        if layout is not None:
            return DataSource("musdb", root, layout[0])
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not download and interactive:
        answer = input("No MUSDB18 found in MUSDB18/musdb18. Download the 7-second preview set "
                       "(about 140 MB) with musdb? [y/N] ").strip().lower()
        download = answer in ("y", "yes")
    if download:
        if download_previews(PREVIEW_DIR):
            return DataSource("musdb", PREVIEW_DIR, False)
    print("No MUSDB18 dataset found (see README, 'Using MUSDB18'): falling back to the built-in "
          "SYNTHETIC multitrack set.")
    return DataSource("synthetic")


def download_previews(root):
    """Download MUSDB18's 7-second previews with musdb. Returns True on success; on failure
    prints one line and removes what it created."""
    import musdb
    root = Path(root)
    existed = root.exists()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        musdb.DB(root=str(root), download=True)
        return musdb_layout(root) is not None
    except Exception as e:
        print(f"Download of the MUSDB18 previews failed ({short_reason(e)}); are you offline?")
        if not existed and root.exists() and musdb_layout(root) is None:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
        return False
    finally:
        socket.setdefaulttimeout(old_timeout)


def musdb_tracks(source, subset="train", split=None):
    """The musdb Track objects of a MUSDB18 folder; split is 'train', 'valid' or None (all)."""
    require_ffmpeg("by musdb even for WAV stems" if source.is_wav else "to decode MUSDB18's .stem.mp4 files")
    import musdb
    kwargs = dict(root=str(source.root), subsets=subset, is_wav=source.is_wav)
    if split is not None and subset == "train":
        kwargs["split"] = split
    return list(musdb.DB(**kwargs))


def require_ffmpeg(why):
    """musdb imports stempeg, which raises at import unless both ffmpeg and ffprobe are on PATH
    (also for WAV stems, and museval imports musdb): fail with one clear line instead."""
    import shutil
    missing = [p for p in ("ffmpeg", "ffprobe") if shutil.which(p) is None]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found, needed {why} "
                        "(Debian/Ubuntu: sudo apt-get install ffmpeg; macOS: brew install ffmpeg)")


def cache_key(path, *settings):
    """A key that changes whenever the file or the settings change."""
    stat = Path(path).stat()
    text = "|".join(map(str, (Path(path).resolve(), stat.st_size, stat.st_mtime_ns) + settings))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cached_musdb_track(mtrack, cache_dir):
    """Stems of one musdb track at SAMPLE_RATE, decoded and resampled once, then memory-mapped
    from cache_dir. Returns a Track with (2, samples) arrays."""
    path = Path(mtrack.path)
    key = cache_key(path, SAMPLE_RATE, "soxr-HQ", "v1")
    folder = Path(cache_dir) / f"{safe_name(mtrack.name)}-{key}"
    files = {name: folder / f"{name}.npy" for name in STEMS}
    if not all(f.exists() for f in files.values()):
        audio, rate = musdb_stems(mtrack), mtrack.rate
        folder.mkdir(parents=True, exist_ok=True)
        for name, f in files.items():  # a killed run never leaves a half-written cache entry
            atomic_write(f, lambda tmp: np.save(tmp, resample(audio[name], rate, SAMPLE_RATE)), suffix=".npy")
    arrays = {name: np.load(f, mmap_mode="r") for name, f in files.items()}
    return Track(mtrack.name, arrays["vocals"], arrays["accompaniment"], source=str(path))


def musdb_stems(mtrack):
    """The stems of one musdb track at its own rate: {'mixture', 'vocals', 'accompaniment'}, each
    (channels, samples) float32. MUSDB18 stores mixture, drums, bass, other, vocals; the
    accompaniment is drums + bass + other."""
    stems = np.asarray(mtrack.stems, dtype=np.float32)  # (5, samples, channels)
    return {"mixture": stems[0].T.copy(), "vocals": stems[4].T.copy(),
            "accompaniment": (stems[1] + stems[2] + stems[3]).T.copy()}


def partial_path(path, suffix=""):
    """Where a file is written before it is renamed into place: hidden, beside it, per process
    (torchrun ranks may fill the same cache together)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")


def atomic_write(path, write, suffix=""):
    """write(tmp) to a temporary file beside path, then rename it into place: whoever reads path
    sees the old file or the new one whole, never half of one, also when the run is killed.
    suffix: an ending the writer insists on (np.save appends .npy otherwise)."""
    tmp = partial_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safe_name(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def load_tracks(source, split, n_songs=None, cache_dir=DEFAULT_CACHE_DIR, seed=0, progress=True):
    """Tracks of a split ('train', 'valid' or 'test') at SAMPLE_RATE.

    For MUSDB18, 'train' and 'valid' are musdb's standard split of its train subset and 'test'
    its test subset. n_songs caps the number of tracks (the first ones, in musdb's order);
    asking for more than exist uses all of them and says so.
    """
    if source.kind == "synthetic":
        count = n_songs if n_songs is not None else SYNTHETIC_SPLIT_SIZES[split]
        return [synthetic_track(split, i, seed) for i in range(count)]
    subset, musdb_split = ("test", None) if split == "test" else ("train", split)
    mtracks = musdb_tracks(source, subset, musdb_split)
    if n_songs is not None and n_songs > len(mtracks):
        print(f"--n-songs {n_songs}: only {len(mtracks)} {split} tracks exist in {source.root}; "
              f"using all {len(mtracks)}.")
    mtracks = mtracks[:n_songs] if n_songs is not None else mtracks
    from tqdm import tqdm
    todo = tqdm(mtracks, desc=f"loading {split} tracks", unit="track", disable=not progress,
                leave=False)
    return [cached_musdb_track(t, cache_dir) for t in todo]


# -----------------------------------------------------------------------------
# the built-in synthetic multitrack set: a singer over drums, bass and chords

SYNTHETIC_SPLIT_SIZES = {"train": 10, "valid": 6, "test": 4}
SYNTHETIC_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
SYNTHETIC_SECONDS = 20.0
# (F1, F2, F3) in Hz of five sung vowels, and their bandwidths
VOWELS = np.array([[800, 1150, 2800], [400, 1700, 2600], [300, 2100, 3000],
                   [450, 800, 2830], [325, 700, 2530]], dtype=np.float64)
FORMANT_BANDWIDTHS = np.array([80.0, 90.0, 120.0])
FORMANT_GAINS = np.array([1.0, 0.5, 0.25])


def synthetic_track(split, index, seed=0, rate=SAMPLE_RATE, seconds=SYNTHETIC_SECONDS):
    """One synthetic song, the same for the same (split, index, seed) on every machine.

    Returns a Track with stereo (2, samples) vocals and accompaniment at `rate`.
    """
    rng = np.random.default_rng([seed, SYNTHETIC_SPLIT_IDS[split], index])
    n = int(seconds * rate)
    song = synthetic_song_plan(rng)
    vocals = synth_voice(rng, song, n, rate)
    drums = synth_drums(rng, song, n, rate)
    bass = synth_bass(rng, song, n, rate)
    chords = synth_chords(rng, song, n, rate)
    stems = [(vocals, 0.12, rng.uniform(-0.15, 0.15))]
    stems += [(drums, rng.uniform(0.08, 0.16), rng.uniform(-0.3, 0.3)),
              (bass, rng.uniform(0.06, 0.12), rng.uniform(-0.1, 0.1)),
              (chords, rng.uniform(0.05, 0.1), rng.uniform(-0.6, 0.6))]
    stereo = [pan(level_rms(x, rms), position) for x, rms, position in stems]
    accompaniment = stereo[1] + stereo[2] + stereo[3]
    peak = np.abs(stereo[0] + accompaniment).max()
    scale = min(1.0, 0.9 / peak)  # leave headroom, as a mastered song would
    name = f"synthetic-{split}-{index:03d}"
    return Track(name, (stereo[0] * scale).astype(np.float32), (accompaniment * scale).astype(np.float32),
                 source="synthetic")


def synthetic_song_plan(rng):
    """Tempo, key and chord progression shared by all parts of one song."""
    beat = 60.0 / rng.uniform(80, 140)
    root = int(rng.integers(40, 52))  # MIDI note of the key's bass root (E2..D#3)
    scale = [0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.6 else [0, 2, 3, 5, 7, 8, 10]
    degrees = rng.choice([0, 3, 4, 5, 1], size=4, replace=True)
    degrees[0] = 0
    return dict(beat=beat, root=root, scale=scale, progression=degrees)


def chord_notes(song, degree):
    scale = song["scale"]
    return [song["root"] + 12 + scale[(degree + k) % 7] + 12 * ((degree + k) // 7) for k in (0, 2, 4)]


def midi_hz(note):
    return 440.0 * 2 ** ((np.asarray(note, dtype=np.float64) - 69) / 12)


def level_rms(x, rms):
    return x * (rms / (np.sqrt(np.mean(x ** 2)) + EPS))


def pan(x, position):
    """Mono (samples,) -> stereo (2, samples); position in [-1, 1], constant power."""
    angle = (position + 1) * np.pi / 4
    return np.stack([np.cos(angle) * x, np.sin(angle) * x])


def formant_gain(freq, formants):
    """Spectral envelope of a vowel at the given frequencies: sum of resonances plus a tilt.
    freq: (harmonics, samples); formants: (3, samples)."""
    gain = np.zeros_like(freq)
    for k in range(3):
        gain += FORMANT_GAINS[k] / (1 + ((freq - formants[k]) / (FORMANT_BANDWIDTHS[k] / 2)) ** 2)
    return gain + 0.02 / (1 + freq / 1000)


def synth_voice(rng, song, n, rate):
    """A singer: notes of the key with glides, vibrato and jitter; harmonics shaped by vowel
    formants that move from syllable to syllable; syllable envelopes with breathy onsets and
    rests between phrases. Returns (n,) float64."""
    t = np.arange(n) / rate
    beat = song["beat"]
    timbre = rng.uniform(0.85, 1.2)  # a lower or higher voice moves all formants
    base = song["root"] + 12 * int(rng.integers(1, 3))
    f0_note = np.full(n, np.nan)
    envelope = np.zeros(n)
    vowel_track = np.zeros((3, n))
    position, degree = rng.uniform(0, 2) * beat, int(rng.integers(0, 7))
    vowel = VOWELS[rng.integers(len(VOWELS))]
    while position < n / rate:
        phrase_end = position + beat * rng.integers(4, 12)
        while position < min(phrase_end, n / rate):
            length = beat * rng.choice([0.5, 1, 1, 1.5, 2])
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 9))
            note = base + song["scale"][degree % 7] + 12 * (degree // 7)
            a, b = int(position * rate), min(n, int((position + length) * rate))
            f0_note[a:b] = note
            seg = np.arange(b - a) / rate
            attack, release = rng.uniform(0.02, 0.06), rng.uniform(0.04, 0.1)
            env = np.minimum(1, seg / attack) * np.clip((length - seg) / release, 0, 1)
            envelope[a:b] = env * rng.uniform(0.6, 1.0)
            new_vowel = VOWELS[rng.integers(len(VOWELS))] * timbre
            ramp = np.clip(seg / 0.08, 0, 1)  # formants glide into the new vowel
            vowel_track[:, a:b] = vowel[:, None] * (1 - ramp) + new_vowel[:, None] * ramp
            vowel = new_vowel
            position += length
        position += beat * rng.choice([1, 2, 3])  # a rest to breathe
    sung = ~np.isnan(f0_note)
    # hold the last pitch through rests so glides start from where the voice was
    idx = np.where(sung, np.arange(n), 0)
    np.maximum.accumulate(idx, out=idx)
    f0_note = np.where(sung, f0_note, f0_note[idx])
    f0_note = np.nan_to_num(f0_note, nan=base)
    glide = max(1, int(rng.uniform(0.03, 0.07) * rate))
    pitch = np.convolve(np.pad(f0_note, (glide, glide), mode="edge"), np.ones(glide) / glide, "same")[glide:-glide]
    vibrato_rate, vibrato_depth = rng.uniform(4.8, 6.5), rng.uniform(0.2, 0.6)
    vibrato = vibrato_depth * np.sin(2 * np.pi * vibrato_rate * t + rng.uniform(0, 6.3))
    vibrato *= np.clip(np.convolve(envelope > 0.5, np.ones(int(0.3 * rate)) / (0.3 * rate), "same"), 0, 1)
    jitter = np.convolve(rng.standard_normal(n), np.ones(int(0.05 * rate)) / (0.05 * rate) ** 0.5, "same") * 0.03
    f0 = midi_hz(pitch + vibrato + jitter)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    n_harmonics = int(min(40, (rate / 2 - 50) / f0.min()))
    h = np.arange(1, n_harmonics + 1)[:, None]
    freq = h * f0[None]
    amp = formant_gain(freq, vowel_track) * (freq < min(rate / 2 - 50, 10000))
    voice = np.sum(amp * np.sin(h * phase[None] + rng.uniform(0, 6.3, size=(n_harmonics, 1))), axis=0)
    breath = np.diff(rng.standard_normal(n + 1)) * 0.02  # high-frequency air, strongest at onsets
    onset = np.clip(np.diff(envelope, prepend=0) * rate * 0.05, 0, 1)
    onset = np.convolve(onset, np.ones(int(0.04 * rate)), "same")
    return voice * envelope + breath * (0.3 * envelope + np.clip(onset, 0, 1))


def synth_drums(rng, song, n, rate):
    """Kick on 1 and 3, snare on 2 and 4, hi-hats on eighths, with a little humanising."""
    beat = song["beat"]
    out = np.zeros(n)
    kick_len, snare_len, hat_len = int(0.3 * rate), int(0.2 * rate), int(0.06 * rate)
    tk = np.arange(kick_len) / rate
    kick = np.sin(2 * np.pi * np.cumsum(45 + 90 * np.exp(-tk / 0.03)) / rate) * np.exp(-tk / 0.12)
    ts = np.arange(snare_len) / rate
    th = np.arange(hat_len) / rate
    step = 0
    while step * beat / 2 < n / rate:
        start = int((step * beat / 2 + rng.normal(0, 0.004)) * rate)
        if step % 4 == 0 or (step % 8 == 7 and rng.random() < 0.3):
            add_at(out, kick, start)
        if step % 4 == 2:
            snare = (rng.standard_normal(snare_len) * 0.6 + np.sin(2 * np.pi * 185 * ts)) * np.exp(-ts / 0.06)
            add_at(out, snare, start)
        hat = np.diff(rng.standard_normal(hat_len + 1)) * np.exp(-th / 0.015) * rng.uniform(0.15, 0.3)
        add_at(out, hat, start)
        step += 1
    return out


def synth_bass(rng, song, n, rate):
    """The chord root an octave down, plucked on a rhythm of eighths and quarters."""
    beat = song["beat"]
    out = np.zeros(n)
    position, bar = 0.0, 0
    pattern = rng.choice([[1, 1, 1, 1], [1.5, 0.5, 1, 1], [0.5, 0.5, 1, 2]])
    while position < n / rate:
        degree = song["progression"][bar % len(song["progression"])]
        root = song["root"] + song["scale"][degree % 7]
        for length in pattern:
            length *= beat
            m = int(length * rate)
            t = np.arange(m) / rate
            f = midi_hz(root + (12 if rng.random() < 0.15 else 0))
            h = np.arange(1, 9)[:, None]
            tone = np.sum(np.sin(2 * np.pi * h * f * t) / h ** 1.5 * (h * f < rate / 2 - 50), axis=0)
            add_at(out, tone * np.exp(-t / 0.35) * np.minimum(1, t / 0.005), int(position * rate))
            position += length
        bar += 1
    return out


def synth_chords(rng, song, n, rate):
    """Sustained triads, one per bar, with soft attacks and a little detune."""
    bar = 4 * song["beat"]
    out = np.zeros(n)
    for k in range(int(np.ceil(n / rate / bar))):
        degree = song["progression"][k % len(song["progression"])]
        m = int(bar * rate)
        t = np.arange(m) / rate
        env = np.minimum(1, t / 0.15) * np.clip((bar - t) / 0.2, 0, 1)
        chord = np.zeros(m)
        for note in chord_notes(song, degree):
            f = midi_hz(note) * (1 + rng.normal(0, 0.002))
            h = np.arange(1, 7)[:, None]
            chord += np.sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6.3)) / h ** 2 * (h * f < rate / 2 - 50), axis=0)
        add_at(out, chord * env, int(k * bar * rate))
    return out


def add_at(out, x, start):
    start = max(0, start)
    end = min(len(out), start + len(x))
    if end > start:
        out[start:end] += x[:end - start]


# -----------------------------------------------------------------------------
# training examples: random remixes cut into patches

SPEED_RANGE = (0.85, 1.15)


def augment_gain(audio, rng, low=0.25, high=1.25):
    """Scale a source by a random gain (open-unmix's range)."""
    return audio * rng.uniform(low, high)


def augment_channel(audio, rng):
    """Pick the left or the right channel at random: the mono network's channel swap."""
    return audio[rng.integers(audio.shape[0])]


def random_start(total, rng, length=PATCH_SAMPLES):
    """Start sample of a random excerpt of `length` from a track of `total` samples. A track
    shorter than the excerpt is used whole: the start is then negative and the track sits at
    a random offset in zeros."""
    if total >= length:
        return int(rng.integers(0, total - length + 1))
    return -int(rng.integers(0, length - total + 1))


def excerpt(audio, start, length=PATCH_SAMPLES, loop=False):
    """Samples [start, start + length) of (channels, samples) audio, zero outside the track;
    with loop=True a track shorter than `length` is repeated to fill the excerpt instead.
    Returns (channels, length) float32."""
    channels, total = audio.shape
    if loop and total < length:
        repeats = -(-length // total) + 1
        audio, start = np.tile(np.asarray(audio), (1, repeats)), -start  # -start: random phase in the loop
        return np.ascontiguousarray(audio[:, start:start + length], dtype=np.float32)
    out = np.zeros((channels, length), dtype=np.float32)
    a, b = max(start, 0), min(start + length, total)
    if b > a:
        out[:, a - start:b - start] = audio[:, a:b]
    return out


def change_speed(audio, factor, length=PATCH_SAMPLES):
    """Play (channels, n) audio `factor` times faster, as a tape would (pitch and tempo
    together), and cut or pad the result to `length` samples."""
    # the rates only set the ratio; LQ is plenty for augmentation
    out = resample(audio, audio.shape[1], length * audio.shape[1] / (length * factor), quality="LQ")[:, :length]
    return np.ascontiguousarray(np.pad(out, ((0, 0), (0, length - out.shape[1]))), dtype=np.float32)


SHORT_TRACKS = ("fill", "pad", "loop")


def draw_sources(tracks, rng, remix=True, speed=True):
    """The tracks and speed factors of one remix: ([vocals track, accompaniment track],
    [factor, factor]). remix: independent tracks and speeds; otherwise one song as mixed, both
    sources at one speed so that they stay in step."""
    if remix:
        return ([tracks[rng.integers(len(tracks))] for _ in STEMS],
                [rng.uniform(*SPEED_RANGE) if speed else 1.0 for _ in STEMS])
    return [tracks[rng.integers(len(tracks))]] * len(STEMS), [rng.uniform(*SPEED_RANGE) if speed else 1.0] * len(STEMS)


def clip_at_speed(audio, factor, rng, room, channel_swap=True):
    """One source of a filled patch, played `factor` times as fast, from a random channel (else
    the left one), and no longer than the `room` samples left in the patch: a short track from
    its beginning (whole if it fits), a track longer than a patch from a random offset. Only
    what fits is resampled. audio: (channels, samples) -> (n,) float32, n <= room."""
    total = audio.shape[1]
    start = random_start(total, rng, math.ceil(PATCH_SAMPLES * factor)) if total / factor > PATCH_SAMPLES else 0
    length = min(total - start, math.ceil(room * factor))
    part = np.asarray(audio[:, start:start + length], dtype=np.float32)
    part = augment_channel(part, rng) if channel_swap else part[0]
    if factor != 1.0:  # as change_speed, but keeping the length the resampler gives: no padding
        part = resample(part[None], length, length / factor, quality="LQ")[0]
    return np.ascontiguousarray(part[:room], dtype=np.float32)


def filled_remix(tracks, rng, remix=True, gain=False, channel_swap=True, speed=True):
    """One example built from short clips laid end to end, so that the patch holds music
    throughout instead of one 7 s clip in 12 s of silence. Each segment is a remix: vocals and
    accompaniment clips from their own tracks, at their own speeds, starting together; the next
    segment begins where the longer of the two ends, and the last is cut at the patch's end.
    Returns (vocals, accompaniment), each (PATCH_SAMPLES,) float32."""
    out = np.zeros((len(STEMS), PATCH_SAMPLES), dtype=np.float32)
    position = 0
    while position < PATCH_SAMPLES:
        picks, factors = draw_sources(tracks, rng, remix, speed)
        clips = [clip_at_speed(track.stem(name), factor, rng, PATCH_SAMPLES - position, channel_swap)
                 for name, track, factor in zip(STEMS, picks, factors)]
        for row, clip in zip(out, clips):
            row[position:position + len(clip)] = augment_gain(clip, rng) if gain else clip
        position += max(len(clip) for clip in clips)
    return out[0], out[1]


def random_remix(tracks, rng, remix=True, gain=False, channel_swap=True, short_tracks="fill", speed=True):
    """One mono training example of PATCH_SAMPLES samples: (vocals, accompaniment) float32.

    remix: vocals and accompaniment from independently drawn tracks and offsets, so examples
    are not limited to the songs as mixed; otherwise one excerpt of one song. gain: each source
    scaled at random. channel_swap: each source from a random channel, else the left one.
    short_tracks: what fills a patch when the drawn tracks are shorter than it: "fill" lays
    further remixes after them (filled_remix), "pad" leaves silence, "loop" repeats each track.
    speed: each source played 0.85-1.15 times as fast (about +-2.5 semitones and tempo).
    The defaults are train.py's, chosen by measurement (see README, Results).
    """
    if short_tracks not in SHORT_TRACKS:
        raise ValueError(f"short_tracks must be one of {SHORT_TRACKS}, got {short_tracks!r}")
    loop = short_tracks == "loop"
    picks, factors = draw_sources(tracks, rng, remix, speed)
    # samples to read so that a source fills the patch after its speed change
    lengths = [int(np.ceil(PATCH_SAMPLES * f)) for f in factors]
    # duration of each source in the patch, after its speed change
    spans = [int(np.ceil(t.vocals.shape[1] / f)) for t, f in zip(picks, factors)]
    if short_tracks == "fill" and max(spans) < PATCH_SAMPLES:
        return filled_remix(tracks, rng, remix, gain, channel_swap, speed)
    if not remix and (spans[0] >= PATCH_SAMPLES or loop):
        starts = [random_start(picks[0].vocals.shape[1], rng, lengths[0])] * len(STEMS)
    elif max(spans) < PATCH_SAMPLES and not loop:
        # clips shorter than a patch share one position in it, so they overlap as in a real song;
        # the position is in patch samples, and each source's read offset is scaled by its speed
        position = int(rng.integers(0, PATCH_SAMPLES - max(spans) + 1))
        starts = [-int(round(position * f)) for f in factors]
    else:
        starts = [random_start(t.vocals.shape[1], rng, n) for t, n in zip(picks, lengths)]
    stems = []
    for name, track, start, factor, length in zip(STEMS, picks, starts, factors, lengths):
        part = excerpt(track.stem(name), start, length, loop=loop)
        part = augment_channel(part, rng) if channel_swap else part[0]
        if speed:
            part = change_speed(part[None], factor)[0]
        if gain:
            part = augment_gain(part, rng)
        stems.append(part)
    return stems[0], stems[1]


def training_batch(tracks, batch_size, rng, **augment):
    """Waveforms of a batch of random examples (see random_remix for `augment`):
    (vocals, accompaniment), each (batch, PATCH_SAMPLES) float32 numpy arrays."""
    pairs = [random_remix(tracks, rng, **augment) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def patch_spectrograms(vocals, accompaniment, target="vocals"):
    """Network input and loss target of a batch of patch-length waveforms.

    vocals, accompaniment: (batch, PATCH_SAMPLES) tensors (any device).
    Returns (mixture, target) normalised magnitudes, each (batch, 1, 512, 128).
    """
    mixture_mag = stft(vocals + accompaniment, center=False).abs()
    target_mag = stft(vocals if target == "vocals" else accompaniment, center=False).abs()
    mixture_mag, target_mag = normalise(mixture_mag, target_mag)
    return mixture_mag.unsqueeze(1), target_mag.unsqueeze(1)


def validation_patches(track, target="vocals", overlap=0.5):
    """Every patch of every channel of one track as mixed, on inference's patch grid.
    Returns (mixture, target) normalised magnitudes, each (n, 1, 512, 128)."""
    hop = patch_hop(overlap)
    vocals = torch.from_numpy(np.array(track.vocals, dtype=np.float32))  # a copy: the cache is read-only
    accompaniment = torch.from_numpy(np.array(track.accompaniment, dtype=np.float32))
    mixture_mag = to_patches(stft(vocals + accompaniment).abs(), hop).flatten(0, 1)
    target_mag = to_patches(stft(vocals if target == "vocals" else accompaniment).abs(), hop).flatten(0, 1)
    mixture_mag, target_mag = normalise(mixture_mag, target_mag)
    return mixture_mag.unsqueeze(1), target_mag.unsqueeze(1)


# -----------------------------------------------------------------------------
# sanity check

def save_patch_picture(mixture, target, mask, path, title=""):
    """PNG of one patch: mixture and target magnitudes (dB) and the oracle mask. Each (512, 128)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    seconds = PATCH_FRAMES * HOP_LENGTH / SAMPLE_RATE
    extent = (0, seconds, 0, SAMPLE_RATE / 2)
    for ax, image, name in ((axes[0], mixture, "mixture |X| (dB)"), (axes[1], target, "target |Y| (dB)")):
        db = 20 * np.log10(np.asarray(image) + 1e-4)
        im = ax.imshow(db, origin="lower", aspect="auto", extent=extent, vmin=db.max() - 80, vmax=db.max(), cmap="magma")
        ax.set_title(name)
        fig.colorbar(im, ax=ax)
    im = axes[2].imshow(np.asarray(mask), origin="lower", aspect="auto", extent=extent, vmin=0, vmax=1, cmap="viridis")
    axes[2].set_title("oracle mask |Y| / |X|")
    fig.colorbar(im, ax=axes[2])
    for ax in axes:
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("frequency (Hz)")
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Sanity check of the data pipeline: finds the "
                                     "dataset train.py would use, prints shapes, value ranges and "
                                     "oracle-mask statistics, and saves a PNG of one patch.")
    parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (default: MUSDB18/musdb18 "
                        "in the repo, else the preview download, else the synthetic set)")
    parser.add_argument("--download", action="store_true", help="download the 7 s previews without asking")
    parser.add_argument("--synthetic", action="store_true", help="use the built-in synthetic set")
    parser.add_argument("--target", default="vocals", choices=STEMS, help="source the mask extracts (default: vocals)")
    parser.add_argument("--n-songs", type=int, default=10, help="training tracks to load (default: 10)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded-audio cache (default: cache/)")
    parser.add_argument("--output", default="data_sanity_check.png", help="PNG to write (default: data_sanity_check.png)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()

    source = find_data_source(args.musdb_root, args.download, args.synthetic)
    print(f"dataset: {source.describe()}")
    train = load_tracks(source, "train", args.n_songs, args.cache_dir, args.seed)
    valid = load_tracks(source, "valid", None, args.cache_dir, args.seed)
    seconds = [t.vocals.shape[1] / SAMPLE_RATE for t in train]
    print(f"tracks: {len(train)} train, {len(valid)} valid; train lengths {min(seconds):.1f}-{max(seconds):.1f} s "
          f"({min(n_frames(t.vocals.shape[1]) for t in train)}-{max(n_frames(t.vocals.shape[1]) for t in train)} frames)")
    print(f"STFT: {SAMPLE_RATE} Hz, Hann {N_FFT}, hop {HOP_LENGTH}, {N_BINS} bins; "
          f"patch {N_BINS} x {PATCH_FRAMES} frames = {PATCH_SAMPLES} samples ({PATCH_SAMPLES / SAMPLE_RATE:.1f} s)")

    rng = np.random.default_rng(args.seed)
    vocals, accompaniment = training_batch(train, 16, rng)
    mixture, target = patch_spectrograms(torch.from_numpy(vocals), torch.from_numpy(accompaniment), args.target)
    mask = oracle_mask(target, mixture)
    print(f"training batch (random remixes): mixture {tuple(mixture.shape)}, target {tuple(target.shape)}")
    print(f"  normalised mixture: min {mixture.min():.3f} mean {mixture.mean():.3f} max {mixture.max():.2f}")
    print(f"  normalised target:  min {target.min():.3f} mean {target.mean():.3f} max {target.max():.2f}")
    print(f"  oracle mask: mean {mask.mean():.3f} std {mask.std():.3f} (range {mask.min():.2f}-{mask.max():.2f})")
    pairs = [validation_patches(t, args.target) for t in valid]
    v_mix, v_target = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    v_mask = oracle_mask(v_target, v_mix)
    print(f"validation set (songs as mixed): {tuple(v_mix.shape)}; oracle mask mean {v_mask.mean():.3f} std {v_mask.std():.3f}")
    print(f"  L1,1 loss of the oracle mask: {(v_mask * v_mix - v_target).abs().mean():.4f}; "
          f"of mask=0.5: {(0.5 * v_mix - v_target).abs().mean():.4f}; of mask=1: {(v_mix - v_target).abs().mean():.4f}")

    i = int(target.mean(dim=(1, 2, 3)).argmax())  # the patch with the most target energy
    save_patch_picture(mixture[i, 0], target[i, 0], mask[i, 0], args.output, f"{source.describe()} - one training patch")
    print(f"saved {Path(args.output).resolve()}")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
