"""Audio -> tensors for the U-Net singing-voice separator (Jansson et al., ISMIR 2017), shared by the
scripts: audio files; the paper's STFT in patches; normalisation and the oracle mask; the datasets
(MUSDB18 decoded once and cached, its previews, synthetic.py's set); training batches of random
remixes. musdb refuses to import without ffmpeg, so only the functions that decode MUSDB18 import
it. `python data_generator.py` is a sanity check of all this, with a PNG of one patch.
"""
import argparse
import contextlib
import copy
import hashlib
import math
import os
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from tqdm import tqdm

# the paper's spectrogram settings; checkpoints store them and inference checks them ---------------
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


def warn(message):
    """One line on stderr, so that warnings never mix with a script's results on stdout."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# audio files --------------------------------------------------------------------------------------

def load_audio(path):
    """A whole audio file: (audio (channels, samples) float32 as stored, rate). Raises DataError in
    one line for anything unusable: missing, empty, not audio, truncated, corrupt, NaN or Inf."""
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
    with decoding(path):
        info = sf.info(str(path))
    if info.frames == 0:
        raise DataError(f"{path}: contains no audio samples")
    if (cut := wav_truncation(path)) is not None:
        raise DataError(f"{path}: truncated WAV file (its header promises {cut[0]:,} bytes of audio, "
                        f"the file holds {cut[1]:,})")
    return info


def wav_truncation(path):
    """(declared, present) bytes of a WAV data chunk cut short, else None: libsndfile quietly
    plays what is left of such a file; we would rather say it is damaged."""
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
    with decoding(path):
        return sf.SoundFile(str(path))


def read_block(reader, path, frames):
    """Up to `frames` samples from an open SoundFile: (samples, channels) float32."""
    with decoding(path, "corrupt audio data"):
        return reader.read(frames, dtype="float32", always_2d=True)


def check_audio_length(path, info, frames_read):
    """A compressed file whose data stops early decodes to fewer samples than its header promises;
    more than 1 % (and 0.1 s) missing is a damaged file, not a short song."""
    if info.frames - frames_read > max(0.01 * info.frames, 0.1 * info.samplerate):
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


@contextlib.contextmanager
def decoding(path, problem="not a readable audio file"):
    """Run a decoder with C libraries silenced (mpg123 prints resync notes on damaged mp3s) and
    its exceptions turned into a DataError, so that a bad file costs the user one line."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError):  # no stderr to silence
        saved = None
    try:
        yield
    except Exception as e:
        raise DataError(f"{path}: {problem} ({short_reason(e)})") from None
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def resample(audio, rate, new_rate, quality="HQ"):
    """Resample (channels, samples) float32 audio with soxr (high quality unless told otherwise)."""
    if rate == new_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    out = soxr.resample(np.ascontiguousarray(audio.T, dtype=np.float32), rate, new_rate, quality=quality)
    return np.ascontiguousarray(out.T)


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
    input it never saw, and the masks of short clips such as the 7 s previews would suffer (RESULTS.md)."""
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


def overlap_add(patches, hop):
    """Weighted overlap-add, the inverse of to_patches once divided: patches (..., n, bins, 128)
    -> total (..., bins, frames) and weight (frames,), frames = (n - 1) * hop + 128."""
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
    """Divide magnitudes (..., 512, 128) by the mixture patch's mean over frames with sound, so that the mask
    ignores loudness and zeros padding a short clip; targets share the mixture's scale for the L1,1 loss."""
    sounding = (mixture_mag.amax(dim=-2, keepdim=True) > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    scale = mixture_mag.sum(dim=(-2, -1), keepdim=True) / (mixture_mag.shape[-2] * sounding) + EPS
    return tuple(m / scale for m in (mixture_mag,) + others)


def oracle_mask(target_mag, mixture_mag):
    """The ideal ratio mask the U-Net learns: |target| / |mixture| clipped to [0, 1], 0 where the
    mixture is silent; any shape."""
    return (target_mag / (mixture_mag + EPS)).clamp(0, 1)


# datasets: every source ends as a list of Tracks with stems at 8192 Hz ----------------------------

@dataclass
class Track:
    """One song's stems at SAMPLE_RATE, vocals and accompaniment each (channels, samples) float32
    (memory-mapped from the cache for MUSDB18); `source` says where it came from."""
    name: str
    vocals: np.ndarray
    accompaniment: np.ndarray
    source: str = ""
    gains: tuple = (1.0, 1.0)  # what training remixes multiply (vocals, accompaniment) by: see match_levels

    @property
    def mixture(self):
        return self.vocals + self.accompaniment

    def gain(self, stem):
        return self.gains[STEMS.index(stem)]


@dataclass
class DataSource:
    """Which dataset train.py uses: kind is 'musdb', 'synthetic' or 'stems' (stems folders alone); stems: the
    --stems folders, also beside MUSDB18 or the synthetic set."""
    kind: str
    root: Path = None
    is_wav: bool = False
    stems: tuple = ()

    def describe(self):
        folders = ", ".join(f"stems folder {folder}" for folder in self.stems)
        if self.kind == "stems":
            return folders
        if self.kind == "synthetic":
            text = "built-in SYNTHETIC multitrack set (generated in code, not real music)"
        else:
            text = f"{'MUSDB18-HQ wav' if self.is_wav else 'MUSDB18 .stem.mp4'} at {self.root}"
        return f"{text} + {folders}" if folders else text


def musdb_layout(root):
    """is_wav of a MUSDB18 folder (train/ and test/ holding tracks), None if it holds no tracks."""
    for is_wav, pattern in ((False, "*.stem.mp4"), (True, "*/mixture.wav")):
        if any(p for sub in ("train", "test") for p in (Path(root) / sub).glob(pattern)):
            return is_wav
    return None


def find_data_source(musdb_root=None, download=False, synthetic=False, interactive=None, stems=()):
    """The dataset, first found of: --musdb-root; MUSDB18/musdb18, musdb18hq or an earlier preview
    download in the repo; the previews downloaded (asked on a terminal, or forced by download);
    the synthetic set, with a warning. With stems folders, MUSDB18 only where --musdb-root names it
    (or the synthetic set where asked for). Returns a DataSource."""
    stems = tuple(check_stems_folder(folder) for folder in stems)
    if synthetic:
        return DataSource("synthetic", stems=stems)
    if musdb_root is not None:
        root = Path(musdb_root).expanduser()
        if not root.is_dir():
            raise DataError(f"--musdb-root {root}: no such folder")
        if (is_wav := musdb_layout(root)) is None:
            raise DataError(f"--musdb-root {root}: no MUSDB18 tracks found (expected train/ and "
                            f"test/ holding *.stem.mp4 files or track folders with mixture.wav)")
        return DataSource("musdb", root, is_wav, stems)
    if stems:
        return DataSource("stems", stems=stems)
    for root in (REPO_DIR / "MUSDB18" / "musdb18", REPO_DIR / "MUSDB18" / "musdb18hq", PREVIEW_DIR):
        if (is_wav := musdb_layout(root)) is not None:
            return DataSource("musdb", root, is_wav)
    if not download and (sys.stdin.isatty() and sys.stdout.isatty() if interactive is None else interactive):
        answer = input("No MUSDB18 found in MUSDB18/musdb18. Download the 7-second preview set "
                       "(about 140 MB) with musdb? [y/N] ").strip().lower()
        download = answer in ("y", "yes")
    if download and download_previews(PREVIEW_DIR):
        return DataSource("musdb", PREVIEW_DIR, False)
    warn("no MUSDB18 dataset found (README, Data): using the built-in SYNTHETIC set")
    return DataSource("synthetic")


def download_previews(root):
    """Download MUSDB18's 7-second previews with musdb: True on success; on failure, warn and remove what it made."""
    import musdb
    root, old_timeout, existed = Path(root), socket.getdefaulttimeout(), Path(root).exists()
    socket.setdefaulttimeout(30)  # a dead network fails in seconds, not minutes
    try:
        musdb.DB(root=str(root), download=True)
        return musdb_layout(root) is not None
    except Exception as e:
        warn(f"download of the MUSDB18 previews failed ({short_reason(e)}); are you offline?")
        if not existed and root.exists() and musdb_layout(root) is None:
            shutil.rmtree(root, ignore_errors=True)
        return False
    finally:
        socket.setdefaulttimeout(old_timeout)


def musdb_tracks(source, subset="train", split=None):
    """The musdb Track objects of a MUSDB18 folder; split is 'train', 'valid' or None (all)."""
    require_ffmpeg("by musdb even for WAV stems" if source.is_wav else "to decode MUSDB18's .stem.mp4 files")
    import musdb
    split = split if subset == "train" else None  # musdb splits only its train subset
    return list(musdb.DB(root=str(source.root), subsets=subset, is_wav=source.is_wav, split=split))


def require_ffmpeg(why):
    """musdb (so museval too) imports stempeg, which raises unless ffmpeg and ffprobe are on PATH,
    even for WAV stems: fail with one clear line instead."""
    missing = [p for p in ("ffmpeg", "ffprobe") if shutil.which(p) is None]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found, needed {why} "
                        "(Debian/Ubuntu: sudo apt-get install ffmpeg; macOS: brew install ffmpeg)")


