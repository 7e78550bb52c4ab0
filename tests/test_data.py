"""Datasets: the synthetic set, training examples, the MUSDB18 loader on real previews."""
import time

import numpy as np
import pytest
import torch

import data_generator as dg
from conftest import MUSDB7, needs_ffmpeg, needs_shared


def test_synthetic_set_is_deterministic_by_seed():
    a = dg.synthetic_track("train", 3, seed=7, seconds=4)
    b = dg.synthetic_track("train", 3, seed=7, seconds=4)
    assert np.array_equal(a.vocals, b.vocals) and np.array_equal(a.accompaniment, b.accompaniment)
    other_seed = dg.synthetic_track("train", 3, seed=8, seconds=4)
    other_song = dg.synthetic_track("train", 4, seed=7, seconds=4)
    other_split = dg.synthetic_track("valid", 3, seed=7, seconds=4)
    for other in (other_seed, other_song, other_split):
        assert not np.allclose(a.vocals, other.vocals)


def test_synthetic_song_has_a_singer_over_a_band():
    track = dg.synthetic_track("test", 0, seconds=10)
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


def test_excerpt_of_a_short_track_is_used_whole_in_zeros():
    audio = np.ones((2, 1000), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        start = dg.random_start(1000, rng, 5000)
        part = dg.excerpt(audio, start, 5000)
        assert part.shape == (2, 5000) and part.sum() == 2000  # all of the track, nowhere cut
    long = np.arange(20000, dtype=np.float32)[None].repeat(2, 0)
    start = dg.random_start(20000, rng, 5000)
    assert np.array_equal(dg.excerpt(long, start, 5000)[0], long[0, start:start + 5000])


def test_random_remix_mixes_different_songs_with_gains():
    tracks = [dg.synthetic_track("train", i, seconds=13) for i in range(3)]
    rng = np.random.default_rng(0)
    vocals, accompaniment = dg.training_batch(tracks, 8, rng, gain=True)
    assert vocals.shape == accompaniment.shape == (8, dg.PATCH_SAMPLES)
    levels = np.sqrt(np.mean(vocals ** 2, axis=1))
    assert levels.max() / max(levels.min(), 1e-9) > 1.3  # random gains
    mixture, target = dg.patch_spectrograms(torch.from_numpy(vocals), torch.from_numpy(accompaniment))
    assert mixture.shape == target.shape == (8, 1, 512, 128)
    # normalised: mean 1 over the frames that hold sound (short synthetic songs leave silence)
    sounding = mixture.amax(dim=2, keepdim=True) > 0
    level = (mixture * sounding).sum(dim=(1, 2, 3)) / (512 * sounding.sum(dim=(1, 2, 3)))
    assert torch.allclose(level, torch.ones(8), atol=1e-4)
    assert (mixture.mean(dim=(1, 2, 3)) < 1 - 1e-3).any()  # some patches do hold silence
    # without remixing, gains or channel swap an example is one excerpt of one song as mixed
    song = tracks[0]
    v, a = dg.random_remix([song], np.random.default_rng(1), remix=False, gain=False, channel_swap=False, speed=False)
    loudest = int(np.abs(v).argmax())
    starts = [s for s in range(song.vocals.shape[1] - dg.PATCH_SAMPLES + 1)
              if song.vocals[0, s + loudest] == v[loudest] and np.array_equal(song.vocals[0, s:s + dg.PATCH_SAMPLES], v)]
    assert len(starts) == 1
    s = starts[0]
    assert np.array_equal(v, song.vocals[0, s:s + dg.PATCH_SAMPLES])
    assert np.array_equal(a, song.accompaniment[0, s:s + dg.PATCH_SAMPLES])


def test_dataset_path_errors_are_one_line(tmp_path):
    with pytest.raises(dg.DataError, match="no such folder"):
        dg.find_data_source(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(dg.DataError, match="no MUSDB18 tracks"):
        dg.find_data_source(tmp_path)


def test_non_interactive_without_a_dataset_falls_back_to_synthetic(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dg, "REPO_DIR", tmp_path)
    monkeypatch.setattr(dg, "PREVIEW_DIR", tmp_path / "MUSDB18" / "MUSDB18-7")
    source = dg.find_data_source(interactive=False)
    assert source.kind == "synthetic"
    assert "SYNTHETIC" in capsys.readouterr().out


def test_failed_download_is_a_clear_message_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    import urllib.error
    import musdb

    def offline(*args, **kwargs):
        (tmp_path / "MUSDB18" / "MUSDB18-7").mkdir(parents=True)  # musdb creates its root first
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dg, "REPO_DIR", tmp_path)
    monkeypatch.setattr(dg, "PREVIEW_DIR", tmp_path / "MUSDB18" / "MUSDB18-7")
    monkeypatch.setattr(musdb, "DB", offline)
    source = dg.find_data_source(download=True, interactive=False)
    out = capsys.readouterr().out
    assert source.kind == "synthetic"
    assert "Download of the MUSDB18 previews failed" in out and "offline" in out
    assert not (tmp_path / "MUSDB18" / "MUSDB18-7").exists()


@needs_shared
@needs_ffmpeg
def test_musdb_loader_on_the_shared_previews(tmp_path, monkeypatch):
    source = dg.find_data_source(MUSDB7)
    assert source.kind == "musdb" and not source.is_wav
    assert len(dg.musdb_tracks(source, "train", "train")) == 80
    valid_names = [t.name for t in dg.musdb_tracks(source, "train", "valid")]
    assert len(valid_names) == 14 and "ANiMAL - Rockshow" in valid_names
    tracks = dg.load_tracks(source, "valid", 2, tmp_path, progress=False)
    assert [t.name for t in tracks] == valid_names[:2]
    for track in tracks:
        assert track.vocals.shape[0] == 2 and track.vocals.shape == track.accompaniment.shape
        # ~6.8 s at 8192 Hz: about 73 frames, shorter than one 128-frame patch
        assert 6.0 < track.vocals.shape[1] / dg.SAMPLE_RATE < 7.5
        assert dg.n_frames(track.vocals.shape[1]) < dg.PATCH_FRAMES
        assert np.abs(track.vocals).max() > 0.01 and np.isfinite(track.mixture).all()
        mixture, target = dg.validation_patches(track)
        assert mixture.shape == (2, 1, 512, 128)  # short tracks are padded, not dropped
    # the second load reads the cache and never decodes
    import musdb
    monkeypatch.setattr(musdb.MultiTrack, "stems", property(lambda self: pytest.fail("decoded again")))
    t0 = time.time()
    again = dg.load_tracks(source, "valid", 2, tmp_path, progress=False)
    assert np.array_equal(again[0].vocals, tracks[0].vocals)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("remix", [True, False])
def test_short_clips_share_one_position_whatever_their_speeds(remix):
    """With --short-tracks pad, two clips shorter than a patch land at the same place in it, each
    whole, after independent speed changes (and a song as mixed keeps its sources in step)."""
    noise = np.random.default_rng(0).uniform(0.5, 1.0, (2, int(6.8 * dg.SAMPLE_RATE))).astype(np.float32)
    tracks = [dg.Track(f"clip{i}", noise * (i + 1), noise * (i + 1)) for i in range(4)]
    rng = np.random.default_rng(1)
    for _ in range(20):
        vocals, accompaniment = dg.random_remix(tracks, rng, remix=remix, channel_swap=False, short_tracks="pad")
        onsets = [int(np.flatnonzero(np.abs(x) > 0.05)[0]) for x in (vocals, accompaniment)]
        ends = [int(np.flatnonzero(np.abs(x) > 0.05)[-1]) for x in (vocals, accompaniment)]
        assert abs(onsets[0] - onsets[1]) <= 8, onsets
        for onset, end in zip(onsets, ends):  # whole: 6.8 s at 0.85-1.15 x speed is 5.9-8.0 s
            assert 5.8 * dg.SAMPLE_RATE < end - onset < 8.1 * dg.SAMPLE_RATE
        if not remix:
            assert np.allclose(vocals, accompaniment)


def constant_clips(seconds):
    """Short tracks that tell themselves apart: track i is level 0.1 (i + 1) in vocals and minus
    that in accompaniment, plus a slow ramp of 0.03 over the clip so that a clip following
    another of the same track shows where it starts; seconds[i] long."""
    levels = [0.1 * (i + 1) for i in range(len(seconds))]
    tracks = []
    for i, (s, level) in enumerate(zip(seconds, levels)):
        clip = (level + 0.03 * np.linspace(0, 1, int(s * dg.SAMPLE_RATE), dtype=np.float32))[None].repeat(2, 0)
        tracks.append(dg.Track(f"clip{i}", clip, -clip))
    return levels, tracks


def segment_bounds(x, levels):
    """(track index, first sample, last sample) of each clip in a signal made of constant_clips:
    clips begin wherever the signal jumps, and runs under 100 samples (the few samples a
    resampler rings at each edge) are dropped."""
    x = np.abs(x)
    cuts = np.concatenate([[0], np.flatnonzero(np.abs(np.diff(x)) > 0.015) + 1, [len(x)]])
    runs = []
    for start, end in zip(cuts[:-1], cuts[1:]):
        if end - start > 100 and x[start:end].mean() > 0.05:
            track = int(np.abs(np.median(x[start:start + 50]) - np.asarray(levels)).argmin())
            runs.append((track, int(start), int(end - 1)))
    return runs


@pytest.mark.parametrize("remix", [True, False])
def test_filled_patches_hold_whole_remixes_end_to_end(remix):
    """--short-tracks fill (the default): clips shorter than a patch are laid end to end, so the
    mixture never falls silent. In each segment vocals and accompaniment start together, every
    clip but those the patch's end cuts is whole, and the next segment starts where the longer
    clip of the two ends (speed changes off, so that lengths are exact)."""
    seconds = [4.5, 5.0, 5.5, 6.0, 6.5, 7.0]
    levels, tracks = constant_clips(seconds)
    rng = np.random.default_rng(2)
    for _ in range(10):
        vocals, accompaniment = dg.random_remix(tracks, rng, remix=remix, channel_swap=False, speed=False)
        assert vocals.shape == accompaniment.shape == (dg.PATCH_SAMPLES,)
        assert (np.abs(vocals) + np.abs(accompaniment) > 0).all()  # music throughout, no padding
        v_runs, a_runs = segment_bounds(vocals, levels), segment_bounds(accompaniment, levels)
        assert 2 <= len(v_runs) == len(a_runs) <= 3  # 12 s holds two or three segments of 4.5-7 s
        for k, ((vi, v0, v1), (ai, a0, a1)) in enumerate(zip(v_runs, a_runs)):
            assert v0 == a0  # start together
            if k + 1 < len(v_runs):
                assert v1 - v0 + 1 == len(tracks[vi].vocals[0]) and a1 - a0 + 1 == len(tracks[ai].vocals[0])
                assert v_runs[k + 1][1] == max(v1, a1) + 1
            if not remix:
                assert vi == ai  # one song as mixed
        if not remix:
            assert np.allclose(vocals, -accompaniment)


def test_filled_patches_with_speed_changes_have_no_gaps():
    """With random speeds (0.85-1.15 x), each source is resampled on its own: segments still
    start together, every whole clip of 6.8 s lasts 5.9-8.0 s, and nothing is silent."""
    levels, tracks = constant_clips([6.8] * 6)
    rng = np.random.default_rng(3)
    for _ in range(10):
        vocals, accompaniment = dg.random_remix(tracks, rng, channel_swap=False)
        assert (np.abs(vocals) + np.abs(accompaniment) > 0).all()
        v_runs, a_runs = segment_bounds(vocals, levels), segment_bounds(accompaniment, levels)
        assert 2 <= len(v_runs) == len(a_runs) <= 3
        for (_, v0, v1), (_, a0, a1) in list(zip(v_runs, a_runs))[:-1]:
            assert abs(v0 - a0) <= 16
            for start, end in ((v0, v1), (a0, a1)):
                assert 5.8 * dg.SAMPLE_RATE < end - start < 8.1 * dg.SAMPLE_RATE


def test_filled_patches_from_long_tracks_are_plain_excerpts():
    """Tracks longer than a patch never trigger filling: an example is one excerpt per source."""
    tracks = [dg.synthetic_track("train", i, seconds=13) for i in range(2)]
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = dg.random_remix(tracks, np.random.default_rng(3), short_tracks="fill")
        b = dg.random_remix(tracks, np.random.default_rng(3), short_tracks="pad")
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="short_tracks"):
        dg.random_remix(tracks, rng, short_tracks="stretch")
