"""What train.py leaves in TensorBoard."""
import subprocess
import sys

import numpy as np

import data_generator as dg
from conftest import REPO


def test_tensorboard_gets_scalars_pictures_and_audio(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = tmp_path / "ck"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--synthetic", "--n-songs", "2", "--n-channels", "4",
                             "--batch-size", "2", "--steps-per-epoch", "10", "--epochs", "2", "--mask-exponents", "1",
                             "--checkpoint-dir", str(folder)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(folder / "logs"), size_guidance={"images": 0, "audio": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "val/loss", "val/sdr", "val/mask_mean", "val/mask_std", "train/lr", "train/loss_step"):
        assert scalar in tags["scalars"], scalar
    assert [e.step for e in events.Scalars("val/loss")] == [0, 1, 2]
    assert all(np.isfinite(e.value) for e in events.Scalars("val/sdr"))
    assert {"separation/0", "separation/1"} <= set(tags["images"])
    assert [e.step for e in events.Images("separation/0")] == [0, 1, 2]
    assert {"separation/0_vocals", "separation/0_mixture"} <= set(tags["audio"])
    audio = events.Audio("separation/0_vocals")[-1]
    assert audio.sample_rate == dg.SAMPLE_RATE and audio.length_frames == 10 * dg.SAMPLE_RATE
    # the printed epoch lines carry the loss and the predicted mask's spread
    assert "val loss" in result.stdout and "val SDR" in result.stdout and "mask mean" in result.stdout and "std" in result.stdout
