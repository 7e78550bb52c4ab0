"""data_generator.py: STFT, patches, normalisation and the oracle mask (the numbers everything else relies on),
training batches of remixes, and the sanity check's command line."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import audio
import data_generator as dg
import datasets
import synthetic
from conftest import make_stems_folder, REPO, assert_one_line_error, run_script


# -----------------------------------------------------------------------------
# STFT, patches, normalisation, oracle mask

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



# -----------------------------------------------------------------------------
# training examples

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


def test_random_remix_mixes_different_songs_and_keeps_half_as_mixed():
    """Vocals and accompaniment of an example come from independently drawn songs, or, in AS_MIXED_SHARE (a half)
    of the draws, from one song as mixed: song i is level 0.1 (i + 1) in vocals and minus that in accompaniment,
    longer than a patch at any speed. Of 64 examples about 0.5 + 0.5 / 4 pair a song with itself."""
    levels = np.array([0.1 * (i + 1) for i in range(4)])
    n = 15 * dg.SAMPLE_RATE
    tracks = [audio.Track(f"song{i}", np.full((2, n), level, np.float32), np.full((2, n), -level, np.float32))
              for i, level in enumerate(levels)]
    vocals, accompaniment = dg.training_batch([tracks], 64, np.random.default_rng(0))
    assert vocals.shape == accompaniment.shape == (64, dg.PATCH_SAMPLES) and vocals.dtype == np.float32
    inner = slice(1000, -1000)  # away from the resampler's edges
    songs = []
    for v, a in zip(vocals[:, inner], -accompaniment[:, inner]):
        pair = [int(np.abs(np.median(x) - levels).argmin()) for x in (v, a)]
        assert np.allclose(v, levels[pair[0]], atol=1e-3) and np.allclose(a, levels[pair[1]], atol=1e-3)
        songs.append(pair)
    same = sum(v == a for v, a in songs)
    assert 30 <= same <= 50, same  # 40 expected
    assert len({v for v, _ in songs}) == len({a for _, a in songs}) == 4


def test_songs_as_mixed_keep_one_start_one_channel_one_speed():
    """A long track whose accompaniment is a copy of its vocals (a ramp, rising in the left channel, falling in the
    right): an example drawn as mixed has its two stems equal sample for sample, one drawn apart never does (another
    start, speed or channel). Short clips laid end to end likewise: a segment as mixed is one clip in both stems,
    at one speed, so both start and end together."""
    n, slope = 15 * dg.SAMPLE_RATE, 0.5 / (15 * dg.SAMPLE_RATE)
    ramp = (0.2 + slope * np.arange(n)).astype(np.float32)
    tracks = [audio.Track(f"ramp{i}", np.stack([ramp, -ramp]), np.stack([ramp, -ramp])) for i in range(3)]
    vocals, accompaniment = dg.training_batch([tracks], 40, np.random.default_rng(4))
    equal = [np.array_equal(v, a) for v, a in zip(vocals, accompaniment)]
    assert 12 <= sum(equal) <= 28, sum(equal)  # 20 expected
    assert all(np.abs(v - a).max() > 0.01 for v, a, e in zip(vocals, accompaniment, equal) if not e)
    levels, clips = constant_clips([4.5, 5.0, 5.5, 6.0])
    rng, segments, as_mixed = np.random.default_rng(5), 0, 0
    for _ in range(10):
        vocals, accompaniment = dg.random_remix([clips], np.ones((1, 2)), rng)
        for (vi, v0, v1), (ai, a0, a1) in zip(segment_bounds(vocals, levels), segment_bounds(accompaniment, levels)):
            segments += 1
            as_mixed += vi == ai and (v0, v1) == (a0, a1) and np.array_equal(vocals[v0:v1], -accompaniment[v0:v1])
    assert 0.3 * segments <= as_mixed <= 0.8 * segments, (as_mixed, segments)  # 0.5 + 0.5 / 4 expected


def test_long_tracks_give_one_excerpt_per_source_at_a_random_speed_from_a_random_channel():
    """A ramp (rising in the left channel, falling in the right) shows the excerpt: one straight
    piece whose slope is the speed factor and whose sign is the channel."""
    n, slope = 15 * dg.SAMPLE_RATE, 0.5 / (15 * dg.SAMPLE_RATE)
    ramp = (0.2 + slope * np.arange(n)).astype(np.float32)
    tracks = [audio.Track(f"ramp{i}", np.stack([ramp, -ramp]), np.stack([ramp, -ramp])) for i in range(2)]
    vocals, accompaniment = dg.training_batch([tracks], 12, np.random.default_rng(1))
    inner = np.arange(1000, dg.PATCH_SAMPLES - 1000)
    factors, signs = [], []
    for x in np.concatenate([vocals, accompaniment]):
        fit, residual, *_ = np.polyfit(inner, x[inner], 1, full=True)
        assert np.sqrt(residual[0] / len(inner)) < 1e-3  # one contiguous excerpt, no cut and no padding
        factors.append(abs(fit[0]) / slope)
        signs.append(np.sign(fit[0]))
    factors = np.array(factors)
    assert (factors > 0.85 - 1e-3).all() and (factors < 1.15 + 1e-3).all() and factors.std() > 0.05
    assert not np.allclose(factors[:12], factors[12:], atol=1e-3)  # each source at its own speed
    assert set(signs) == {-1.0, 1.0}  # both channels


def test_patch_spectrograms_are_normalised_patches():
    tracks = [synthetic.synthetic_track("train", i, seconds=13) for i in range(3)]
    vocals, accompaniment = dg.training_batch([tracks], 8, np.random.default_rng(0))
    mixture, target = dg.patch_spectrograms(torch.from_numpy(vocals), torch.from_numpy(accompaniment))
    assert mixture.shape == target.shape == (8, 1, 512, 128)
    # normalised: mean 1 over the frames that hold sound
    sounding = mixture.amax(dim=2, keepdim=True) > 0
    level = (mixture * sounding).sum(dim=(1, 2, 3)) / (512 * sounding.sum(dim=(1, 2, 3)))
    assert torch.allclose(level, torch.ones(8), atol=1e-4)
    assert torch.all(dg.oracle_mask(target, mixture) <= 1)
    _, accompaniment_target = dg.patch_spectrograms(torch.from_numpy(vocals), torch.from_numpy(accompaniment),
                                                    "accompaniment")
    assert not torch.allclose(accompaniment_target, target)


def test_training_batches_are_the_same_for_the_same_seed():
    tracks = [synthetic.synthetic_track("train", i, seconds=6) for i in range(3)]
    a = dg.training_batch([tracks], 3, np.random.default_rng(5))
    b = dg.training_batch([tracks], 3, np.random.default_rng(5))
    c = dg.training_batch([tracks], 3, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[0], c[0])


def constant_clips(seconds):
    """Short tracks that tell themselves apart: track i is level 0.1 (i + 1) in vocals and minus
    that in accompaniment, plus a slow ramp of 0.03 over the clip so that a clip following
    another of the same track shows where it starts; seconds[i] long."""
    levels = [0.1 * (i + 1) for i in range(len(seconds))]
    tracks = []
    for i, (s, level) in enumerate(zip(seconds, levels)):
        clip = (level + 0.03 * np.linspace(0, 1, int(s * dg.SAMPLE_RATE), dtype=np.float32))[None].repeat(2, 0)
        tracks.append(audio.Track(f"clip{i}", clip, -clip))
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


def test_filled_patches_hold_whole_remixes_end_to_end():
    """Clips shorter than a patch are laid end to end, so the mixture never falls silent. In each
    segment vocals and accompaniment start together, every clip but those the patch's end cuts is
    whole (its length changed only by its speed, 0.85-1.15 x), and the next segment starts where
    the longer clip of the two ends."""
    seconds = [4.5, 5.0, 5.5, 6.0, 6.5, 7.0]
    levels, tracks = constant_clips(seconds)
    rng = np.random.default_rng(2)
    for _ in range(10):
        vocals, accompaniment = dg.random_remix([tracks], np.ones((1, 2)), rng)
        assert vocals.shape == accompaniment.shape == (dg.PATCH_SAMPLES,)
        assert (np.abs(vocals) + np.abs(accompaniment) > 0).all()  # music throughout, no padding
        v_runs, a_runs = segment_bounds(vocals, levels), segment_bounds(accompaniment, levels)
        assert 2 <= len(v_runs) == len(a_runs) <= 4  # 12 s holds two to four segments of 3.9-8.2 s
        for k, ((vi, v0, v1), (ai, a0, a1)) in enumerate(zip(v_runs, a_runs)):
            assert abs(v0 - a0) <= 16  # start together
            if k + 1 < len(v_runs):
                for i, first, last in ((vi, v0, v1), (ai, a0, a1)):
                    whole = len(tracks[i].vocals[0])
                    assert whole / 1.15 - 16 <= last - first + 1 <= whole / 0.85 + 16
                assert abs(v_runs[k + 1][1] - (max(v1, a1) + 1)) <= 16


def test_filled_patches_with_speed_changes_have_no_gaps():
    """With random speeds (0.85-1.15 x), each source is resampled on its own: segments still
    start together, every whole clip of 6.8 s lasts 5.9-8.0 s, and nothing is silent."""
    levels, tracks = constant_clips([6.8] * 6)
    rng = np.random.default_rng(3)
    for _ in range(10):
        vocals, accompaniment = dg.random_remix([tracks], np.ones((1, 2)), rng)
        assert (np.abs(vocals) + np.abs(accompaniment) > 0).all()
        v_runs, a_runs = segment_bounds(vocals, levels), segment_bounds(accompaniment, levels)
        assert 2 <= len(v_runs) == len(a_runs) <= 3
        for (_, v0, v1), (_, a0, a1) in list(zip(v_runs, a_runs))[:-1]:
            assert abs(v0 - a0) <= 16
            for start, end in ((v0, v1), (a0, a1)):
                assert 5.8 * dg.SAMPLE_RATE < end - start < 8.1 * dg.SAMPLE_RATE


# -----------------------------------------------------------------------------
# the sanity check: python data_generator.py

def test_sanity_check_runs_without_ffmpeg_and_writes_its_png(tmp_path):
    """musdb refuses to import without ffmpeg: importing data_generator and using the synthetic
    set must not touch it."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # the venv's python, no ffmpeg
    assert shutil.which("ffmpeg", path=env["PATH"]) is None and shutil.which("ffprobe", path=env["PATH"]) is None
    code = ("import sys, datasets, synthetic; datasets.load_tracks(datasets.DataSource('synthetic'), 'train', 1); "
            "assert not {'musdb', 'stempeg', 'museval'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "out" / "check.png"
    png.parent.mkdir()
    result = run_script("data_generator.py", "--synthetic", "--n-songs", "2", "--output", png, "--seed", "3",
                        env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "dataset: built-in SYNTHETIC" in result.stdout and "validation: 6 tracks" in result.stdout
    assert "training source: 2 tracks of 20.0-20.0 s (215-215 frames), stems scaled by (1.0, 1.0)" in result.stdout
    assert "training batch (random remixes): mixture and target (16, 1, 512, 128)" in result.stdout
    assert "validation set (songs as mixed)" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["check.png"]  # no partial file left


@pytest.mark.parametrize("args,words", [(["--musdb-root", "/nonexistent"], ["--musdb-root", "no such folder"]),
                                        (["--synthetic", "--n-songs", "0"], ["--n-songs", "at least 1"]),
                                        (["--synthetic", "--n-songs", "many"], ["--n-songs", "invalid int"]),
                                        (["--synthetic", "--output", "missing/x.png"], ["--output", "no such folder"]),
                                        (["--target", "vocals"], ["unrecognized arguments", "--target"])])
def test_sanity_check_errors_are_one_line_and_write_nothing(tmp_path, args, words):
    result = run_script("data_generator.py", *args, cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_source_weights_decide_where_each_stem_comes_from():
    """Weights 1 : 0 never draw the second source; equal weights draw both, vocals and accompaniment apart;
    weights per stem (the default beside MUSDB18) take the vocals from both and the accompaniment from the first."""
    first = [audio.Track(f"a{i}", np.full((1, 2 * dg.PATCH_SAMPLES), 0.1, np.float32),
                      np.full((1, 2 * dg.PATCH_SAMPLES), 0.2, np.float32)) for i in range(3)]
    second = [audio.Track(f"b{i}", np.full((1, 2 * dg.PATCH_SAMPLES), 0.5, np.float32),
                       np.full((1, 2 * dg.PATCH_SAMPLES), 0.7, np.float32)) for i in range(3)]
    vocals, accompaniment = dg.training_batch([first, second], 64, np.random.default_rng(0), weights=[1, 0])
    assert np.allclose(np.median(vocals, axis=1), 0.1, atol=0.01)
    assert np.allclose(np.median(accompaniment, axis=1), 0.2, atol=0.01)
    vocals, accompaniment = dg.training_batch([first, second], 64, np.random.default_rng(0))
    from_second = np.median(vocals, axis=1) > 0.3, np.median(accompaniment, axis=1) > 0.45
    assert 16 < from_second[0].sum() < 48 and 16 < from_second[1].sum() < 48
    assert (from_second[0] != from_second[1]).any()  # MIR-1K vocals over MUSDB18 accompaniment happen
    weights = dg.default_weights(datasets.DataSource("musdb", stems=("mir",)), 2)
    assert weights.tolist() == [[1, 1], [1, 0]] and "for the accompaniment 1 : 0" in dg.describe_weights(weights)
    vocals, accompaniment = dg.training_batch([first, second], 64, np.random.default_rng(0), weights)
    assert 16 < (np.median(vocals, axis=1) > 0.3).sum() < 48
    assert np.allclose(np.median(accompaniment, axis=1), 0.2, atol=0.01)
    assert dg.default_weights(datasets.DataSource("stems", stems=("a", "b")), 2).tolist() == [[1, 1], [1, 1]]
    same = dg.training_batch([first], 4, np.random.default_rng(3))
    weighted = dg.training_batch([first], 4, np.random.default_rng(3), [7.0])
    assert all(np.array_equal(a, b) for a, b in zip(same, weighted))


def test_sanity_check_with_a_stems_folder_shows_both_sources(tmp_path):
    make_stems_folder(tmp_path / "mine", ["a_1", "b_1", "c_1"], "mixture", seconds=4)
    result = run_script("data_generator.py", "--synthetic", "--n-songs", "2", "--stems", tmp_path / "mine",
                        "--output", tmp_path / "check.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"+ stems folder {tmp_path / 'mine'}" in result.stdout
    assert "training source: 2 tracks" in result.stdout and "training source: 2 tracks of 4.0-4.0 s" in result.stdout
    assert "validation: 6 tracks" in result.stdout  # with the synthetic set, its validation songs
