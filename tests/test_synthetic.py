"""synthetic.py: the built-in multitrack set, and how data_generator serves it."""

import numpy as np
import torch

import data_generator as dg
import datasets
import synthetic


def test_synthetic_set_is_deterministic_by_seed():
    a = synthetic.synthetic_track("train", 3, seed=7, seconds=4)
    b = synthetic.synthetic_track("train", 3, seed=7, seconds=4)
    assert np.array_equal(a.vocals, b.vocals) and np.array_equal(a.accompaniment, b.accompaniment)
    other_seed = synthetic.synthetic_track("train", 3, seed=8, seconds=4)
    other_song = synthetic.synthetic_track("train", 4, seed=7, seconds=4)
    other_split = synthetic.synthetic_track("valid", 3, seed=7, seconds=4)
    for other in (other_seed, other_song, other_split):
        assert not np.allclose(a.vocals, other.vocals)


def test_synthetic_song_has_a_singer_over_a_band():
    track = synthetic.synthetic_track("test", 0, seconds=10)
    assert track.vocals.shape == track.accompaniment.shape == (2, 10 * dg.SAMPLE_RATE)
    assert track.vocals.dtype == np.float32 and np.isfinite(track.mixture).all()
    assert np.abs(track.mixture).max() < 1
    # the voice is harmonic: its spectrum is peaky, and it rests between phrases
    spec = dg.stft(torch.from_numpy(track.vocals[0])).abs()
    frame_energy = spec.square().sum(0)
    assert (frame_energy < 1e-4 * frame_energy.max()).float().mean() > 0.05, "no rests between phrases"
    sung = spec[:, frame_energy > 0.1 * frame_energy.max()]
    assert float(sung.max(0).values.mean() / sung.mean(0).mean()) > 8, "voice spectrum is not harmonic"
    # formants: energy of sung frames is spread up to several kHz, not only the fundamental
    assert float(spec[256:].square().sum() / spec.square().sum()) > 0.01
    # vocals and accompaniment are comparable in level, as in a real mix
    ratio = np.sqrt(np.mean(track.vocals ** 2) / np.mean(track.accompaniment ** 2))
    assert 0.3 < ratio < 3


def test_synthetic_songs_at_another_rate_keep_their_length_and_headroom():
    track = synthetic.synthetic_track("test", 1, rate=44100, seconds=3)
    assert track.vocals.shape == (2, 3 * 44100) and track.name == "synthetic-test-001"
    assert 0.5 < np.abs(track.mixture).max() <= 0.9 + 1e-6  # scaled to leave headroom, not beyond


def test_load_tracks_serves_the_synthetic_set_by_split():
    source = datasets.DataSource("synthetic")
    valid = datasets.load_tracks(source, "valid", seed=3)
    assert len(valid) == synthetic.SYNTHETIC_SPLIT_SIZES["valid"]
    assert [t.name for t in valid] == [f"synthetic-valid-{i:03d}" for i in range(len(valid))]
    assert np.array_equal(valid[1].vocals, synthetic.synthetic_track("valid", 1, seed=3).vocals)
    two = datasets.load_tracks(source, "train", n_songs=2)
    assert [t.name for t in two] == ["synthetic-train-000", "synthetic-train-001"]
    assert two[0].vocals.shape == (2, int(synthetic.SYNTHETIC_SECONDS * dg.SAMPLE_RATE))