def cached_musdb_track(mtrack, cache_dir):
    """A Track of (2, samples) stems at SAMPLE_RATE, decoded and resampled once, then memory-mapped from cache_dir."""
    return cached_track(mtrack.name, [mtrack.path], lambda: (musdb_stems(mtrack), mtrack.rate), cache_dir)


def cached_track(name, paths, decode, cache_dir):
    """A Track whose stems decode() gives as ({stem: (channels, samples)}, rate): resampled to SAMPLE_RATE once,
    saved in cache_dir under a key that changes whenever a file or the settings change, then memory-mapped."""
    key = "|".join(f"{Path(p).resolve()}|{Path(p).stat().st_size}|{Path(p).stat().st_mtime_ns}" for p in paths)
    key += f"|{SAMPLE_RATE}|soxr-HQ|v1"
    folder = Path(cache_dir) / f"{safe_name(name)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    files = {stem: folder / f"{stem}.npy" for stem in STEMS}
    if not all(f.exists() for f in files.values()):
        audio, rate = decode()
        folder.mkdir(parents=True, exist_ok=True)
        for stem, f in files.items():  # a killed run never leaves a half-written cache entry
            atomic_write(f, lambda tmp: np.save(tmp, resample(audio[stem], rate, SAMPLE_RATE)), suffix=".npy")
    arrays = {stem: np.load(f, mmap_mode="r") for stem, f in files.items()}
    return Track(name, arrays["vocals"], arrays["accompaniment"], source=str(paths[0]))


