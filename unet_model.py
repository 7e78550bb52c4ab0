"""
The U-Net of Jansson et al., "Singing Voice Separation with Deep U-Net Convolutional Networks" (ISMIR 2017):
normalised magnitudes in, a soft mask of the same shape out, from six stride-2 convolutions down and six
transposed ones up, each after the first also reading the encoder output of its size (skip connections).
Also: the one loss and training step, checkpoints (data only: tensors and plain values) and export.

    python unet_model.py                                     # parameter count and shape check
    python unet_model.py --export onnx|torchscript CHECKPOINT
"""
import importlib.util
import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from utils import CheckpointError, Parser, atomic_write, fail, run_cli

N_LEVELS = 6  # each level halves both axes: inputs must be multiples of 64 in frequency and time


@dataclass
class UNetConfig:
    n_channels: int = 16  # channels of the first encoder layer; layer k has n_channels * 2**k
    dropout: float = 0.5  # on the first three decoder layers, as in the paper


class EncoderBlock(nn.Module):
    """5x5 stride-2 convolution, batch norm, LeakyReLU(0.2): (B, C_in, F, T) -> (B, C_out, F/2, T/2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=5, stride=2, padding=2)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class DecoderBlock(nn.Module):
    """5x5 stride-2 transposed convolution, batch norm, ReLU, dropout: (B, C_in, F, T) -> (B, C_out, 2F, 2T)
    (padding 2 and output_padding 1 make the output exactly twice the input, the encoder's inverse)."""

    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, 5, stride=2, padding=2, output_padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.act(self.norm(self.deconv(x))))


# The output layer, a 5x5 stride-2 transposed convolution to one channel, runs as a 3x3 convolution to the four
# phases of its output (even/odd row x even/odd column) followed by pixel_shuffle: the same sums over the same
# weights, while CPU kernels for a transposed convolution to a single channel are slow. A transposed convolution
# convolves the input spread out with zeros with the flipped kernel, so each output phase meets only the flipped
# kernel's taps of one parity: 3 per axis on even outputs, 2 (and a zero) on odd ones.
def subpixel_transposed_conv(layer, x):
    """layer: ConvTranspose2d(C, 1, kernel_size=5, stride=2, padding=2, output_padding=1); x (batch, C, F, T)
    -> layer(x), (batch, 1, 2F, 2T), computed as a convolution and pixel_shuffle (gradients flow to layer's weights)."""
    taps = nn.functional.pad(layer.weight[:, 0].flip(1, 2), (1, 0, 1, 0))  # (C, 6, 6): a zero tap in front
    weight = torch.stack([taps[:, 1::2, 1::2], taps[:, 1::2, 0::2],  # output channel 2r + c: row parity r,
                          taps[:, 0::2, 1::2], taps[:, 0::2, 0::2]])  # column parity c -> (4, C, 3, 3)
    return nn.functional.pixel_shuffle(nn.functional.conv2d(x, weight, layer.bias.expand(4), padding=1), 2)


class OutputLayer(nn.ConvTranspose2d):
    """The last layer: 5x5 stride-2 transposed convolution to the mask's raw scores, (B, C, F, T) -> (B, 1, 2F, 2T),
    computed by subpixel_transposed_conv; ONNX needs a kernel's shape before it runs: export keeps the layer as is."""

    def __init__(self, in_channels):
        super().__init__(in_channels, 1, kernel_size=5, stride=2, padding=2, output_padding=1)

    def forward(self, x):
        return super().forward(x) if torch.onnx.is_in_onnx_export() else subpixel_transposed_conv(self, x)


class UNet(nn.Module):
    """Normalised mixture magnitudes (batch, 1, 512, 128) -> mask (batch, 1, 512, 128) in [0, 1]."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or UNetConfig()
        widths = [self.config.n_channels * 2 ** k for k in range(N_LEVELS)]  # 16 ... 512
        self.encoder = nn.ModuleList(EncoderBlock(c_in, c_out) for c_in, c_out in zip([1] + widths[:-1], widths))
        # 512 -> 256, then (256 + 256) -> 128, ... (32 + 32) -> 16; dropout on the first three
        self.decoder = nn.ModuleList(DecoderBlock(widths[-1] if k == 0 else 2 * widths[-1 - k], widths[-2 - k],
                                                  self.config.dropout if k < 3 else 0.0) for k in range(N_LEVELS - 1))
        # the last layer maps (16 + 16) channels to the one-channel mask; no norm so the sigmoid sees raw scores
        self.output = OutputLayer(2 * widths[0])

    def forward(self, x):
        skips = []
        for block in self.encoder:
            skips.append(x := block(x))
        x = skips.pop()  # the deepest encoder output feeds the decoder directly
        for block in self.decoder:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return torch.sigmoid(self.output(x))

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())


def amp_dtype(device):
    """The autocast dtype, or None for float32: bf16 on CUDA (fp16 on GPUs without it) and on CPUs with
    native bf16 (AVX512-BF16, AMX), where it is faster; float32 on other CPUs, where bf16 is emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


# training: the one loss and the one step, used by train.py and timed by bench.py
def masked_l1_loss(mask, mixture, target):
    """The paper's L1,1 loss ||mask * X - Y||, a float32 mean. Each (batch, 1, 512, 128)."""
    return (mask.float() * mixture - target).abs().mean()


