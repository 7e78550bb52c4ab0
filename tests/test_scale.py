"""Scale-out and export: DistributedDataParallel on CPU (gloo), ONNX and TorchScript."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_generator as dg
from conftest import REPO
from unet_model import UNet, UNetConfig, export, load_model, save_checkpoint

TINY = ["--synthetic", "--n-songs", "2", "--n-channels", "4", "--batch-size", "2", "--steps-per-epoch", "3", "--cpu"]


def torchrun(*args, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ddp_two_processes_keep_identical_weights_and_resume(tmp_path):
    folder = tmp_path / "ck"
    result = torchrun(*TINY, "--epochs", "1", "--checkpoint-dir", folder, "--mask-exponents", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "x 2 processes" in out
    assert "DDP: weights identical across 2 ranks" in out
    assert out.count("epoch 1/1:") == 1  # only rank 0 logs
    model, _ = load_model(folder / "best_model.pth", expected_spec=dg.SPEC_CONFIG)  # loads without DDP
    with torch.no_grad():
        assert model(torch.rand(1, 1, 512, 128)).shape == (1, 1, 512, 128)
    result = torchrun(*TINY, "--epochs", "2", "--checkpoint-dir", folder, "--resume", "--mask-exponents", "0.5,1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "DDP: weights identical across 2 ranks" in result.stdout
    assert torch.load(folder / "last.pth", weights_only=False)["epoch"] == 2
    best = torch.load(folder / "best_model.pth", weights_only=False)  # calibrated by both ranks together
    assert sorted(best["mask_exponent_sdr"]) == [0.5, 1.0] and all(np.isfinite(list(best["mask_exponent_sdr"].values())))
    assert best["mask_exponent"] == max(best["mask_exponent_sdr"], key=best["mask_exponent_sdr"].get)


@pytest.fixture
def trained_like_model(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4, input_transform="log1p"))
    model.train()
    for _ in range(3):  # give batch norm non-trivial running statistics
        model(torch.rand(4, 1, 512, 128) * 5)
    model.eval()
    path = tmp_path / "model.pth"
    save_checkpoint(path, model, dg.SPEC_CONFIG)
    return model, path


def test_onnx_export_matches_pytorch(trained_like_model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, checkpoint = trained_like_model
    result = subprocess.run([sys.executable, str(REPO / "unet_model.py"), "--export", "onnx", str(checkpoint)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    path = checkpoint.with_suffix(".onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 512, 128) * 4  # batch 3: the batch axis is dynamic
    (mask,) = session.run(None, {"magnitude": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert mask.shape == expected.shape
    assert np.abs(mask - expected).max() < 1e-4


def test_torchscript_export_matches_pytorch(trained_like_model, tmp_path):
    model, _ = trained_like_model
    path = tmp_path / "model.ts"
    export(model, "torchscript", path)
    loaded = torch.jit.load(str(path))
    x = torch.rand(2, 1, 512, 128) * 4
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_export_without_a_checkpoint_is_a_clear_error():
    result = subprocess.run([sys.executable, str(REPO / "unet_model.py"), "--export", "onnx"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and "needs a CHECKPOINT" in result.stderr and "Traceback" not in result.stderr
