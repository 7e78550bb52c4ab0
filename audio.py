"""Audio in memory and in files: the rate the network hears, a song as two stems (Track), audio files read with
one-line errors, resampling."""
import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from utils import DataError

SAMPLE_RATE = 8192  # Hz, the paper's: the network hears up to 4096 Hz, and every dataset is served at this rate
STEMS = ("vocals", "accompaniment")  # what the separator writes; either can be the training target
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


@dataclass
class Track:
    """One song's stems at SAMPLE_RATE, vocals and accompaniment each (channels, samples) float32
    (memory-mapped from the cache for MUSDB18); `source` says where it came from."""
    name: str
    vocals: np.ndarray
    accompaniment: np.ndarray
    source: str = ""
    gains: tuple = (1.0, 1.0)  # what training remixes multiply (vocals, accompaniment) by: see datasets.match_levels

    @property
    def mixture(self):
        return self.vocals + self.accompaniment

    def gain(self, stem):
        return self.gains[STEMS.index(stem)]


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
    for problem, found in (("no such file", not path.exists()), ("is a folder, not an audio file", path.is_dir()),
                           ("file is empty", path.is_file() and path.stat().st_size == 0)):
        if found:
            raise DataError(f"{path}: {problem}")
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


class QuietStderr:
    """fd 2 pointed at /dev/null while any thread decodes (C decoders write there: mpg123's notes on a damaged mp3),
    back once the last is done: threads that each saved and restored it could leave it at /dev/null for good."""
    lock, users, saved = threading.Lock(), 0, None

    def __enter__(self):
        with QuietStderr.lock:
            if QuietStderr.users == 0:
                try:
                    sys.stderr.flush()
                    QuietStderr.saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                    os.close(devnull)
                except (OSError, ValueError):  # no stderr to silence
                    QuietStderr.saved = None
            QuietStderr.users += 1

    def __exit__(self, *exception):
        with QuietStderr.lock:
            QuietStderr.users -= 1
            if QuietStderr.users == 0 and QuietStderr.saved is not None:
                os.dup2(QuietStderr.saved, 2)
                os.close(QuietStderr.saved)


@contextlib.contextmanager
def decoding(path, problem="not a readable audio file"):
    """Run a decoder with C libraries silenced and its exceptions turned into a DataError, so that a bad file
    costs the user one line."""
    with QuietStderr():
        try:
            yield
        except Exception as e:
            raise DataError(f"{path}: {problem} ({short_reason(e)})") from None


def resample(audio, rate, new_rate, quality="HQ"):
    """Resample (channels, samples) float32 audio with soxr (high quality unless told otherwise)."""
    if rate == new_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    out = soxr.resample(np.ascontiguousarray(audio.T, dtype=np.float32), rate, new_rate, quality=quality)
    return np.ascontiguousarray(out.T)