def musdb_stems(mtrack):
    """{'mixture', 'vocals', 'accompaniment'} of a musdb track at its own rate, each (channels,
    samples) float32; the accompaniment is MUSDB18's drums + bass + other."""
    stems = np.asarray(mtrack.stems, dtype=np.float32)  # (5, samples, channels)
    return {"mixture": stems[0].T.copy(), "vocals": stems[4].T.copy(),
            "accompaniment": (stems[1] + stems[2] + stems[3]).T.copy()}


def partial_path(path, suffix=""):
    """Where a file is written before it is renamed into place: hidden, beside it, one per process
    (torchrun ranks may fill one cache together)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")


def atomic_write(path, write, suffix=""):
    """write(tmp) to a file beside path, then rename it into place: readers see the old file or
    the new one whole, also when the run is killed. suffix: an ending the writer insists on."""
    tmp = partial_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safe_name(name):
    """A file-name-safe form of a track name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


LOADERS = min(4, os.cpu_count() or 1)  # tracks read at once: a first run decodes one while another waits on ffmpeg


def load_all(load, items, desc, progress=True):
    """[load(item) for item in items], LOADERS at a time in threads: on a first run (empty cache) decoding one
    track overlaps reading and resampling another, about twice as fast on two cores (RESULTS.md, section 5). The
    first error is raised once the tracks being read are done; the rest are not started."""
    with ThreadPoolExecutor(LOADERS) as pool:  # on an error, map's iterator cancels the tracks not yet started
        return list(tqdm(pool.map(load, items), total=len(items), desc=desc, unit="track", disable=not progress,
                         leave=False))


def load_tracks(source, split, n_songs=None, cache_dir=DEFAULT_CACHE_DIR, seed=0, progress=True):
    """Tracks of 'train', 'valid' (musdb's split of its train subset) or 'test', stems (channels, samples)
    at SAMPLE_RATE; n_songs: the first so many (all, with a warning, if fewer exist). A DataSource of stems
    folders alone gives their held-apart tracks as 'valid' (see held_apart)."""
    if source.kind == "synthetic":
        from synthetic import SYNTHETIC_SPLIT_SIZES, synthetic_track  # here: synthetic.py imports this module
        count = n_songs if n_songs is not None else SYNTHETIC_SPLIT_SIZES[split]
        return [synthetic_track(split, i, seed) for i in range(count)]
    if source.kind == "stems":  # the stems folders' held-apart tracks validate a run without MUSDB18
        return [t for folder in source.stems for t in load_stems_tracks(folder, split, cache_dir, progress)]
    mtracks = musdb_tracks(source, "test") if split == "test" else musdb_tracks(source, "train", split)
    if n_songs is not None and n_songs > len(mtracks):
        warn(f"--n-songs {n_songs}: only {len(mtracks)} {split} tracks exist in {source.root}; using all")
    return load_all(lambda t: cached_musdb_track(t, cache_dir), mtracks[:n_songs], f"loading {split} tracks", progress)


