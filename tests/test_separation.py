"""The separator path: full-band masking, streaming, and inference.py end to end."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import data_generator as dg
import inference
from conftest import REPO, SONGS, needs_shared
from unet_model import load_model


def ones_mask(patches, first_patch):
    return torch.ones_like(patches)


def noise(channels, seconds, rate, seed=0):
    return (np.random.default_rng(seed).standard_normal((channels, int(seconds * rate))) * 0.1).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 8192, 22050, 44100, 96000])
@pytest.mark.parametrize("channels,seconds", [(1, 0.2), (2, 13.1), (3, 2.0)])
def test_a_mask_of_ones_gives_back_the_input(rate, channels, seconds):
    audio = noise(channels, seconds, rate)
    vocals, accompaniment = inference.separate(audio, rate, ones_mask)
    assert vocals.shape == audio.shape and vocals.dtype == np.float32
    assert np.abs(vocals - audio).max() < 1e-5
    assert np.abs(accompaniment).max() < 1e-5


@pytest.mark.parametrize("shifts", [1, 2])
def test_streaming_in_small_blocks_equals_one_block(tiny_checkpoint, shifts):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"), batch_size=4, amp=False)
    rate = 44100
    audio = noise(2, 61.3, rate, seed=1)
    whole = inference.separate(audio, rate, mask_fn, batch_size=4, shifts=shifts)
    separator = inference.make_separator(rate, 2, mask_fn, batch_size=4, shifts=shifts)
    parts = [separator.process(audio[:, i:i + 12345]) for i in range(0, audio.shape[1], 12345)]
    parts.append(separator.finish())
    for k in range(2):
        streamed = np.concatenate([p[k] for p in parts], axis=1)
        assert streamed.shape == audio.shape
        assert np.abs(streamed - whole[k]).max() < 1e-5
    assert np.abs(whole[0]).max() > 0.01  # the model let something through


def reference_separation(audio, rate, mask_fn, overlap=0.5):
    """The separator written the plain way, on whole arrays, to check the streaming engine."""
    low = torch.from_numpy(soxr.resample(audio.T, rate, dg.SAMPLE_RATE, quality="HQ").T.copy())
    hop = dg.patch_hop(overlap)
    patches = dg.to_patches(dg.stft(low).abs(), hop)
    frames = dg.n_frames(low.shape[1])
    mask = dg.from_patches(mask_fn(dg.normalise(patches)[0], 0), hop, frames).numpy()  # (C, 512, frames)
    n_fft, hop_f = inference.full_band_stft_size(rate)
    window = torch.hann_window(n_fft)
    spec = torch.stft(torch.from_numpy(audio), n_fft, hop_f, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    times = np.arange(spec.shape[-1]) * hop_f / rate
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    full = np.zeros(spec.shape, np.float32)
    for c in range(audio.shape[0]):
        in_time = np.stack([np.interp(times * dg.SAMPLE_RATE / dg.HOP_LENGTH, np.arange(frames), mask[c, b])
                            for b in range(512)])  # (512, full-rate frames)
        inside = freqs <= 511 * 8
        for j in range(in_time.shape[1]):
            full[c, inside, j] = np.interp(freqs[inside] / 8, np.arange(512), in_time[:, j])
            full[c, ~inside, j] = in_time[-128:, j].mean()
    vocals = torch.istft(torch.from_numpy(full) * spec, n_fft, hop_f, window=window, center=True, length=audio.shape[1])
    return vocals.numpy()


@pytest.mark.parametrize("rate,seconds", [(44100, 20.0), (16000, 3.3)])
def test_streaming_engine_matches_a_plain_whole_array_implementation(tiny_checkpoint, rate, seconds):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"), amp=False)
    audio = noise(2, seconds, rate, seed=2)
    vocals, accompaniment = inference.separate(audio, rate, mask_fn, shifts=1)
    expected = reference_separation(audio, rate, mask_fn)
    assert np.abs(vocals - expected).max() < 1e-4 * np.abs(audio).max()
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_shifts_average_the_separations_of_delayed_copies(tiny_checkpoint):
    """shifts=N is the mean of N separations of the input delayed by k/N of the network's hop
    (768 samples at 8192 Hz: 2067 at 44.1 kHz for N = 2), each realigned to the input."""
    assert inference.shift_delays(44100, 2) == [0, 2067]
    assert inference.shift_delays(dg.SAMPLE_RATE, 4) == [0, 192, 384, 576]
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"), amp=False)
    rate = 22050
    audio = noise(2, 9.7, rate, seed=6)
    vocals, accompaniment = inference.separate(audio, rate, mask_fn, shifts=3)
    copies = [inference.separate(inference.delayed(audio, d), rate, mask_fn, shifts=1)[0][:, d:]
              for d in inference.shift_delays(rate, 3)]
    assert vocals.shape == audio.shape
    assert np.abs(vocals - np.mean(copies, axis=0)).max() < 1e-6
    assert np.abs(copies[0] - copies[1]).max() > 1e-3  # the copies do differ: their frames fall elsewhere
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_no_seams_at_patch_borders():
    """Patches that disagree strongly (mask 0.2, 0.8, 0.2, ...) are cross-faded: the output level of
    a steady noise changes gradually, not in steps at the borders."""
    def alternating(patches, first_patch):
        index = torch.arange(first_patch, first_patch + patches.shape[1])
        return (0.2 + 0.6 * (index % 2)).float()[None, :, None, None].expand_as(patches).clone()

    rate = 22050
    audio = noise(1, 40, rate, seed=3)
    vocals, _ = inference.separate(audio, rate, alternating)
    window = rate // 10
    level = np.sqrt(np.mean(vocals[0, :len(vocals[0]) // window * window].reshape(-1, window) ** 2, axis=1))
    steps = np.abs(np.diff(level)) / level[:-1]
    assert level.max() / level.min() > 2.5  # the masks did act
    assert steps.max() < 0.15, f"level jumps by {steps.max():.0%} within 0.1 s"


def test_full_band_output_keeps_energy_above_4khz():
    rate = 44100
    audio = noise(2, 5, rate, seed=4)
    vocals, _ = inference.separate(audio, rate, lambda p, f: torch.full_like(p, 0.5))
    spectrum = np.abs(np.fft.rfft(vocals[0]))
    freqs = np.fft.rfftfreq(vocals.shape[1], 1 / rate)
    high = spectrum[(freqs > 5000) & (freqs < 20000)].mean()
    low = spectrum[(freqs > 500) & (freqs < 3500)].mean()
    assert high > 0.8 * low  # white noise stays white: the band above 4 kHz is not cut off


def test_stereo_output_differs_between_channels_when_the_input_does(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    audio = noise(2, 8, 44100, seed=5)
    vocals, _ = inference.separate(audio, 44100, inference.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).mean() > 0.1 * np.abs(vocals).mean()
    same = np.repeat(audio[:1], 2, axis=0)
    vocals, _ = inference.separate(same, 44100, inference.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).max() < 1e-6


@needs_shared
@pytest.mark.parametrize("song", ["slow_motion_dream_excerpt.mp3", "karissa_hobbs_lets_go_fishin.ogg"])
def test_inference_cli_on_real_songs(tiny_checkpoint, tmp_path, song):
    path = SONGS / song
    tmp_path = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--audio", str(path), "--checkpoint",
                             str(tiny_checkpoint), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = sf.info(str(path))
    stem = path.stem
    for name in ("vocals", "accompaniment"):
        out = tmp_path / f"{stem}_{name}.wav"
        audio, rate = sf.read(str(out), dtype="float32")
        assert rate == info.samplerate == 44100
        assert audio.shape == (info.frames, 2)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}_accompaniment.wav", f"{stem}_vocals.wav"]
    assert "real time" in result.stdout


def test_mask_exponent_from_the_checkpoint_raises_the_masks_to_its_power(tiny_checkpoint, tmp_path):
    """train.py stores the fitted mask_exponent in best_model.pth; the separator raises the
    network's masks to it (checkpoints without one: 1), and --mask-exponent overrides it."""
    model, checkpoint = load_model(tiny_checkpoint)
    assert inference.checkpoint_mask_exponent(checkpoint) == 1.0
    assert inference.checkpoint_mask_exponent(dict(checkpoint, mask_exponent=0.5)) == 0.5
    assert inference.checkpoint_mask_exponent(dict(checkpoint, mask_exponent=0.5), override=0.8) == 0.8
    patches = torch.rand(2, 3, 512, 128)
    plain = inference.model_mask_fn(model, torch.device("cpu"), amp=False)(patches, 0)
    half = inference.model_mask_fn(model, torch.device("cpu"), amp=False, exponent=0.5)(patches, 0)
    assert torch.allclose(half, plain.sqrt(), atol=1e-6)
    assert (half >= plain).all() and (half > plain + 0.01).any()  # a fuller mask: more of the mixture is voice
    fitted = tmp_path / "fitted.pth"
    torch.save(dict(torch.load(tiny_checkpoint, weights_only=False), mask_exponent=0.5,
                    mask_exponent_sdr={0.5: 3.21, 1.0: 2.47}), fitted)
    song = tmp_path / "song.wav"
    sf.write(str(song), noise(2, 3.0, 22050).T, 22050)
    vocals = {}
    for name, path, flags in (("fitted", fitted, []), ("plain", tiny_checkpoint, []), ("override", fitted, ["--mask-exponent", "1"])):
        result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--audio", str(song), "--checkpoint",
                                 str(path), "--output-dir", str(tmp_path / name), *flags],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"mask exponent {0.5 if name == 'fitted' else 1:g}" in result.stdout
        # the model line quotes the validation SDR train.py measured with the exponent in use
        assert dict(fitted="validation SDR 3.21 dB)", override="validation SDR 2.47 dB)",
                    plain="dB with the masks as predicted)")[name] in result.stdout
        vocals[name] = sf.read(str(tmp_path / name / "song_vocals.wav"), dtype="float32")[0]
    assert np.array_equal(vocals["override"], vocals["plain"])
    assert np.sum(vocals["fitted"] ** 2) > 1.05 * np.sum(vocals["plain"] ** 2)
