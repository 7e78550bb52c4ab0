"""unet_model.py: the network (shapes, range, width, paper's layout), the one loss and training
step, checkpoints (data only: a pickle that would run code is refused everywhere), export."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data_generator as dg
from conftest import BAD_CHECKPOINTS, write_bad_checkpoint, REPO, assert_one_line_error, run_script
from unet_model import (CheckpointError, UNet, UNetConfig, export, load_model, masked_l1_loss, read_checkpoint,
                        save_checkpoint, subpixel_transposed_conv, train_step)


def expected_params(n):
    """Count by hand: 5x5 kernels, biases, and batch norm's weight and bias per channel."""
    w = [n * 2 ** k for k in range(6)]
    encoder = sum(25 * c_in * c_out + 3 * c_out for c_in, c_out in zip([1] + w[:-1], w))
    decoder = 25 * w[5] * w[4] + 3 * w[4]
    decoder += sum(25 * 2 * w[5 - k] * w[4 - k] + 3 * w[4 - k] for k in range(1, 5))
    return encoder + decoder + 25 * 2 * w[0] + 1


@pytest.mark.parametrize("n_channels", [16, 8, 4])
def test_parameter_count_scales_with_width(n_channels):
    assert UNet(UNetConfig(n_channels=n_channels)).get_num_params() == expected_params(n_channels)
    assert expected_params(16) == 9_823_313


@pytest.mark.parametrize("shape", [(2, 1, 512, 128), (1, 1, 512, 64), (3, 1, 64, 256)])
def test_mask_has_the_input_shape_and_range(shape):
    model = UNet(UNetConfig(n_channels=4)).eval()
    x = torch.rand(shape) * 10
    with torch.no_grad():
        mask = model(x)
    assert mask.shape == x.shape
    assert mask.min() >= 0 and mask.max() <= 1


def test_architecture_follows_the_paper():
    model = UNet()
    widths = [block.conv.out_channels for block in model.encoder]
    assert widths == [16, 32, 64, 128, 256, 512]
    for block in model.encoder:
        assert block.conv.kernel_size == (5, 5) and block.conv.stride == (2, 2)
        assert isinstance(block.act, torch.nn.LeakyReLU) and block.act.negative_slope == 0.2
    dropouts = [getattr(block.dropout, "p", 0.0) for block in model.decoder]
    assert dropouts == [0.5, 0.5, 0.5, 0.0, 0.0]
    # skip connections: decoder inputs after the first are concatenations (twice the width)
    assert [block.deconv.in_channels for block in model.decoder] == [512, 512, 256, 128, 64]
    assert model.output.in_channels == 32 and model.output.out_channels == 1


def test_the_output_layer_as_subpixel_convolution_is_the_transposed_convolution():
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(6, 1, kernel_size=5, stride=2, padding=2, output_padding=1).double()
    x = torch.randn(2, 6, 8, 5, dtype=torch.float64)
    assert torch.allclose(subpixel_transposed_conv(layer, x), layer(x), atol=1e-12)
    # a single input pixel spreads the 5x5 kernel (no flip) centred on output (2m, 2n): every tap is used once
    impulse = torch.zeros(1, 6, 4, 4, dtype=torch.float64)
    impulse[0, 3, 1, 2] = 1.0
    out = subpixel_transposed_conv(layer, impulse)[0, 0] - layer.bias
    assert torch.allclose(out[0:5, 2:7], layer.weight[3, 0], atol=1e-12)
    assert out.abs().sum() == out[0:5, 2:7].abs().sum()
    # training goes through it: the gradients reach the layer's weights as through the transposed convolution
    grads = []
    for form in (layer, lambda x: subpixel_transposed_conv(layer, x)):
        layer.zero_grad()
        form(x).square().sum().backward()
        grads.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*grads))
    # the network's own output layer runs this form and stays a module (hooks see it)
    output = UNet(UNetConfig(n_channels=3)).output.double()
    y = torch.randn(2, 6, 8, 5, dtype=torch.float64)
    assert torch.allclose(output(y), torch.nn.ConvTranspose2d.forward(output, y), atol=1e-12)


