"""The U-Net: shapes, range, width scaling, learning, checkpoints."""
import pytest
import torch

import data_generator as dg
from unet_model import CheckpointError, UNet, UNetConfig, load_model, save_checkpoint


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


def test_a_few_adam_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4))
    mixture = torch.rand(4, 1, 512, 128)
    target = mixture.clone()
    target[:, :, 256:] = 0  # the source lives below 2 kHz: the mask to learn is 1 there, 0 above
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = (model(mixture) * mixture - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
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
    assert not path.with_name("m.pth.tmp").exists()


def test_checkpoint_with_other_stft_settings_is_refused(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dict(dg.SPEC_CONFIG, hop_length=512))
    with pytest.raises(CheckpointError, match="hop_length=512"):
        load_model(path, expected_spec=dg.SPEC_CONFIG)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(CheckpointError, match="python train.py"):
        load_model(tmp_path / "nope.pth")
