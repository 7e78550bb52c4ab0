"""train.py: the plan and the epoch rule, one-line errors, exact resume after kill -9, Ctrl-C,
the best model, the time budget, TensorBoard, DDP."""
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_generator as dg
import synthetic
from conftest import make_stems_folder, make_wav_dataset, REPO, assert_one_line_error, run_script, write_bad_checkpoint
from unet_model import load_model, read_checkpoint

TINY = ["--synthetic", "--n-songs", "2", "--n-channels", "4", "--batch-size", "2", "--cpu"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """(checkpoint folder, completed process) of one tiny two-epoch run, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("two_epochs")
    result = run_script("train.py", *TINY, "--epochs", "2", "--checkpoint-dir", folder, timeout=900)
    assert result.returncode == 0, result.stderr
    return folder, result


def test_epochs_are_passes_over_the_training_audio_and_the_plan_comes_first(tmp_path):
    """10 synthetic songs of 20 s: 10 x 215 frames = 2,150, at a hop of 64 frames 34 patches, in
    batches of 1: 34 steps an epoch (above the floor of 32), whatever the machine."""
    result = run_script("train.py", "--synthetic", "--n-channels", "4", "--batch-size", "1", "--epochs", "2", "--cpu",
                        "--checkpoint-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    plan = "plan: 2 epochs x 34 steps of 1 patches (68 patches); an epoch: one pass over 2,150 frames"
    assert plan in result.stdout
    assert result.stdout.index(plan) < result.stdout.index("before training")
    last = read_checkpoint(tmp_path / "last.pth")
    assert last["steps_per_epoch"] == 34 and last["step"] == 68 and [h["epoch"] for h in last["history"]] == [1, 2]
    # with two songs one pass is 7 patches: the floor makes it 32 steps
    plan = run_script("train.py", *TINY, "--epochs", "3", "--time-budget", "0.0001", "--checkpoint-dir", tmp_path / "x")
    assert_one_line_error(plan, "--time-budget 0.0001 min: loading the data alone took")


@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                           (["--lr", "-0.001"], "--lr must be positive"),
                                           (["--epochs", "0"], "--epochs must be at least 1"),
                                           (["--time-budget", "0"], "--time-budget must be positive"),
                                           (["--resume"], "--resume:"),
                                           (["--musdb-root", "/nonexistent/musdb"], "no such folder")])
def test_bad_training_flags(flags, message, tmp_path):
    result = run_script("train.py", "--synthetic" if "--musdb-root" not in flags else "--cpu", *flags,
                        "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(result, message)
    assert not (tmp_path / "ck").exists()


def test_empty_dataset_and_too_many_songs(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_one_line_error(run_script("train.py", "--musdb-root", tmp_path / "empty", "--checkpoint-dir", tmp_path / "ck"),
                          "no MUSDB18 tracks")
    root = tmp_path / "hq"
    make_wav_dataset(root, ["A - Train One", "B - Train Two", "ANiMAL - Rockshow"])  # the last is in musdb's valid split
    result = run_script("train.py", "--musdb-root", root, "--n-songs", "50", "--epochs", "1", "--n-channels", "4",
                        "--batch-size", "2", "--checkpoint-dir", tmp_path / "ck", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: --n-songs 50: only 2 train tracks exist" in result.stderr and "using all" in result.stderr
    assert "MUSDB18-HQ wav" in result.stdout and "2 train, 1 validation" in result.stdout
    assert "1 epochs x 32 steps" in result.stdout  # two 3 s songs: the floor
    assert (tmp_path / "ck" / "best_model.pth").exists()
    assert not any(p.suffix == ".npy" for p in root.rglob("*"))  # nothing written beside the dataset


def test_without_ffmpeg_musdb_training_stops_at_once_with_one_line(tmp_path):
    """musdb cannot even be imported without ffmpeg and ffprobe (also for WAV stems)."""
    make_wav_dataset(tmp_path / "hq", ["A - Train One"])
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    result = run_script("train.py", "--musdb-root", tmp_path / "hq", "--checkpoint-dir", tmp_path / "ck",
                        env={"PATH": str(bare), "HOME": str(tmp_path)}, cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "ffmpeg and ffprobe not found", "apt-get install ffmpeg")
    assert not (tmp_path / "ck").exists()


def test_a_checkpoint_is_only_tensors_and_plain_values(two_epochs):
    """Both files load with weights_only=True; best_model.pth is the model and its record only."""
    folder, _ = two_epochs
    last, best = read_checkpoint(folder / "last.pth"), read_checkpoint(folder / "best_model.pth")
    assert {"optimizer", "scaler", "torch_rng", "cuda_rng"} <= set(last) and "optimizer" not in best
    assert isinstance(last["args"], dict) and last["args"]["epochs"] == 2 and isinstance(last["torch_rng"], torch.Tensor)
    history = last["history"]
    assert len(history) == 2 and all(isinstance(v, (int, float, list)) for h in history for v in h.values())
    for h in history:
        assert len(h["val_sdr_songs"]) == synthetic.SYNTHETIC_SPLIT_SIZES["valid"]
        assert h["val_sdr"] == np.median(h["val_sdr_songs"]) and h["val_sdr_mean"] == np.mean(h["val_sdr_songs"])
    assert "history" in best and "args" in best and best["step"] <= last["step"]
    # the model saved is the running average of the trained weights, which last.pth also holds for --resume
    average, trained = last["model"], last["trained_model"]
    assert average.keys() == trained.keys() and "trained_model" not in best
    assert not torch.equal(average["output.weight"], trained["output.weight"])
    assert torch.equal(average["encoder.0.norm.num_batches_tracked"], trained["encoder.0.norm.num_batches_tracked"])


def wait_for(path, process, timeout=300):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_kill_9_during_training_then_resume_continues_exactly(two_epochs, tmp_path):
    """A run killed during epoch 2 and resumed ends with exactly the weights of a run that was
    never interrupted (two_epochs, the same flags): model, optimiser, schedule, RNG streams all come
    back. The resumed part builds its batches in two worker processes: the batches do not depend on
    that. A last.pth of before the running average (no trained_model) resumes too, its one weight
    set starting both."""
    flags = [*TINY, "--epochs", "2"]
    straight, folder = two_epochs[0], tmp_path / "killed"
    args = [sys.executable, str(REPO / "train.py"), *flags, "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    wait_for(folder / "last.pth", process)
    time.sleep(2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    model, checkpoint = load_model(folder / "last.pth")  # whatever moment the kill hit, this loads
    assert checkpoint["epoch"] == 1, "the kill came after epoch 2 had finished"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no partial file left
    (tmp_path / "old").mkdir()
    torch.save({k: v for k, v in checkpoint.items() if k != "trained_model"}, tmp_path / "old" / "last.pth")
    result = run_script("train.py", *flags, "--checkpoint-dir", folder, "--resume", "--workers", "2", timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {folder / 'last.pth'}: epoch 2" in result.stdout
    assert f"plan: 1 epoch(s) left of --epochs 2, each {checkpoint['steps_per_epoch']} steps of 2 patches" in result.stdout
    final = read_checkpoint(folder / "last.pth")
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    for weights in ("model", "trained_model"):  # the running average and the trained weights
        a, b = read_checkpoint(straight / "last.pth")[weights], final[weights]
        assert all(torch.equal(a[k], b[k]) for k in a), weights
    result = run_script("train.py", *flags, "--checkpoint-dir", tmp_path / "old", "--resume", timeout=900)
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(tmp_path / "old" / "last.pth")["epoch"] == 2


def test_time_budget_sizes_the_epochs_and_prints_the_plan(tmp_path):
    result = run_script("train.py", *TINY, "--epochs", "2", "--time-budget", "0.75", "--checkpoint-dir", tmp_path,
                        timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"plan: 2 epochs x (\d+) steps of 2 patches .*sized to --time-budget 0.75 min: ([\d.]+) s a step",
                      result.stdout)
    assert match, result.stdout
    first = int(match[1])
    last = read_checkpoint(tmp_path / "last.pth")
    if last["epoch"] == 1:  # a machine that got much slower after planning (other jobs) may leave no time at all
        assert "time budget: not one more step fits in 0.75 min" in result.stdout
        return
    # epoch 2 was resized by the time epoch 1 took, and the learning rate still ends its cosine at the last step
    resized = re.search(r"epoch 1/2: .*; next epochs (\d+) steps", result.stdout)
    assert resized, result.stdout
    assert last["epoch"] == 2 and last["steps_per_epoch"] == int(resized[1]) >= 1
    assert last["step"] == first + int(resized[1]) == last["history"][-1]["step"]
    assert last["history"][-1]["lr"] < 0.01 * last["args"]["lr"]


def test_best_model_is_the_epoch_with_the_best_validation_sdr_and_tensorboard_has_it_all(two_epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tmp_path, result = two_epochs
    history = read_checkpoint(tmp_path / "last.pth")["history"]
    sdrs = [h["val_sdr"] for h in history]
    assert len(history) == 2 and all(np.isfinite(sdrs))
    best = read_checkpoint(tmp_path / "best_model.pth")
    assert best["epoch"] == 1 + int(np.argmax(sdrs)) and best["best_val_sdr"] == max(sdrs)
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "audio": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "val/loss", "val/sdr", "val/sdr_mean", "val/mask_mean", "val/mask_std", "train/lr", "train/loss_step"):
        assert scalar in tags["scalars"], scalar
    assert [e.step for e in events.Scalars("val/loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("val/sdr_mean")][1:] == pytest.approx([h["val_sdr_mean"] for h in history])
    assert {"separation/0", "separation/1"} <= set(tags["images"])
    assert [e.step for e in events.Images("separation/0")] == [0, 1, 2]
    assert {"separation/0_vocals", "separation/0_mixture"} <= set(tags["audio"])
    audio = events.Audio("separation/0_vocals")[-1]
    assert audio.sample_rate == dg.SAMPLE_RATE and audio.length_frames == 10 * dg.SAMPLE_RATE
    assert "val loss" in result.stdout and "val SDR" in result.stdout and "mask mean" in result.stdout


def test_ctrl_c_stops_cleanly_and_says_where_the_checkpoints_are(tmp_path):
    folder = tmp_path / "ck"
    args = [sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "3", "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for(folder / "last.pth", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "interrupted" in out and str(folder / "last.pth") in out and "--resume" in out
    load_model(folder / "last.pth")


def torchrun(*args, timeout=900):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ddp_two_processes_keep_identical_weights_and_resume(tmp_path):
    folder = tmp_path / "ck"
    result = torchrun(*TINY, "--epochs", "1", "--checkpoint-dir", folder)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "x 2 processes" in out and "DDP: weights identical across 2 ranks" in out
    assert "1 epochs x 32 steps of 4 patches" in out  # a step takes a batch from each rank
    assert out.count("epoch 1/1:") == 1  # only rank 0 logs
    model, _ = load_model(folder / "best_model.pth", expected_spec=dg.SPEC_CONFIG)  # loads without DDP
    with torch.no_grad():
        assert model(torch.rand(1, 1, 512, 128)).shape == (1, 1, 512, 128)
    result = torchrun(*TINY, "--epochs", "2", "--checkpoint-dir", folder, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "DDP: weights identical across 2 ranks" in result.stdout
    assert read_checkpoint(folder / "last.pth")["epoch"] == 2


def test_stems_folder_alone_trains_and_validates_on_its_held_apart_tracks(tmp_path):
    """A run on a folder of stems only: MUSDB18 is not looked for, a tenth is held apart and named, and
    nothing is written beside the data (the decoded audio goes to --cache-dir)."""
    make_stems_folder(tmp_path / "mine", [f"singer{i}_song" for i in range(10)], "mixture", seconds=4)
    result = run_script("train.py", "--stems", tmp_path / "mine", "--epochs", "1", "--n-channels", "4", "--batch-size",
                        "2", "--cpu", "--checkpoint-dir", tmp_path / "ck", "--cache-dir", tmp_path / "cache", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dataset: stems folder {tmp_path / 'mine'}" in result.stdout and "MUSDB18" not in result.stdout
    assert "tracks: 9 train, 1 validation" in result.stdout
    assert "validation: the held-apart tracks of the stems folders, singer9_song ... singer9_song" in result.stdout
    assert read_checkpoint(tmp_path / "ck" / "best_model.pth")["dataset"] == f"stems folder {tmp_path / 'mine'}"
    assert not [p for p in (tmp_path / "mine").rglob("*") if p.suffix not in (".flac", "")]


def test_two_sources_are_drawn_by_weight_with_levels_matched(tmp_path):
    make_stems_folder(tmp_path / "mine", ["a_1", "b_1", "c_1"], seconds=4)
    result = run_script("train.py", *TINY, "--stems", tmp_path / "mine", "--source-weights", "3", "1:0", "--epochs", "1",
                        "--checkpoint-dir", tmp_path / "ck", "--cache-dir", tmp_path / "cache", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tracks: 2 + 2 train" in result.stdout and "sources drawn for the vocals 3 : 1, for the accompaniment 3 : 0" in result.stdout
    assert re.search(r"scaled to the first's levels \(vocals x[\d.]+, accompaniment x[\d.]+\)", result.stdout)


@pytest.mark.parametrize("flags,message", [
    (["--source-weights", "1"], "--source-weights: 1 given for 2 sources"),
    (["--source-weights", "1", "-1"], "--source-weights must be at least 0"),
    (["--source-weights", "1:0", "1:0"], "lend each stem from some source, got 1:0 1:0"),
    (["--source-weights", "1", "1:x"], "argument --source-weights: '1:x' is not W or V:A")])
def test_bad_source_weights(flags, message, tmp_path):
    make_stems_folder(tmp_path / "mine", ["a_1", "b_1"], seconds=1)
    result = run_script("train.py", *TINY, "--stems", tmp_path / "mine", *flags, "--checkpoint-dir", tmp_path / "ck",
                        "--cache-dir", tmp_path / "cache")
    assert_one_line_error(result, message)
    assert not (tmp_path / "ck").exists()


def test_init_fine_tunes_from_a_trained_model_and_refuses_one_that_does_not_fit(two_epochs, tmp_path):
    """--init starts from the weights (the first validation scores exactly what the model scored), with a
    fresh optimiser; another width, other STFT settings or --resume beside it: one line, nothing written."""
    trained_path = two_epochs[0] / "best_model.pth"
    trained = read_checkpoint(trained_path)
    result = run_script("train.py", *TINY, "--epochs", "1", "--init", trained_path,
                        "--checkpoint-dir", tmp_path / "b", timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"initialised from {trained_path}" in result.stdout
    assert f"before training: validation loss {trained['best_val_loss']:.4f}, SDR {trained['best_val_sdr']:.2f} dB" \
        in result.stdout
    tuned = read_checkpoint(tmp_path / "b" / "last.pth")
    assert tuned["step"] == 32 and tuned["epoch"] == 1  # a new run: its own steps and schedule
    write_bad_checkpoint("other_stft", tmp_path / "other_stft.pth")
    for init, flags, message in ((trained_path, ["--n-channels", "8"], "give --n-channels 4"),
                                 (tmp_path / "other_stft.pth", [], "other spectrogram settings"),
                                 (trained_path, ["--resume"], "give one of them")):
        bad = run_script("train.py", *TINY, *flags, "--init", init, "--checkpoint-dir", tmp_path / "c")
        assert_one_line_error(bad, "--init" if message != "give one of them" else "--resume", message)
        assert not (tmp_path / "c").exists()
