"""Bad input gets one clear line and a non-zero exit, and nothing is lost; unusual input works."""
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import data_generator as dg
from conftest import REPO
from unet_model import load_model


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors, text
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                           (["--lr", "-0.001"], "--lr must be positive"),
                                           (["--epochs", "0"], "--epochs must be at least 1"),
                                           (["--ema", "1"], "--ema must be in [0, 1)"),
                                           (["--time-budget", "0"], "--time-budget must be positive"),
                                           (["--mask-exponents", "0.5,x"], "--mask-exponents takes positive numbers"),
                                           (["--time-budget", "0.0001"], "loading the data alone took"),
                                           (["--musdb-root", "/nonexistent/musdb"], "no such folder")])
def test_bad_training_flags(flags, message, tmp_path):
    result = run("train.py", "--synthetic" if "--musdb-root" not in flags else "--cpu", *flags,
                 "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(result, message)
    assert not (tmp_path / "ck").exists()


def make_wav_dataset(root, names, seconds=3.0, rate=22050):
    """A tiny MUSDB18-HQ layout: train/<name>/{mixture,drums,bass,other,vocals}.wav."""
    for i, name in enumerate(names):
        track = dg.synthetic_track("train", i, rate=rate, seconds=seconds)
        folder = root / "train" / name
        folder.mkdir(parents=True)
        quarter = track.accompaniment / 3
        for stem, audio in (("vocals", track.vocals), ("drums", quarter), ("bass", quarter), ("other", quarter),
                            ("mixture", track.mixture)):
            sf.write(str(folder / f"{stem}.wav"), audio.T, rate)


def test_empty_dataset_and_too_many_songs(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_one_line_error(run("train.py", "--musdb-root", tmp_path / "empty", "--checkpoint-dir", tmp_path / "ck"),
                          "no MUSDB18 tracks")
    root = tmp_path / "hq"
    make_wav_dataset(root, ["A - Train One", "B - Train Two", "ANiMAL - Rockshow"])  # the last is in musdb's valid split
    result = run("train.py", "--musdb-root", root, "--n-songs", "50", "--epochs", "1", "--steps-per-epoch", "1",
                 "--n-channels", "4", "--batch-size", "2", "--checkpoint-dir", tmp_path / "ck",
                 "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--n-songs 50: only 2 train tracks exist" in result.stdout and "using all 2" in result.stdout
    assert "MUSDB18-HQ wav" in result.stdout and "2 train, 1 validation" in result.stdout
    assert (tmp_path / "ck" / "best_model.pth").exists()
    assert not any(p.suffix == ".npy" for p in root.rglob("*"))  # nothing written beside the dataset


def test_without_ffmpeg_training_and_evaluation_stop_at_once_with_one_line(tmp_path):
    # musdb (and museval, which imports it) cannot even be imported without ffmpeg and ffprobe
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = {"PATH": str(bare), "HOME": str(tmp_path)}
    for script, flags in (("train.py", ["--synthetic", "--checkpoint-dir", tmp_path / "ck"]),
                          ("evaluate.py", ["--methods", "mix", "--folder", tmp_path])):
        result = subprocess.run([sys.executable, str(REPO / script), *map(str, flags)], capture_output=True,
                                text=True, timeout=120, cwd=tmp_path, env=env)
        assert_one_line_error(result, "ffmpeg and ffprobe not found", "apt-get install ffmpeg")
    assert not (tmp_path / "ck").exists()


TINY_TRAINING = ["--synthetic", "--n-songs", "2", "--n-channels", "4", "--batch-size", "2", "--steps-per-epoch", "3",
                 "--mask-exponents", "1"]  # calibration off where a test is not about it: it costs five validations


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def wait_for(path, process, timeout=120):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_kill_9_during_training_then_resume_continues_exactly(tmp_path):
    """A run killed at a random point of epoch 2 and resumed ends with exactly the weights of a
    run that was never interrupted: model, optimiser, schedule, RNG streams all come back. The
    resumed part builds its batches in two worker processes: the batches do not depend on that."""
    steps = ["--steps-per-epoch", "30", "--epochs", "2"]
    straight, folder = tmp_path / "straight", tmp_path / "killed"
    assert run("train.py", *TINY_TRAINING, *steps, "--checkpoint-dir", straight).returncode == 0
    args = [sys.executable, str(REPO / "train.py"), *TINY_TRAINING, *steps, "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    wait_for(folder / "last.pth", process)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    model, checkpoint = load_model(folder / "last.pth")  # whatever moment the kill hit, this loads
    assert checkpoint["epoch"] == 1, "the kill came after epoch 2 had finished; make the epochs longer"
    assert not list(folder.glob("*.tmp"))
    result = run("train.py", *TINY_TRAINING, *steps, "--checkpoint-dir", folder, "--resume", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"resuming from {folder / 'last.pth'}: epoch 2" in result.stdout
    final = torch.load(folder / "last.pth", weights_only=False)
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    a, b = weights(straight / "last.pth"), final["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_plans_the_run_and_the_plan_reproduces_exactly(tmp_path):
    """Without --steps-per-epoch, train.py times a training step and a validation here and runs
    as many steps per epoch as fit in --time-budget. The plan is printed and stored, and a run
    given the same steps per epoch ends with exactly the same weights: the timing uses
    throwaway copies of the model and the data stream, so it only picks the number."""
    tiny = [f for f in TINY_TRAINING if f not in ("--steps-per-epoch", "3")]
    planned = run("train.py", *tiny, "--epochs", "2", "--time-budget", "0.5", "--checkpoint-dir", tmp_path / "budget")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    match = re.search(r"time budget 0.5 min: .* -> 2 epochs x (\d+) steps .*--steps-per-epoch (\d+)\)", planned.stdout)
    assert match, planned.stdout
    steps = int(match[1])
    assert steps == int(match[2]) >= 10
    budgeted = torch.load(tmp_path / "budget" / "last.pth", weights_only=False)
    assert budgeted["args"]["steps_per_epoch"] == steps and budgeted["step"] == 2 * steps
    fixed = run("train.py", *tiny, "--epochs", "2", "--steps-per-epoch", steps, "--checkpoint-dir", tmp_path / "fixed")
    assert fixed.returncode == 0 and "time budget" not in fixed.stdout
    a, b = budgeted["model"], weights(tmp_path / "fixed" / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_checkpoint_holds_the_average_and_the_trained_weights(tmp_path):
    """--ema: the checkpoint's "model" (what inference loads) is the moving average, "train_model"
    the weights as trained (what --resume continues); averaging does not change training itself,
    and a decay of ~0 makes the average the trained weights."""
    for decay, name in ((0.9, "ema"), (1e-9, "no_decay")):
        result = run("train.py", *TINY_TRAINING, "--epochs", "1", "--ema", decay, "--checkpoint-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
    ema = torch.load(tmp_path / "ema" / "last.pth", weights_only=False)
    plain = torch.load(tmp_path / "no_decay" / "last.pth", weights_only=False)
    assert all(torch.equal(ema["train_model"][k], plain["train_model"][k]) for k in ema["train_model"])
    assert all(torch.equal(plain["model"][k], plain["train_model"][k]) for k in plain["model"])
    floats = [k for k, v in ema["model"].items() if v.is_floating_point()]
    assert sum(not torch.allclose(ema["model"][k], ema["train_model"][k]) for k in floats) > len(floats) // 2
    load_model(tmp_path / "ema" / "best_model.pth")


@pytest.mark.parametrize("select", ["sdr", "loss"])
def test_best_model_is_the_epoch_with_the_best_validation_score(select, tmp_path):
    """--select sdr (the default) keeps the epoch whose separated validation vocals score the
    highest SDR; --select loss the one with the lowest validation loss. Every epoch logs both."""
    flags = ["--epochs", "4", "--patience", "0", "--checkpoint-dir", tmp_path, "--mask-exponents", "0.4,0.5,0.6,0.8,1"]
    result = run("train.py", *TINY_TRAINING, *flags, *(["--select", "loss"] if select == "loss" else []))
    assert result.returncode == 0, result.stderr
    history = torch.load(tmp_path / "last.pth", weights_only=False)["history"]
    sdrs, losses = [h["val_sdr"] for h in history], [h["val_loss"] for h in history]
    assert len(history) == 4 and all(np.isfinite(sdrs))
    assert all(len(h["val_sdr_songs"]) == dg.SYNTHETIC_SPLIT_SIZES["valid"] for h in history)
    assert all(h["val_sdr"] == np.median(h["val_sdr_songs"]) for h in history)
    best = torch.load(tmp_path / "best_model.pth", weights_only=False)
    expected = 1 + (int(np.argmax(sdrs)) if select == "sdr" else int(np.argmin(losses)))
    assert best["epoch"] == expected
    assert "optimizer" not in best and "optimizer" in torch.load(tmp_path / "last.pth", weights_only=False)
    assert best["best_val_sdr"] == sdrs[expected - 1] and best["best_val_loss"] == losses[expected - 1]
    # then the mask exponent is fitted on the same songs: the best of the grid, the grid's 1 being the epoch's own SDR
    scores = best["mask_exponent_sdr"]
    assert sorted(scores) == [0.4, 0.5, 0.6, 0.8, 1.0] and scores[1.0] == sdrs[expected - 1]
    assert best["mask_exponent"] == max(scores, key=scores.get)
    assert f"mask exponent for {tmp_path / 'best_model.pth'}: {best['mask_exponent']:g}" in result.stdout
    assert "mask_exponent" not in torch.load(tmp_path / "last.pth", weights_only=False)


def test_a_single_mask_exponent_is_stored_without_scoring(tmp_path):
    result = run("train.py", *TINY_TRAINING, "--epochs", "1", "--mask-exponents", "0.7", "--checkpoint-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "best_model.pth", weights_only=False)["mask_exponent"] == 0.7
    assert "mask exponent for" not in result.stdout


def test_ctrl_c_stops_cleanly_and_says_where_the_checkpoints_are(tmp_path):
    folder = tmp_path / "ck"
    args = [sys.executable, str(REPO / "train.py"), *TINY_TRAINING, "--steps-per-epoch", "40", "--epochs", "3",
            "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for(folder / "last.pth", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "interrupted" in out and str(folder / "last.pth") in out and "--resume" in out
    load_model(folder / "last.pth")
