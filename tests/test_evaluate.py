"""evaluate.py: the command line on folders of stems, the held-apart tracks, MUSDB18 previews, and live separation."""
import json

import numpy as np
import pytest
import soundfile as sf

import audio
import data_generator as dg
import scores
from conftest import MUSDB7, assert_one_line_error, make_stems_folder, needs_ffmpeg, needs_shared, run_script


def stems(seconds, rate, seed=0):
    """A voice-like and an accompaniment-like stereo pair, (2, samples) float32 each."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 330 * t * (1 + 0.05 * np.sin(2 * np.pi * 0.5 * t))) * (np.sin(np.pi * t) ** 2)
    vocals = np.stack([voice, 0.8 * voice])
    accompaniment = 0.1 * rng.standard_normal((2, t.size)) + 0.2 * np.sin(2 * np.pi * 110 * t)
    return vocals.astype(np.float32), accompaniment.astype(np.float32)


def write_tracks(folder, n, rate=16000, seconds=4):
    for i in range(n):
        vocals, accompaniment = stems(seconds, rate, seed=i)
        track = folder / f"song{i}"
        track.mkdir(parents=True)
        sf.write(str(track / "mixture.wav"), (vocals + accompaniment).T, rate)
        sf.write(str(track / "vocals.wav"), vocals.T, rate)


def test_evaluate_on_a_folder_of_tracks(tmp_path):
    """The folder layout (mixture.wav + vocals.wav, accompaniment = mixture - vocals); the table
    and summary.json carry uSDR beside museval's metrics; per-track JSON in museval's format."""
    write_tracks(tmp_path / "tracks", 2)
    result = run_script("evaluate.py", "--folder", tmp_path / "tracks", "--methods", "mix,irm",
                        "--output-dir", tmp_path / "eval", timeout=600)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    summary = saved["summary"]
    assert summary["irm"]["vocals"]["SDR"] > summary["mix"]["vocals"]["SDR"] + 5
    for method in ("mix", "irm"):
        for stem in dg.STEMS:
            usdrs = [saved["per_track"][method][t][stem]["uSDR"] for t in ("song0", "song1")]
            assert summary[method][stem]["uSDR"] == pytest.approx(np.mean(usdrs))
    assert summary["irm"]["vocals"]["uSDR"] > summary["mix"]["vocals"]["uSDR"] + 5
    mixture, _ = audio.load_audio(tmp_path / "tracks" / "song0" / "mixture.wav")
    vocals, _ = audio.load_audio(tmp_path / "tracks" / "song0" / "vocals.wav")
    assert saved["per_track"]["mix"]["song0"]["vocals"]["uSDR"] == pytest.approx(scores.global_sdr(vocals, mixture))
    header = next(line for line in result.stdout.splitlines() if line.startswith("method"))
    assert header.split()[-5:] == ["SDR", "SIR", "SAR", "ISR", "uSDR"]
    track = json.loads((tmp_path / "eval" / "irm" / "song0.json").read_text())
    assert [t["name"] for t in track["targets"]] == list(dg.STEMS) and "museval_version" in track
    assert len(track["targets"][0]["frames"]) == 4 and set(track["targets"][0]["frames"][0]["metrics"]) == {
        "SDR", "SIR", "SAR", "ISR"}


def test_evaluate_stems_scores_only_what_training_held_apart(tmp_path):
    """--stems: the tracks train.py --stems kept out of training (here the last of 12); --folder: all of them,
    in any stems layout (here MIR-1K's stereo files)."""
    make_stems_folder(tmp_path / "mine", [f"s{i:02d}_x" for i in range(12)], "parts", seconds=2)
    result = run_script("evaluate.py", "--stems", tmp_path / "mine", "--methods", "mix", "--shifts", "1",
                        "--output-dir", tmp_path / "eval", timeout=600)
    assert result.returncode == 0, result.stderr
    per_track = json.loads((tmp_path / "eval" / "summary.json").read_text())["per_track"]["mix"]
    assert sorted(per_track) == ["s10_x", "s11_x"]
    make_stems_folder(tmp_path / "mir", ["a_1", "b_1", "c_1"], "mir1k", seconds=2)
    result = run_script("evaluate.py", "--folder", tmp_path / "mir", "--methods", "mix", "--shifts", "1",
                        "--output-dir", tmp_path / "eval2", timeout=600)
    assert result.returncode == 0, result.stderr
    per_track = json.loads((tmp_path / "eval2" / "summary.json").read_text())["per_track"]["mix"]
    assert sorted(per_track) == ["a_1", "b_1", "c_1"]


@pytest.mark.parametrize("flags,message", [
    (["--methods", "mix", "--stems", "/nonexistent/stems"], "--stems /nonexistent/stems: no such folder"),
    (["--methods", "mix,best"], "--methods takes model, mix, irm"),
    (["--methods", "mix"], "give exactly one of --musdb-root, --folder, --stems or --synthetic"),
    (["--methods", "mix", "--folder", "/nonexistent/tracks"], "no such folder")])
def test_bad_evaluate_flags(flags, message, tmp_path):
    result = run_script("evaluate.py", *flags, "--output-dir", tmp_path / "eval")
    assert_one_line_error(result, message)
    assert not (tmp_path / "eval").exists()


@needs_shared
@needs_ffmpeg
def test_evaluate_on_two_previews_scores_irm_above_mix(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_script("evaluate.py", "--checkpoint", tiny_checkpoint, "--musdb-root", MUSDB7, "--subset", "train",
                        "--split", "valid", "--tracks", "2", "--methods", "model,mix,irm", "--output-dir", out,
                        timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())["summary"]
    for method in ("model", "mix", "irm"):
        for stem in ("vocals", "accompaniment"):
            assert all(np.isfinite(v) for v in summary[method][stem].values()), (method, stem)
        assert len(list((out / method).glob("*.json"))) == 2  # per-track files
    for stem in ("vocals", "accompaniment"):
        assert summary["irm"][stem]["SDR"] > summary["mix"][stem]["SDR"] + 3
    # the mixture as the estimate of the vocals leaves all the accompaniment in: a negative SDR
    assert summary["mix"]["vocals"]["SDR"] < 0
    assert "IRM      vocals" in result.stdout
