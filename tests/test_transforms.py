"""STFT, patches, normalisation and the oracle mask: the numbers everything else relies on."""
import numpy as np
import pytest
import torch

import data_generator as dg


def test_stft_has_the_papers_shape():
    audio = torch.randn(2, dg.SAMPLE_RATE * 3)
    spec = dg.stft(audio)
    assert spec.shape == (2, 512, dg.SAMPLE_RATE * 3 // 768 + 1)
    assert spec.dtype == torch.complex64
    # a 1 kHz tone peaks in bin 1000 / 8 = 125
    tone = torch.sin(2 * torch.pi * 1000 * torch.arange(dg.SAMPLE_RATE) / dg.SAMPLE_RATE)
    assert int(dg.stft(tone).abs().mean(-1).argmax()) == 125


@pytest.mark.parametrize("length", [500, 8192, 98560, 123457])
def test_stft_istft_round_trip(length):
    # faded sinusoids below 3.5 kHz put nothing in the dropped Nyquist bin, so the round trip is
    # exact up to float rounding, tail samples included (the hop is longer than half the window)
    rng = np.random.default_rng(length)
    t = torch.arange(length, dtype=torch.float64) / dg.SAMPLE_RATE  # float32 phases would add noise
    audio = sum(a * torch.sin(2 * torch.pi * f * t + p)
                for a, f, p in zip(rng.uniform(0.1, 1, 20), rng.uniform(30, 3500, 20), rng.uniform(0, 6, 20)))
    audio = audio * torch.sin(torch.pi * torch.arange(length) / length) ** 2
    audio = torch.stack([audio, -0.5 * audio]).float()
    error = (dg.istft(dg.stft(audio), length) - audio).abs().max()
    assert error <= 1e-5 * audio.abs().max()


def test_patch_samples_give_exactly_one_patch_without_padding():
    spec = dg.stft(torch.randn(dg.PATCH_SAMPLES), center=False)
    assert spec.shape[-1] == dg.PATCH_FRAMES


@pytest.mark.parametrize("frames,overlap,expected", [(1, 0.5, 1), (73, 0.5, 1), (128, 0.5, 1), (129, 0.5, 2),
                                                     (192, 0.5, 2), (193, 0.5, 3), (1000, 0.75, 29), (256, 0.0, 2)])
def test_patch_count(frames, overlap, expected):
    assert dg.n_patches(frames, dg.patch_hop(overlap)) == expected


@pytest.mark.parametrize("frames", [5, 73, 128, 300, 1001])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_patch_unpatch_identity(frames, overlap):
    hop = dg.patch_hop(overlap)
    spec = torch.rand(2, 512, frames)
    patches = dg.to_patches(spec, hop)
    assert patches.shape == (2, dg.n_patches(frames, hop), 512, 128)
    assert torch.equal(patches[:, 0, :, :min(frames, 128)], spec[:, :, :128])
    assert torch.allclose(dg.from_patches(patches, hop, frames), spec, atol=1e-6)


def test_patch_window_crossfades_without_gaps():
    w = dg.patch_window()
    assert w.min() > 0 and w.max() <= 1.01
    assert torch.allclose(w, w.flip(0))
    # with 50 % overlap the interior weights sum to a constant: no level bumps at patch borders
    total = w[:64] + w[64:]
    assert torch.allclose(total, total[0].expand(64), atol=1e-6)


def test_oracle_mask_properties():
    torch.manual_seed(0)
    vocals, accompaniment = torch.randn(2, 40000), torch.randn(2, 40000)
    mixture_mag = dg.stft(vocals + accompaniment).abs()
    vocals_mask = dg.oracle_mask(dg.stft(vocals).abs(), mixture_mag)
    accompaniment_mask = dg.oracle_mask(dg.stft(accompaniment).abs(), mixture_mag)
    assert vocals_mask.shape == mixture_mag.shape
    assert vocals_mask.min() >= 0 and vocals_mask.max() <= 1
    # |V| + |A| >= |V + A|: the two masks never leave part of the mixture unclaimed
    heard = mixture_mag > 1e-3
    assert torch.all((vocals_mask + accompaniment_mask)[heard] >= 0.999)
    assert torch.all(dg.oracle_mask(mixture_mag, mixture_mag)[heard] > 0.999)  # target == mixture -> 1
    assert torch.all(dg.oracle_mask(torch.zeros_like(mixture_mag), mixture_mag) == 0)
    half = dg.oracle_mask(dg.stft(0.5 * (vocals + accompaniment)).abs(), mixture_mag)
    assert torch.allclose(half[mixture_mag > 1e-3], torch.tensor(0.5), atol=1e-4)
    silent = dg.oracle_mask(torch.zeros(3, 4), torch.zeros(3, 4))
    assert torch.all(silent == 0) and torch.isfinite(silent).all()


def test_normalisation_is_level_invariant_and_keeps_silence():
    mixture, target = torch.rand(3, 512, 128), torch.rand(3, 512, 128) * 0.5
    a = dg.normalise(mixture, target)
    b = dg.normalise(mixture * 37.0, target * 37.0)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert torch.allclose(a[0].mean(dim=(-2, -1)), torch.ones(3), atol=1e-5)
    silent = dg.normalise(torch.zeros(1, 512, 128))[0]
    assert torch.all(silent == 0)


def test_normalisation_gives_music_one_level_whatever_silence_pads_it():
    """A 7 s clip in a 12 s patch (the rest zeros, as the separator pads a short song or a
    song's last patch) comes out exactly as the same music filling a patch on its own."""
    music = torch.rand(512, 73) + 0.1
    padded = torch.nn.functional.pad(music, (0, 55))
    (full,) = dg.normalise(torch.cat([music, music[:, :55]], dim=-1))
    (short,) = dg.normalise(padded)
    assert torch.allclose(short[:, :73].mean(), torch.tensor(1.0), atol=1e-5)
    assert torch.all(short[:, 73:] == 0)
    assert torch.allclose(short[:, :73], music / music.mean(), atol=1e-5)
    assert torch.allclose(full.mean(), torch.tensor(1.0), atol=1e-5)
    # only digital silence is left out: 28 frames of very quiet sound count (101 frames, not 73)
    quiet = padded.clone()
    quiet[:, 100:] = 1e-6
    assert torch.allclose(dg.normalise(quiet)[0][:, :73].mean(), torch.tensor(101 / 73), atol=1e-3)


def test_resample_keeps_a_tone_at_its_frequency():
    rate = 44100
    t = np.arange(rate) / rate
    tone = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)]).astype(np.float32)
    low = dg.resample(tone, rate, dg.SAMPLE_RATE)
    assert low.shape == (2, dg.SAMPLE_RATE)
    peaks = np.abs(np.fft.rfft(low, axis=1)).argmax(axis=1)  # 1 s of audio: bin == Hz
    assert list(peaks) == [440, 880]
