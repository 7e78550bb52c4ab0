"""Shared fixtures and helpers. Tests that need the real audio in ../shared skip cleanly without it."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
MUSDB7 = SHARED / "MUSDB18-7"
MIR1K = SHARED / "MIR-1K"
SONGS = SHARED / "songs"

needs_shared = pytest.mark.skipif(not (MUSDB7 / "train").is_dir() or not SONGS.is_dir(),
                                  reason="../shared/data (real MUSDB18 previews and songs) not present")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

torch.set_num_threads(2)


def run_script(script, *args, timeout=300, env=None, cwd=REPO):
    """Run one of the top-level scripts as a user would: `python SCRIPT ARGS...`, output captured."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_one_line_error(result, *words):
    """A failed run that said why in one `error:` line on stderr, with no traceback and nothing
    about the error on stdout."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, f"no error line on stderr; stderr: {result.stderr!r}, stdout: {result.stdout!r}"
    assert not any(line.startswith("error:") for line in result.stdout.splitlines()), result.stdout
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A randomly initialised narrow U-Net saved in train.py's checkpoint format."""
    import data_generator as dg
    from unet_model import UNet, UNetConfig, save_checkpoint
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4)).eval()
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, model, dg.SPEC_CONFIG, "vocals", epoch=0, best_val_loss=1.0)
    return path


def make_wav_dataset(root, names, seconds=3.0, rate=22050):
    """A tiny MUSDB18-HQ layout of synthetic songs: train/<name>/{mixture,drums,bass,other,vocals}.wav."""
    import synthetic
    for i, name in enumerate(names):
        track = synthetic.synthetic_track("train", i, rate=rate, seconds=seconds)
        folder = root / "train" / name
        folder.mkdir(parents=True)
        third = track.accompaniment / 3
        for stem, audio in (("vocals", track.vocals), ("drums", third), ("bass", third), ("other", third),
                            ("mixture", track.mixture)):
            sf.write(str(folder / f"{stem}.wav"), audio.T, rate)


# (problem, the words its one-line error must hold) for write_bad_checkpoint
BAD_CHECKPOINTS = [("missing", "python train.py"), ("corrupt", "not a readable checkpoint"),
                   ("other_stft", "hop_length=512"), ("other_width", "do not fit"),
                   ("not_ours", "not a checkpoint written by train.py")]


def write_bad_checkpoint(problem, path):
    """Leave at path a checkpoint with one of BAD_CHECKPOINTS' problems ('missing': nothing)."""
    import data_generator as dg
    from unet_model import UNet, UNetConfig, save_checkpoint
    if problem == "corrupt":
        path.write_bytes(b"\x80\x02garbage" * 100)
    elif problem == "other_stft":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dict(dg.SPEC_CONFIG, hop_length=512))
    elif problem == "other_width":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dg.SPEC_CONFIG)
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["model_config"]["n_channels"] = 8
        torch.save(checkpoint, path)
    elif problem == "not_ours":
        torch.save({"weights": 1}, path)


def make_stems_folder(root, names, layout="accompaniment", seconds=3.0, rate=16000, mono=False):
    """A folder of track folders of synthetic songs in one of the layouts train.py --stems reads:
    'accompaniment' (vocals + accompaniment), 'mixture' (vocals + mixture), 'parts' (vocals + drums,
    bass, other), as .flac; or 'mir1k' (MIR-1K as distributed: Wavfile/<name>.wav, accompaniment on
    the left, voice on the right). Returns {name: synthetic Track} (stereo, or the first channel)."""
    import audio
    import synthetic
    tracks = {}
    for i, name in enumerate(names):
        track = synthetic.synthetic_track("train", i, rate=rate, seconds=seconds)
        vocals, accompaniment = (x[:1] if mono else x for x in (track.vocals, track.accompaniment))
        tracks[name] = audio.Track(name, vocals, accompaniment)
        if layout == "mir1k":
            (root / "Wavfile").mkdir(parents=True, exist_ok=True)
            sf.write(str(root / "Wavfile" / f"{name}.wav"), np.concatenate([accompaniment[:1], vocals[:1]]).T, rate)
            continue
        folder = root / name
        folder.mkdir(parents=True)
        files = {"accompaniment": {"accompaniment": accompaniment}, "mixture": {"mixture": vocals + accompaniment},
                 "parts": {part: accompaniment / 3 for part in ("drums", "bass", "other")}}[layout]
        for stem, samples in dict(vocals=vocals, **files).items():
            sf.write(str(folder / f"{stem}.flac"), samples.T, rate)
    return tracks



@pytest.fixture(scope="session")
def tiny_stems(tmp_path_factory):
    """A small stems folder for training runs: ten 3 s songs of five singers ('singer4' held apart: validation)."""
    folder = tmp_path_factory.mktemp("tiny_stems")
    make_stems_folder(folder, [f"singer{i // 2}_song{i % 2}" for i in range(10)], seconds=3.0, rate=8192)
    return folder