def training_sources(source, n_songs=None, cache_dir=DEFAULT_CACHE_DIR, seed=0, progress=True):
    """The training tracks by source, [[Track, ...], ...]: MUSDB18 (n_songs of them) or the synthetic set first,
    then each stems folder less its held-apart tracks, their stems' levels matched to the first source's."""
    sources = [] if source.kind == "stems" else [load_tracks(source, "train", n_songs, cache_dir, seed, progress)]
    sources += [load_stems_tracks(folder, "train", cache_dir, progress) for folder in source.stems]
    return match_levels(sources)


def match_levels(sources):
    """Scale each source's stems (Track.gains) so that their median RMS over its tracks equals the first source's:
    a remix drawing MIR-1K's voice (recorded as loud as its karaoke) over MUSDB18's band then sits at MUSDB18's
    voice-to-band level. The first source keeps gains of 1."""
    def median_rms(tracks, stem):
        return float(np.median([np.sqrt(np.mean(np.square(getattr(t, stem), dtype=np.float64))) for t in tracks]))
    reference = [median_rms(sources[0], stem) for stem in STEMS]
    matched = [sources[0]]
    for tracks in sources[1:]:
        gains = tuple(ref / max(median_rms(tracks, stem), EPS) for ref, stem in zip(reference, STEMS))
        matched.append([replace(t, gains=gains) for t in tracks])
    return matched


# stems folders: a user's own multitracks, and MIR-1K ----------------------------------------------

ACCOMPANIMENT_PARTS = ("drums", "bass", "other")  # MUSDB18-HQ's stems besides vocals
HOLD_APART = 0.1  # of a stems folder's tracks, kept out of training (see held_apart)


@dataclass
class StemsEntry:
    """One track of a stems folder before decoding: its name, the files by stem, and how the accompaniment is
    made ('accompaniment', 'parts' = drums + bass + other, 'mixture' = mixture - vocals, 'mir1k' = the left
    channel of a stereo file whose right channel is the voice)."""
    name: str
    files: dict
    layout: str


