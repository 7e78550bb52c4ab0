"""evaluate.py on real previews."""
import json
import subprocess
import sys

import numpy as np
import soundfile as sf

import data_generator as dg
import evaluate
from conftest import MUSDB7, REPO, needs_ffmpeg, needs_shared


@needs_shared
@needs_ffmpeg
def test_evaluate_on_two_previews_scores_irm_above_mix(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(tiny_checkpoint),
                             "--musdb-root", str(MUSDB7), "--subset", "train", "--split", "valid", "--tracks", "2",
                             "--methods", "model,mix,irm", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())["summary"]
    for method in ("model", "mix", "irm"):
        for stem in ("vocals", "accompaniment"):
            assert all(np.isfinite(v) for v in summary[method][stem].values()), (method, stem)
        assert len(list((out / method).glob("*.json"))) == 2  # museval's per-track files
    for stem in ("vocals", "accompaniment"):
        assert summary["irm"][stem]["SDR"] > summary["mix"][stem]["SDR"] + 3
    # the mixture as the estimate of the vocals leaves all the accompaniment in: a negative SDR
    assert summary["mix"]["vocals"]["SDR"] < 0
    assert "IRM      vocals" in result.stdout


def test_evaluate_on_a_folder_of_tracks(tmp_path):
    """The folder layout (mixture.wav + vocals.wav, accompaniment = mixture - vocals)."""
    for i in range(2):
        track = dg.synthetic_track("test", i, rate=16000, seconds=4)
        folder = tmp_path / "tracks" / f"song{i}"
        folder.mkdir(parents=True)
        sf.write(str(folder / "mixture.wav"), track.mixture.T, 16000)
        sf.write(str(folder / "vocals.wav"), track.vocals.T, 16000)
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--folder", str(tmp_path / "tracks"),
                             "--methods", "mix,irm", "--output-dir", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]
    assert summary["irm"]["vocals"]["SDR"] > summary["mix"]["vocals"]["SDR"] + 5


def test_target_sdr_is_bss_evals_sdr_of_that_stem():
    """What train.py validates with: scoring the vocals alone gives exactly the SDR that BSSEval v4
    gives them beside the accompaniment, and less leaked accompaniment scores higher."""
    track = dg.synthetic_track("valid", 0, seconds=6)
    references = {"vocals": track.vocals, "accompaniment": track.accompaniment}
    sdrs = []
    for leak in (0.5, 0.1):
        vocals = track.vocals + leak * track.accompaniment
        estimates = {"vocals": vocals, "accompaniment": track.mixture - vocals}
        both = evaluate.frame_median(evaluate.bss_eval(references, estimates, dg.SAMPLE_RATE)["vocals"]["SDR"])
        alone = evaluate.target_sdr(track.vocals, vocals, dg.SAMPLE_RATE)
        assert abs(alone - both) < 1e-6
        sdrs.append(alone)
    assert np.isfinite(sdrs[0]) and sdrs[1] > sdrs[0] + 5
