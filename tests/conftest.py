"""Shared fixtures. Tests that need the real audio in ../shared skip cleanly without it."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
MUSDB7 = SHARED / "MUSDB18-7"
SONGS = SHARED / "songs"

needs_shared = pytest.mark.skipif(not (MUSDB7 / "train").is_dir() or not SONGS.is_dir(),
                                  reason="../shared/data (real MUSDB18 previews and songs) not present")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

torch.set_num_threads(2)


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
