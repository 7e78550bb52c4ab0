"""evaluate.py: museval's BSSEval v4 without ffmpeg, the MDX challenges' global SDR, and the
command line on folders and MUSDB18 previews."""
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

import data_generator as dg
import evaluate
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


def test_global_sdr_on_known_pairs():
    """uSDR = 10 log10(sum s^2 / sum (s - s_hat)^2): an estimate at 0.9 of the reference leaves an
    error of 0.1 of it, 20 dB; the summary takes the mean over tracks."""
    reference = stems(3, 8000)[0].astype(np.float64)
    assert evaluate.global_sdr(reference, 0.9 * reference) == pytest.approx(20, abs=1e-6)
    assert evaluate.global_sdr(reference, 0.99 * reference) == pytest.approx(40, abs=1e-5)
    assert evaluate.global_sdr(reference, np.zeros_like(reference)) == pytest.approx(0, abs=1e-6)
    track = {stem: {"SDR": 1.0, "SIR": 2.0, "SAR": 3.0, "ISR": 4.0, "uSDR": 20.0} for stem in dg.STEMS}
    summary = evaluate.summarise({"model": {"a": track, "b": {s: dict(m, uSDR=10.0, SDR=5.0) for s, m in track.items()},
                                            "c": {s: dict(m, uSDR=0.0, SDR=9.0) for s, m in track.items()}}})
    assert summary["model"]["vocals"]["uSDR"] == pytest.approx(10.0)  # mean of 20, 10, 0
    assert summary["model"]["vocals"]["SDR"] == 5.0  # median of 1, 5, 9


def test_target_sdr_is_bss_evals_sdr_of_that_stem():
    """What train.py validates with: scoring the vocals alone gives exactly the SDR that BSSEval v4
    gives them beside the accompaniment, and less leaked accompaniment scores higher."""
    vocals, accompaniment = stems(6, dg.SAMPLE_RATE)
    references = {"vocals": vocals, "accompaniment": accompaniment}
    sdrs = []
    for leak in (0.5, 0.1):
        estimate = vocals + leak * accompaniment
        estimates = {"vocals": estimate, "accompaniment": vocals + accompaniment - estimate}
        both = evaluate.frame_median(evaluate.bss_eval(references, estimates, dg.SAMPLE_RATE)["vocals"]["SDR"])
        alone = evaluate.target_sdr(vocals, estimate, dg.SAMPLE_RATE)
        assert abs(alone - both) < 1e-6
        sdrs.append(alone)
    assert np.isfinite(sdrs[0]) and sdrs[1] > sdrs[0] + 5


@needs_ffmpeg
def test_bss_eval_gives_what_museval_evaluate_gives():
    """Loading museval's metrics module on its own scores exactly as the package does."""
    import museval
    vocals, accompaniment = stems(4, 8000, seed=3)
    references = {"vocals": vocals, "accompaniment": accompaniment}
    estimates = {"vocals": vocals + 0.3 * accompaniment, "accompaniment": 0.7 * accompaniment}
    ours = evaluate.bss_eval(references, estimates, 8000)
    sdr, isr, sir, sar = museval.evaluate(np.stack([references[s].T for s in dg.STEMS]),
                                          np.stack([estimates[s].T for s in dg.STEMS]), win=8000, hop=8000)
    for i, stem in enumerate(dg.STEMS):
        for name, values in (("SDR", sdr), ("ISR", isr), ("SIR", sir), ("SAR", sar)):
            assert np.allclose(ours[stem][name], values[i], equal_nan=True), (stem, name)


def test_scoring_and_the_folder_layout_work_without_ffmpeg(tmp_path):
    """museval's package imports musdb, which imports stempeg, which refuses to import without
    ffmpeg and ffprobe; scoring loads only museval's metrics and needs neither."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=str(bare), HOME=str(tmp_path))
    probe = run_script("evaluate.py", "--help", env=env)  # the script itself starts
    assert probe.returncode == 0, probe.stderr
    code = ("import numpy as np, evaluate\n"
            "x = np.random.default_rng(0).standard_normal((2, 16000)).astype('float32')\n"
            "print(round(evaluate.target_sdr(x, 0.5 * x + 0.1 * x[::-1], 8000), 3))\n"
            "try:\n    import museval\nexcept RuntimeError as e:\n    print('museval package:', e)\n")
    import subprocess
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=str(evaluate.Path(evaluate.__file__).parent), timeout=120)
    assert result.returncode == 0, result.stderr
    assert np.isfinite(float(result.stdout.splitlines()[0]))
    assert "ffmpeg or ffprobe could not be found" in result.stdout  # the package itself does refuse
    write_tracks(tmp_path / "tracks", 1)
    result = run_script("evaluate.py", "--folder", tmp_path / "tracks", "--methods", "mix",
                        "--output-dir", tmp_path / "eval", "--shifts", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "summary.json").exists()


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
    mixture, _ = dg.load_audio(tmp_path / "tracks" / "song0" / "mixture.wav")
    vocals, _ = dg.load_audio(tmp_path / "tracks" / "song0" / "vocals.wav")
    assert saved["per_track"]["mix"]["song0"]["vocals"]["uSDR"] == pytest.approx(evaluate.global_sdr(vocals, mixture))
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
    assert sorted(json.loads((tmp_path / "eval2" / "summary.json").read_text())["per_track"]["mix"]) == ["a_1", "b_1", "c_1"]


@pytest.mark.parametrize("flags,message", [
    (["--methods", "mix", "--stems", "/nonexistent/stems"], "--stems /nonexistent/stems: no such folder"),
    (["--methods", "mix,best"], "--methods takes model, mix, irm"),
    (["--methods", "mix"], "give exactly one of --musdb-root, --folder or --stems"),
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