def test_masked_l1_loss_is_the_mean_absolute_error_of_the_masked_mixture():
    mixture = torch.tensor([[[[2.0, 4.0], [1.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    mask = torch.tensor([[[[0.5, 0.5], [1.0, 0.25]]]], dtype=torch.bfloat16)
    loss = masked_l1_loss(mask, mixture, target)  # |1-1| + |2-1| + |1-1| + |0-1|, over 4
    assert loss.dtype == torch.float32 and loss.item() == 0.5


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4))
    mixture = torch.rand(4, 1, 512, 128)
    target = mixture.clone()
    target[:, :, 256:] = 0  # the source lives below 2 kHz: the mask to learn is 1 there, 0 above
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(model, optimizer, scaler, mixture, target, None).item() for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0]


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = UNet(UNetConfig(n_channels=4, dropout=0.3))
    model.train()
    model(torch.rand(2, 1, 512, 128))  # move the batch-norm statistics away from their defaults
    model.eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, dg.SPEC_CONFIG, "accompaniment", epoch=3)
    loaded, checkpoint = load_model(path, expected_spec=dg.SPEC_CONFIG)
    assert checkpoint["target"] == "accompaniment" and checkpoint["epoch"] == 3
    assert loaded.config == model.config
    x = torch.rand(1, 1, 512, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)  # loaded channels-last: rounding only
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_a_half_precision_checkpoint_loads_as_float32(tmp_path):
    """load_model takes the file's tensors as the weights (no random initialisation first), so their dtype must be
    made float32: a checkpoint saved in half precision still gives a float32 model with the same weights."""
    torch.manual_seed(3)
    model = UNet(UNetConfig(n_channels=4)).eval()
    path = tmp_path / "half.pth"
    save_checkpoint(path, model.half(), dg.SPEC_CONFIG)
    loaded, _ = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.encoder[0].norm.num_batches_tracked.dtype == torch.int64
    assert torch.equal(loaded.encoder[0].conv.weight, model.encoder[0].conv.weight.float())
    with torch.no_grad():
        assert loaded(torch.rand(1, 1, 512, 128)).dtype == torch.float32


def old_checkpoint(path, transform="linear"):
    """A best_model.pth as the previous version of train.py wrote it: input_transform in the config,
    a fitted mask exponent with its scores, a patience counter."""
    torch.manual_seed(2)
    model = UNet(UNetConfig(n_channels=4)).eval()
    history = [dict(epoch=1, step=30, train_loss=0.4, val_loss=0.39, val_sdr=0.5, mask_mean=0.45, mask_std=0.08,
                    val_sdr_songs=[0.5, float("nan")], lr=1e-3, seconds=10.0)]
    state = dict(model=model.state_dict(), model_config=dict(n_channels=4, dropout=0.5, input_transform=transform),
                 spec_config=dict(dg.SPEC_CONFIG), target="vocals", args=dict(steps_per_epoch=30, ema=0.0, gain=False),
                 epoch=1, step=30, best_val_loss=0.39, best_val_sdr=0.5, bad_epochs=0, history=history,
                 dataset="synthetic", mask_exponent=0.5, mask_exponent_sdr={0.5: 0.7, 1.0: 0.5})
    torch.save(state, path)
    return model


def test_a_checkpoint_of_the_previous_version_still_loads(tmp_path):
    path = tmp_path / "old.pth"
    model = old_checkpoint(path)
    loaded, checkpoint = load_model(path, expected_spec=dg.SPEC_CONFIG)
    assert loaded.config == UNetConfig(n_channels=4) and checkpoint["mask_exponent"] == 0.5
    x = torch.rand(1, 1, 512, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)  # used with the masks as predicted
    old_checkpoint(path, transform="log1p")
    with pytest.raises(CheckpointError, match="input_transform='log1p'.*retrain"):
        load_model(path)


@pytest.mark.parametrize("problem,message", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_one_line_errors(problem, message, tmp_path):
    path = tmp_path / "model.pth"
    write_bad_checkpoint(problem, path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(path, expected_spec=dg.SPEC_CONFIG)
    assert "\n" not in str(error.value)


class RunsCode:
    """What an attacker pickles: unpickling it calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    model = UNet(UNetConfig(n_channels=4))
    state = dict(model=model.state_dict(), model_config=dict(n_channels=4), spec_config=dict(dg.SPEC_CONFIG),
                 target="vocals", payload=RunsCode(marker))
    torch.save(state, folder / "best_model.pth")
    torch.save(state, folder / "last.pth")
    return folder, marker


def test_the_crafted_pickle_would_run_code_when_unpickled_unsafely(evil_checkpoint):
    """The control: the file really is an attack (torch.load without weights_only runs it)."""
    folder, marker = evil_checkpoint
    torch.load(folder / "best_model.pth", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused(evil_checkpoint):
    folder, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match=r"refused: loading it would run code \(posix.system\)"):
        read_checkpoint(folder / "best_model.pth")
    assert not marker.exists()


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py", "train.py", "unet_model.py", "bench.py"])
def test_every_script_refuses_a_checkpoint_that_would_run_code(script, evil_checkpoint, tmp_path):
    folder, marker = evil_checkpoint
    checkpoint = folder / "best_model.pth"
    song = tmp_path / "song.wav"
    sf.write(str(song), np.zeros((8000, 2), np.float32), 8000)
    args = {"inference.py": ["--audio", song, "--checkpoint", checkpoint, "--output-dir", tmp_path / "out"],
            "evaluate.py": ["--checkpoint", checkpoint, "--folder", tmp_path, "--output-dir", tmp_path / "out"],
            "train.py": ["--resume", "--checkpoint-dir", folder, "--synthetic"],
            "unet_model.py": ["--export", "onnx", checkpoint],
            "bench.py": ["--only", "training", "--checkpoint", checkpoint]}[script]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_script(script, *args)
    assert_one_line_error(result, str(checkpoint if script != "train.py" else folder / "last.pth"),
                          "refused: loading it would run code")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.fixture
def trained_like_model(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4))
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
    result = run_script("unet_model.py", "--export", "onnx", checkpoint)
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
    model, checkpoint = trained_like_model
    result = run_script("unet_model.py", "--export", "torchscript", checkpoint, "--output", tmp_path / "model.ts")
    assert result.returncode == 0, result.stderr
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(2, 1, 512, 128) * 4
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    export(model, "torchscript", tmp_path / "direct.ts")
    assert torch.allclose(torch.jit.load(str(tmp_path / "direct.ts"))(x), loaded(x))


def test_export_without_a_checkpoint_is_a_clear_error():
    assert_one_line_error(run_script("unet_model.py", "--export", "onnx", timeout=120), "needs a CHECKPOINT")


def test_shape_check_runs():
    result = subprocess.run([sys.executable, str(REPO / "unet_model.py"), "--n-channels", "4"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and f"{expected_params(4):,} parameters" in result.stdout and ": ok" in result.stdout
