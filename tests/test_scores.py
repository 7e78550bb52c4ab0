"""scores.py: museval's BSSEval v4 without ffmpeg, and the MDX challenges' global SDR."""
import os
import subprocess
import sys

import numpy as np
import pytest

import data_generator as dg
import evaluate
import scores
from conftest import REPO, needs_ffmpeg, run_script
from test_evaluate import stems, write_tracks


def test_global_sdr_on_known_pairs():
    """uSDR = 10 log10(sum s^2 / sum (s - s_hat)^2): an estimate at 0.9 of the reference leaves an
    error of 0.1 of it, 20 dB; the summary takes the mean over tracks."""
    reference = stems(3, 8000)[0].astype(np.float64)
    assert scores.global_sdr(reference, 0.9 * reference) == pytest.approx(20, abs=1e-6)
    assert scores.global_sdr(reference, 0.99 * reference) == pytest.approx(40, abs=1e-5)
    assert scores.global_sdr(reference, np.zeros_like(reference)) == pytest.approx(0, abs=1e-6)
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
        both = scores.frame_median(scores.bss_eval(references, estimates, dg.SAMPLE_RATE)["vocals"]["SDR"])
        alone = scores.target_sdr(vocals, estimate, dg.SAMPLE_RATE)
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
    ours = scores.bss_eval(references, estimates, 8000)
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
    code = ("import numpy as np, scores\n"
            "x = np.random.default_rng(0).standard_normal((2, 16000)).astype('float32')\n"
            "print(round(scores.target_sdr(x, 0.5 * x + 0.1 * x[::-1], 8000), 3))\n"
            "try:\n    import museval\nexcept RuntimeError as e:\n    print('museval package:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert np.isfinite(float(result.stdout.splitlines()[0]))
    assert "ffmpeg or ffprobe could not be found" in result.stdout  # the package itself does refuse
    write_tracks(tmp_path / "tracks", 1)
    result = run_script("evaluate.py", "--folder", tmp_path / "tracks", "--methods", "mix",
                        "--output-dir", tmp_path / "eval", "--shifts", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "summary.json").exists()
