"""Shared fixtures and helpers. Tests that need the real audio in ../shared skip cleanly without it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
