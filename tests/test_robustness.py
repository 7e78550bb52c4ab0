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
import inference
from conftest import REPO
from unet_model import CheckpointError, UNet, UNetConfig, load_model, save_checkpoint


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


def tone(seconds, rate, channels=2):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 3300 * t)
    return np.stack([x * (0.5 + 0.5 * c / max(1, channels - 1)) for c in range(channels)], axis=1).astype(np.float32)


def make_bad_file(kind, folder):
    """A damaged or unusable input of the given kind; returns its path."""
    path = folder / f"{kind}.wav"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not audio\n" * 50)
    elif kind == "zero_length":
        sf.write(str(path), np.zeros((0, 2), np.float32), 44100)
    elif kind in ("nan", "inf"):
        audio = tone(3, 44100)
        audio[44100, 0] = np.nan if kind == "nan" else np.inf
        sf.write(str(path), audio, 44100, subtype="FLOAT")
    elif kind == "truncated_wav":
        sf.write(str(path), tone(3, 44100), 44100)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "truncated_flac":
        path = path.with_suffix(".flac")
        sf.write(str(path), np.random.default_rng(0).uniform(-0.5, 0.5, (44100 * 3, 2)), 44100)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt_mp3":
        path = path.with_suffix(".mp3")
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    return path


BAD_FILES = {"missing": "no such file", "empty": "empty", "text": "not a readable audio file",
             "zero_length": "no audio samples", "nan": "NaN", "inf": "infinite", "truncated_wav": "truncated",
             "truncated_flac": "corrupt", "corrupt_mp3": "not a readable audio file"}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_audio_is_refused_and_nothing_is_written(kind, tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make_bad_file(kind, inputs)
    before = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "out"
    model, _ = load_model(tiny_checkpoint)
    outputs = inference.output_paths(path, out, "{track}_{stem}.{ext}", "wav")
    out.mkdir()
    with pytest.raises(dg.DataError, match=BAD_FILES[kind]) as error:
        inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")))
    assert "\n" not in str(error.value)
    assert list(out.iterdir()) == []  # no stems, no half-written temporary files
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_a_batch_with_bad_files_separates_the_good_ones_and_fails(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = [make_bad_file(kind, folder) for kind in ("empty", "text", "nan", "truncated_wav")]
    good = folder / "good.wav"
    sf.write(str(good), tone(2, 22050), 22050)
    out = tmp_path / "out"
    result = run("inference.py", "--audio", folder, folder / "missing.wav", "--checkpoint", tiny_checkpoint,
                 "--output-dir", out)
    assert result.returncode == 1
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad) + 1, text  # one line per bad file
    assert sorted(p.name for p in out.iterdir()) == ["good_accompaniment.wav", "good_vocals.wav"]
    assert "1 of 6 files separated" in text and "5 failed" in text


def test_unwritable_output_folder(tmp_path, tiny_checkpoint):
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", blocker / "sub")
    assert_one_line_error(result, "cannot create output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "song.wav", "tiny.pth"]


def test_an_input_is_never_overwritten(tmp_path, tiny_checkpoint):
    """A Demucs-style template that would put a stem exactly on the input is refused."""
    (tmp_path / "vocals").mkdir()
    song = tmp_path / "vocals" / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    original = song.read_bytes()
    result = run("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path,
                 "--filename", "{stem}/{track}.{ext}")
    assert_one_line_error(result, "would overwrite an input")
    assert song.read_bytes() == original
    assert not (tmp_path / "accompaniment").exists() or not any((tmp_path / "accompaniment").iterdir())


def test_rerun_replaces_outputs_and_a_failed_run_keeps_the_earlier_ones(tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"))
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(40, 8000, channels=1), 8000)
    outputs = inference.output_paths(song, tmp_path, "{track}_{stem}.{ext}", "wav")
    for p in outputs.values():
        p.write_bytes(b"old")
    inference.separate_file(song, outputs, mask_fn)
    first = {k: sf.read(str(p))[0] for k, p in outputs.items()}
    assert first["vocals"].shape == (40 * 8000,)
    # the same name now holds audio that turns bad after the first 30 s block has been written
    audio = tone(40, 8000, channels=1)
    audio[35 * 8000] = np.nan
    sf.write(str(song), audio, 8000, subtype="FLOAT")
    with pytest.raises(dg.DataError, match="NaN"):
        inference.separate_file(song, outputs, mask_fn)
    for k, p in outputs.items():
        assert np.array_equal(sf.read(str(p))[0], first[k])  # earlier results intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav", "song_accompaniment.wav", "song_vocals.wav",
                                                           "tiny.pth"]


@pytest.mark.parametrize("subtype,rate,channels,seconds", [
    ("PCM_U8", 8000, 1, 3.0), ("PCM_16", 11025, 2, 0.2), ("PCM_24", 44100, 2, 5.0), ("PCM_32", 48000, 1, 2.0),
    ("FLOAT", 96000, 2, 2.0), ("DOUBLE", 16000, 4, 1.5)])
def test_unusual_but_valid_wavs(subtype, rate, channels, seconds, tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    path = tmp_path / "in.wav"
    sf.write(str(path), tone(seconds, rate, channels), rate, subtype=subtype)
    outputs = inference.output_paths(path, tmp_path, "{track}_{stem}.{ext}", "flac" if channels == 4 else "wav")
    rate_out, channels_out, frames = inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")),
                                                             fmt="flac" if channels == 4 else "wav")
    assert (rate_out, channels_out, frames) == (rate, channels, int(seconds * rate))
    for p in outputs.values():
        audio, r = sf.read(str(p), always_2d=True)
        assert r == rate and audio.shape == (frames, channels) and np.isfinite(audio).all()


@pytest.mark.parametrize("signal_kind", ["silence", "clipped"])
def test_silence_and_clipping(signal_kind, tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    rate = 44100
    audio = np.zeros((rate * 3, 2), np.float32) if signal_kind == "silence" else np.clip(tone(3, rate) * 8, -1, 1)
    path = tmp_path / "in.wav"
    sf.write(str(path), audio, rate, subtype="PCM_16")
    outputs = inference.output_paths(path, tmp_path, "{track}_{stem}.{ext}", "wav")
    inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")), wiener=True)
    vocals = sf.read(str(outputs["vocals"]))[0]
    assert np.isfinite(vocals).all()
    if signal_kind == "silence":
        assert np.abs(vocals).max() == 0
    else:
        assert np.abs(vocals).max() > 0.01


@pytest.mark.parametrize("problem,message", [("missing", "python train.py"), ("corrupt", "not a readable checkpoint"),
                                             ("other_stft", "hop_length=512"), ("other_width", "do not fit"),
                                             ("not_ours", "not a checkpoint written by train.py")])
def test_bad_checkpoints(problem, message, tmp_path):
    path = tmp_path / "model.pth"
    if problem == "corrupt":
        path.write_bytes(b"\x80\x02garbage" * 100)
    elif problem == "other_stft":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dict(dg.SPEC_CONFIG, hop_length=512))
    elif problem == "other_width":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dg.SPEC_CONFIG)
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["model_config"]["n_channels"] = 8
        torch.save(checkpoint, path)
    elif problem == "not_ours":
        torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, expected_spec=dg.SPEC_CONFIG)
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run("inference.py", "--audio", song, "--checkpoint", path)
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["song.wav"] + ([] if problem == "missing" else ["model.pth"]))


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


@pytest.mark.parametrize("script,flags,message", [
    ("inference.py", ["--shifts", "0"], "--shifts must be at least 1"),
    ("inference.py", ["--overlap", "1"], "--overlap must be in [0, 1)"),
    ("inference.py", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("inference.py", ["--mask-exponent", "0"], "--mask-exponent must be positive"),
    ("evaluate.py", ["--mask-exponent", "-1", "--folder", "."], "--mask-exponent must be positive"),
    ("evaluate.py", ["--shifts", "0", "--folder", "."], "--shifts must be at least 1")])
def test_bad_separation_flags(script, flags, message, tmp_path, tiny_checkpoint):
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run(script, *flags, "--checkpoint", tiny_checkpoint, *(["--audio", song] if script == "inference.py" else []))
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav", "tiny.pth"]


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