def train_step(model, optimizer, scaler, mixture, target, autocast_dtype):
    """One optimizer step on masked_l1_loss; mixture, target (batch, 1, 512, 128) on the model's device;
    autocast_dtype from amp_dtype (None: float32); scaler: a GradScaler, enabled for fp16 only. -> loss"""
    with torch.autocast(mixture.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        mask = model(mixture)
    loss = masked_l1_loss(mask, mixture, target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


# checkpoints, one format for every script, are data: tensors and plain Python values (dicts, lists, tuples,
# strings, numbers, None), read with torch.load(weights_only=True), which refuses a pickle naming anything else.
def read_checkpoint(path):
    """The dict stored at path, read as data (weights_only=True). Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint. Train one first: python train.py (README, Quick start)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)|safe_globals\(\[(\S+?)\]\)", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # it names a class or function: loading calls it
            raise CheckpointError(f"{path}: refused: loading it would run code ({found[1] or found[2]}); a "
                                  f"checkpoint holds only tensors and plain values") from None
        reason = "not a torch.save file" if isinstance(e, pickle.UnpicklingError) else str(e).splitlines()[0][:120]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no model or model_config)")
    return checkpoint


def stored_config(checkpoint, path):
    """The UNetConfig of a checkpoint; an earlier version's input_transform 'linear' is what the network does."""
    config = dict(checkpoint["model_config"])
    transform = config.pop("input_transform", "linear")
    if transform != "linear":
        raise CheckpointError(f"{path}: trained with input_transform={transform!r}, which is gone; retrain it")
    return UNetConfig(**config)


def load_model(path, device="cpu", expected_spec=None):
    """(UNet in eval mode, checkpoint dict) from a checkpoint written by train.py. expected_spec: the
    caller's STFT settings (dg.SPEC_CONFIG); other ones are refused, not mis-used. Raises CheckpointError."""
    checkpoint = read_checkpoint(path)
    if expected_spec is not None:
        spec = checkpoint.get("spec_config", {})
        different = [f"{k}={spec.get(k)} (expected {v})" for k, v in expected_spec.items() if spec.get(k) != v]
        if different:
            raise CheckpointError(f"{path}: trained with other spectrogram settings: {', '.join(different)}")
    with torch.device("meta"):  # no random initialisation to pay for: every weight comes from the file
        model = UNet(stored_config(checkpoint, path))
    try:
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as e:
        reason = str(e).splitlines()[0][:120]
        raise CheckpointError(f"{path}: weights do not fit {checkpoint['model_config']} ({reason})") from None
    # float(): the loaded tensors became the weights (assign), so a checkpoint saved in half precision is made float32
    return model.float().to(device, memory_format=torch.channels_last).eval(), checkpoint


def save_checkpoint(path, model, spec_config, target="vocals", **state):
    """Write {model weights, model_config, spec_config, target, **state}; state: tensors and plain values."""
    write_checkpoint(path, dict(model=model.state_dict(), model_config=asdict(model.config),
                                spec_config=dict(spec_config), target=target, **state))


def write_checkpoint(path, state):
    """torch.save through a temporary file and a rename: a run killed mid-save leaves the old file whole."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# export: the network alone (the STFT stays outside the graph)
def export(model, kind, path, frames=128):
    """Write the U-Net as "onnx" (dynamic batch) or "torchscript". Input (batch, 1, 512, frames)."""
    model = model.eval().cpu()
    example = torch.rand(1, 1, 512, frames)
    if kind == "onnx":
        if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it; fail before writing anything
            fail("ONNX export needs the onnx package: pip install onnx")
        with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but needs no onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["magnitude"], output_names=["mask"],
                              dynamic_axes={"magnitude": {0: "batch"}, "mask": {0: "batch"}},
                              opset_version=17, dynamo=False)
    else:
        torch.jit.trace(model, example).save(str(path))


def shape_check(n_channels):
    """Print the parameter count and the encoder's shapes of a random U-Net, and check the mask."""
    model = UNet(UNetConfig(n_channels=n_channels)).eval()
    x = h = torch.rand(2, 1, 512, 128)
    with torch.no_grad():
        shapes = [x.shape] + [(h := block(h)).shape for block in model.encoder]
        mask = model(x)
    assert mask.shape == x.shape and 0 <= mask.min() and mask.max() <= 1
    print(f"U-Net, n_channels={n_channels}: {model.get_num_params():,} parameters\nencoder: "
          + " -> ".join(f"{s[1]}x{s[2]}x{s[3]}" for s in shapes) + f"\nmask {tuple(mask.shape)} in [0, 1]: ok")


def main():
    parser = Parser("Check the U-Net's shapes, or export a checkpoint.")
    parser.add_argument("--n-channels", type=int, default=16, help="first-layer width")
    parser.add_argument("--export", choices=["onnx", "torchscript"], help="export CHECKPOINT to this format")
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint to export")
    parser.add_argument("--output", default=None, help="export path (default: CHECKPOINT with .onnx or .ts)")
    args = parser.parse_args()
    if not args.export:
        return shape_check(args.n_channels)
    if args.checkpoint is None:
        fail("--export needs a CHECKPOINT, e.g. python unet_model.py --export onnx checkpoints/best_model.pth")
    model, _ = load_model(args.checkpoint)
    output = Path(args.output or Path(args.checkpoint).with_suffix(".onnx" if args.export == "onnx" else ".ts"))
    export(model, args.export, output)
    print(f"exported {args.checkpoint} ({model.get_num_params():,} parameters) to {output}")


if __name__ == "__main__":
    run_cli(main)