def check_stems_folder(folder, flag="--stems"):
    """The Path of a stems folder, or DataError in one line."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    return folder


def stem_file(folder, stem):
    """folder/<stem>.<any audio extension>, else None."""
    return next((folder / f"{stem}{ext}" for ext in AUDIO_EXTENSIONS if (folder / f"{stem}{ext}").is_file()), None)


def stems_entries(folder, flag="--stems"):
    """Every track of a stems folder, sorted by name: folders holding vocals.* with accompaniment.*, or drums.*,
    bass.* and other.*, or mixture.*; or MIR-1K as distributed (Wavfile/*.wav, voice on the right channel)."""
    folder = check_stems_folder(folder, flag)
    wav_folder = folder if folder.name == "Wavfile" else folder / "Wavfile"
    if wav_folder.is_dir() and any(wav_folder.glob("*.wav")):
        return [StemsEntry(p.stem, {"mir1k": p}, "mir1k") for p in sorted(wav_folder.glob("*.wav"))]
    entries = []
    for track in sorted(d for d in folder.iterdir() if d.is_dir()):
        files = {stem: stem_file(track, stem) for stem in ("vocals", "accompaniment", "mixture") + ACCOMPANIMENT_PARTS}
        if files["vocals"] is None:
            continue  # not a track folder
        if files["accompaniment"] is not None:
            layout = "accompaniment"
        elif all(files[part] is not None for part in ACCOMPANIMENT_PARTS):
            layout = "parts"
        elif files["mixture"] is not None:
            layout = "mixture"
        else:
            raise DataError(f"{track}: has vocals but no accompaniment.*, mixture.* or drums/bass/other.*")
        entries.append(StemsEntry(track.name, {k: v for k, v in files.items() if v is not None}, layout))
    if not entries:
        raise DataError(f"{flag} {folder}: no tracks found (expected track folders holding vocals.* and "
                        f"accompaniment.*, mixture.* or drums/bass/other.*, or MIR-1K's Wavfile/*.wav)")
    return entries


def held_apart(names):
    """The names of a stems folder's tracks kept out of training: whole groups (the name up to its first '_':
    MIR-1K's singer) from the end of the sorted names, until at least HOLD_APART of the tracks; by single tracks
    where the groups cannot leave any for training. A fixed set, so that every run holds apart the same."""
    names = sorted(names)
    need = math.ceil(HOLD_APART * len(names)) if len(names) > 1 else 0
    groups = sorted({n.split("_")[0] for n in names})
    kept = set()
    while len(kept) < need and groups:
        group = groups.pop()
        kept |= {n for n in names if n.split("_")[0] == group}
    return kept if len(kept) < len(names) else set(names[len(names) - need:])


def read_stems(entry):
    """A stems folder's track at its own rate: ({'vocals', 'accompaniment'}, rate), stems (channels, samples)
    float32 of one shape (a mono stem is copied to the other's channels; the longer is cut to the shorter)."""
    if entry.layout == "mir1k":
        audio, rate = load_audio(entry.files["mir1k"])
        if audio.shape[0] != 2:
            raise DataError(f"{entry.files['mir1k']}: MIR-1K's files are stereo (accompaniment left, voice right)")
        return {"vocals": audio[1:], "accompaniment": audio[:1]}, rate
    vocals, rate = load_audio(entry.files["vocals"])
    parts = {"accompaniment": ["accompaniment"], "parts": list(ACCOMPANIMENT_PARTS), "mixture": ["mixture"]}[entry.layout]
    others = [load_audio(entry.files[part]) for part in parts]
    stems = [vocals] + [resample(audio, other_rate, rate) for audio, other_rate in others]
    length = min(x.shape[1] for x in stems)
    if max(x.shape[1] for x in stems) - length > rate:
        raise DataError(f"{entry.files['vocals'].parent}: its stems differ in length by more than 1 s")
    channels = max(x.shape[0] for x in stems)
    stems = [np.broadcast_to(x[:, :length], (channels, length)) for x in stems]
    accompaniment = stems[1] - stems[0] if entry.layout == "mixture" else sum(stems[1:])
    return {"vocals": np.ascontiguousarray(stems[0]), "accompaniment": np.ascontiguousarray(accompaniment)}, rate


def stems_split(folder, split, flag="--stems"):
    """The StemsEntries of a split of a stems folder: 'train' (less the held-apart tracks), 'valid' (those), 'all'."""
    entries = stems_entries(folder, flag)
    apart = held_apart([e.name for e in entries])
    if split == "all":
        return entries
    return [e for e in entries if (e.name in apart) == (split == "valid")]


def load_stems_tracks(folder, split, cache_dir=DEFAULT_CACHE_DIR, progress=True):
    """Tracks at SAMPLE_RATE of a split of a stems folder, decoded once, then memory-mapped from cache_dir."""
    def load(entry):
        return cached_track(entry.name, list(entry.files.values()), lambda: read_stems(entry), Path(cache_dir) / "stems")
    return load_all(load, stems_split(folder, split), f"loading {split} tracks of {Path(folder).name}", progress)


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
# band share key, tempo and onsets, which remixes of two songs never do (RESULTS.md, section 0).


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
    kind of music, and more singers over its bands helped there, where karaoke bands drawn alike cost (RESULTS.md,
    section 0). A run on stems folders alone draws both stems from every folder alike."""
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
    parser = argparse.ArgumentParser(description="Sanity check of the data pipeline: finds the dataset train.py "
                                     "would use, prints shapes and value ranges, and saves a PNG of one patch.")
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as every error here
    parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (default: MUSDB18/musdb18 "
                        "in the repo, else the preview download, else the synthetic set)")
    parser.add_argument("--synthetic", action="store_true", help="use the built-in synthetic set")
    parser.add_argument("--stems", action="append", default=[], metavar="DIR", help="stems folders train.py "
                        "--stems would add (repeatable)")
    parser.add_argument("--n-songs", type=int, default=10, help="MUSDB18 training tracks to load")
    parser.add_argument("--output", default="data_sanity_check.png", help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the training batch")
    args = parser.parse_args(argv)
    if args.n_songs < 1:
        parser.error(f"--n-songs must be at least 1, got {args.n_songs}")
    if not Path(args.output).parent.is_dir():
        parser.error(f"--output {args.output}: no such folder {Path(args.output).parent}")
    source = find_data_source(args.musdb_root, synthetic=args.synthetic, stems=args.stems)
    print(f"dataset: {source.describe()}")
    sources = training_sources(source, args.n_songs, seed=args.seed)
    if not all(sources):
        raise DataError(f"{source.describe()}: no training tracks")
    valid = load_tracks(source, "valid", seed=args.seed)
    for train in sources:
        lengths = [t.vocals.shape[1] for t in train]
        print(f"training source: {len(train)} tracks of {min(lengths) / SAMPLE_RATE:.1f}-{max(lengths) / SAMPLE_RATE:.1f} s "
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
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
