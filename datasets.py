"""Where the songs come from: MUSDB18 (its stems or HQ wav, or the 7 s previews), folders of stems such as MIR-1K,
and synthetic.py's set; each served as a list of Tracks at SAMPLE_RATE, decoded once into cache/ and memory-mapped
from there. The data-source flags every script shares are declared here (add_data_args). musdb refuses to import
without ffmpeg, so only the functions that read MUSDB18 import it."""
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
from tqdm import tqdm

import synthetic
from audio import AUDIO_EXTENSIONS, SAMPLE_RATE, STEMS, Track, load_audio, resample, short_reason
from utils import DataError, atomic_write, safe_name, warn

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = REPO_DIR / "cache"
PREVIEW_DIR = REPO_DIR / "MUSDB18" / "MUSDB18-7"  # where --download puts the 7 s previews
LOADERS = min(4, os.cpu_count() or 1)  # tracks read at once: a first run decodes one while another waits on ffmpeg
ACCOMPANIMENT_PARTS = ("drums", "bass", "other")  # MUSDB18-HQ's stems besides vocals
HOLD_APART = 0.1  # of a stems folder's tracks, kept out of training (see held_apart)


def add_data_args(parser, training=False):
    """The data-source flags (find_data_source); training adds those of the training scripts."""
    parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (stems or HQ wav); default: MUSDB18/musdb18 "
                        "in the repo, else the 7 s preview download, else the built-in synthetic set")
    parser.add_argument("--synthetic", action="store_true", help="use the built-in synthetic set")
    parser.add_argument("--stems", action="append", default=[], metavar="DIR", help="a folder of track folders "
                        "(vocals.* + accompaniment.*, mixture.* or drums/bass/other.*) or MIR-1K; repeatable. Training "
                        "uses it less a held-apart tenth, which validates a run without --musdb-root and evaluate.py "
                        "scores")
    if training:
        parser.add_argument("--n-songs", type=int, default=10, help="MUSDB18 training tracks to use")
        parser.add_argument("--download", action="store_true", help="download the 7 s previews without asking")
        parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="decoded 8192 Hz audio is cached here")


@dataclass
class DataSource:
    """Which dataset a script uses: kind is 'musdb', 'synthetic' or 'stems' (stems folders alone); stems: the
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
    require_ffmpeg("to decode MUSDB18's .stem.mp4 files")
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


def musdb_stems(mtrack):
    """{'mixture', 'vocals', 'accompaniment'} of a musdb track at its own rate, each (channels,
    samples) float32; the accompaniment is MUSDB18's drums + bass + other."""
    stems = np.asarray(mtrack.stems, dtype=np.float32)  # (5, samples, channels)
    return {"mixture": stems[0].T.copy(), "vocals": stems[4].T.copy(),
            "accompaniment": (stems[1] + stems[2] + stems[3]).T.copy()}


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
            atomic_write(f, lambda tmp, x=audio[stem]: np.save(tmp, resample(x, rate, SAMPLE_RATE)), suffix=".npy")
    arrays = {stem: np.load(f, mmap_mode="r") for stem, f in files.items()}
    return Track(name, arrays["vocals"], arrays["accompaniment"], source=str(paths[0]))


def load_all(load, items, desc, progress=True):
    """[load(item) for item in items], LOADERS at a time in threads: on a first run (empty cache) decoding one
    track overlaps reading and resampling another, about twice as fast on two cores. The first error is raised
    once the tracks being read are done; the rest are not started."""
    with ThreadPoolExecutor(LOADERS) as pool:  # on an error, map's iterator cancels the tracks not yet started
        return list(tqdm(pool.map(load, items), total=len(items), desc=desc, unit="track", disable=not progress,
                         leave=False))


def load_tracks(source, split, n_songs=None, cache_dir=DEFAULT_CACHE_DIR, seed=0, progress=True):
    """Tracks of 'train', 'valid' (musdb's split of its train subset) or 'test', stems (channels, samples)
    at SAMPLE_RATE; n_songs: the first so many (all, with a warning, if fewer exist). A DataSource of stems
    folders alone gives their held-apart tracks as 'valid' (see held_apart)."""
    if source.kind == "synthetic":
        count = n_songs if n_songs is not None else synthetic.SYNTHETIC_SPLIT_SIZES[split]
        return [synthetic.synthetic_track(split, i, seed) for i in range(count)]
    if source.kind == "stems":  # the stems folders' held-apart tracks validate a run without MUSDB18
        return [t for folder in source.stems for t in load_stems_tracks(folder, split, cache_dir, progress)]
    mtracks = musdb_tracks(source, "test") if split == "test" else musdb_tracks(source, "train", split)
    if n_songs is not None and n_songs > len(mtracks):
        warn(f"--n-songs {n_songs}: only {len(mtracks)} {split} tracks exist in {source.root}; using all")

    def load(mtrack):
        return cached_track(mtrack.name, [mtrack.path], lambda: (musdb_stems(mtrack), mtrack.rate), cache_dir)
    return load_all(load, mtracks[:n_songs], f"loading {split} tracks", progress)


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
        gains = tuple(ref / max(median_rms(tracks, stem), 1e-8) for ref, stem in zip(reference, STEMS))
        matched.append([replace(t, gains=gains) for t in tracks])
    return matched


# stems folders: a user's own multitracks, and MIR-1K ----------------------------------------------

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
    parts = dict(accompaniment=["accompaniment"], parts=list(ACCOMPANIMENT_PARTS), mixture=["mixture"])[entry.layout]
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
        files = list(entry.files.values())
        return cached_track(entry.name, files, lambda: read_stems(entry), Path(cache_dir) / "stems")
    return load_all(load, stems_split(folder, split), f"loading {split} tracks of {Path(folder).name}", progress)
