"""
The U-Net of Jansson et al., "Singing Voice Separation with Deep U-Net Convolutional Networks"
(ISMIR 2017): it reads a normalised magnitude spectrogram patch and predicts a soft mask of the
same shape.

- encoder: six 5x5 stride-2 convolutions, 16, 32, 64, 128, 256, 512 channels (n_channels scales
  them all), each followed by batch norm and LeakyReLU(0.2);
- decoder: six 5x5 stride-2 transposed convolutions back to the input's size, batch norm and
  ReLU, dropout 0.5 on the first three; from the second on, each reads the previous decoder
  output concatenated with the encoder output of the same size (the skip connections);
- a sigmoid turns the last layer into a mask in [0, 1].

`python unet_model.py` prints the parameter count and checks the shapes;
`python unet_model.py --export onnx|torchscript CHECKPOINT` writes the network for other runtimes.
"""
import argparse
import importlib.util
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import data_generator as dg

N_LEVELS = 6  # each level halves both axes: inputs must be multiples of 64 in frequency and time


@dataclass
class UNetConfig:
    n_channels: int = 16  # channels of the first encoder layer; layer k has n_channels * 2**k
    dropout: float = 0.5  # on the first three decoder layers, as in the paper
    input_transform: str = "linear"  # "log1p": the network reads log(1 + |X|), compressing loud bins


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
    """5x5 stride-2 transposed convolution, batch norm, ReLU, optional dropout:
    (B, C_in, F, T) -> (B, C_out, 2F, 2T)."""

    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        # padding 2 + output_padding 1 make the output exactly twice the input, like the encoder's inverse
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=5, stride=2,
                                         padding=2, output_padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.act(self.norm(self.deconv(x))))


class UNet(nn.Module):
    """Normalised mixture magnitudes (batch, 1, 512, 128) -> mask (batch, 1, 512, 128) in [0, 1]."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or UNetConfig()
        widths = [self.config.n_channels * 2 ** k for k in range(N_LEVELS)]  # 16 ... 512
        self.encoder = nn.ModuleList(EncoderBlock(c_in, c_out) for c_in, c_out in zip([1] + widths[:-1], widths))
        decoder = []
        for k in range(N_LEVELS - 1):  # 512 -> 256, then (256 + 256) -> 128, ... (32 + 32) -> 16
            c_in = widths[-1] if k == 0 else 2 * widths[-1 - k]
            decoder.append(DecoderBlock(c_in, widths[-2 - k], self.config.dropout if k < 3 else 0.0))
        self.decoder = nn.ModuleList(decoder)
        # the last layer maps (16 + 16) channels to the one-channel mask; no norm so the sigmoid sees raw scores
        self.output = nn.ConvTranspose2d(2 * widths[0], 1, kernel_size=5, stride=2, padding=2, output_padding=1)

    def forward(self, x):
        if self.config.input_transform == "log1p":
            x = torch.log1p(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()  # the deepest encoder output feeds the decoder directly
        for block in self.decoder:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return torch.sigmoid(self.output(x))

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())


def amp_dtype(device, enabled=True):
    """The autocast dtype for this device, or None for full float32.

    bf16 on CUDA GPUs that support it (fp16 on older ones) and on CPUs with native bf16
    (AVX512-BF16 or AMX: 1.5x faster training, 2x faster inference on such a 2-core machine,
    masks within 0.003 of float32); float32 on other CPUs, where emulated bf16 would be slower.
    """
    device = torch.device(device)
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


# -----------------------------------------------------------------------------
# checkpoints: one format, used by train.py, inference.py, evaluate.py and bench.py

def load_model(path, device="cpu", expected_spec=None):
    """A UNet in eval mode from a checkpoint written by train.py, and the checkpoint dict.

    expected_spec: the STFT settings the caller works with (data_generator.SPEC_CONFIG); a
    checkpoint trained with other settings is refused rather than silently mis-used.
    Raises CheckpointError with one line saying what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint. Train one first: python train.py "
                              f"(see README, Quick start), or pass --checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no model or model_config)")
    if expected_spec is not None:
        spec = checkpoint.get("spec_config", {})
        different = {k: (spec.get(k), v) for k, v in expected_spec.items() if spec.get(k) != v}
        if different:
            detail = ", ".join(f"{k}={a} (expected {b})" for k, (a, b) in different.items())
            raise CheckpointError(f"{path}: trained with other spectrogram settings: {detail}")
    model = UNet(UNetConfig(**checkpoint["model_config"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config "
                              f"{checkpoint['model_config']} ({str(e).splitlines()[0][:120]})") from None
    # channels-last weights make oneDNN's convolutions about 15 % faster on the CPU
    return model.to(device, memory_format=torch.channels_last).eval(), checkpoint


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not match; one line for the user."""


def save_checkpoint(path, model, spec_config, target="vocals", **state):
    """Write a checkpoint dict (model weights, model_config, spec_config, target, and whatever
    training state is given) through a temporary file and a rename, so that a run killed
    mid-save leaves the previous file intact."""
    state = dict(model=model.state_dict(), model_config=asdict(model.config), spec_config=dict(spec_config),
                 target=target, **state)
    write_checkpoint(path, state)


def write_checkpoint(path, state):
    """torch.save through a temporary file and a rename: the file is always whole."""
    dg.atomic_write(path, lambda tmp: torch.save(state, tmp))


# -----------------------------------------------------------------------------
# export: the network alone (the STFT stays outside the graph)

def export(model, kind, path, frames=128):
    """Write the U-Net as ONNX (dynamic batch) or TorchScript. Input (batch, 1, 512, frames)."""
    model = model.eval().cpu()
    example = torch.rand(1, 1, 512, frames)
    if kind == "onnx":
        if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it; fail before writing anything
            raise SystemExit("error: ONNX export needs the onnx package: pip install onnx")
        with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but needs no onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["magnitude"], output_names=["mask"],
                              dynamic_axes={"magnitude": {0: "batch"}, "mask": {0: "batch"}},
                              opset_version=17, dynamo=False)
    elif kind == "torchscript":
        torch.jit.trace(model, example).save(str(path))
    else:
        raise ValueError(f"unknown export kind {kind!r}")


def main():
    parser = argparse.ArgumentParser(description="Print the U-Net's size and check its shapes; "
                                     "or export a trained checkpoint to ONNX or TorchScript.")
    parser.add_argument("--n-channels", type=int, default=16, help="first-layer width (default: 16)")
    parser.add_argument("--export", choices=["onnx", "torchscript"], default=None,
                        help="export CHECKPOINT instead of the shape check")
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint to export")
    parser.add_argument("--output", default=None, help="export path (default: CHECKPOINT with .onnx or .ts)")
    args = parser.parse_args()

    if args.export:
        if args.checkpoint is None:
            sys.exit("error: --export needs a CHECKPOINT, e.g. python unet_model.py --export onnx checkpoints/best_model.pth")
        try:
            model, _ = load_model(args.checkpoint)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        output = Path(args.output or Path(args.checkpoint).with_suffix(".onnx" if args.export == "onnx" else ".ts"))
        export(model, args.export, output)
        print(f"exported {args.checkpoint} ({model.get_num_params():,} parameters) to {output}")
        return

    model = UNet(UNetConfig(n_channels=args.n_channels)).eval()
    print(f"U-Net, n_channels={args.n_channels}: {model.get_num_params():,} parameters")
    x = torch.rand(2, 1, 512, 128)
    with torch.no_grad():
        shapes = [tuple(x.shape)]
        h = x
        for block in model.encoder:
            h = block(h)
            shapes.append(tuple(h.shape))
        mask = model(x)
    print("encoder: " + " -> ".join(f"{s[1]}x{s[2]}x{s[3]}" for s in shapes))
    assert mask.shape == x.shape, f"mask {tuple(mask.shape)} != input {tuple(x.shape)}"
    assert 0 <= mask.min() and mask.max() <= 1
    print(f"input {tuple(x.shape)} -> mask {tuple(mask.shape)}, range [{mask.min():.3f}, {mask.max():.3f}]: ok")


if __name__ == "__main__":
    main()
