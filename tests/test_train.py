"""train.py: its units (learning rate, running average, time budget, the state a checkpoint keeps) called directly,
runs in this process, and a process of its own where the process is the point: one-line errors, kill -9 and exact
--resume, Ctrl-C, torchrun."""
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_generator as dg
import datasets
import train
import utils
from conftest import make_stems_folder, make_wav_dataset, REPO, assert_one_line_error, run_script, write_bad_checkpoint
from unet_model import UNet, UNetConfig, load_model, read_checkpoint


@pytest.fixture(scope="module")
def tiny(tiny_stems, tmp_path_factory):
    """The flags of a small, fast run: the tiny stems folder, a narrow network, batches of two."""
    cache = tmp_path_factory.mktemp("cache")
    return ["--stems", tiny_stems, "--cache-dir", cache, "--n-channels", "4", "--batch-size", "2", "--cpu"]


def run_here(*args):
    """train.main in this process, as `python train.py ARGS` would run it -> exit status (SIGINT's handler kept)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return train.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def two_epochs(tiny, tmp_path_factory):
    """The checkpoint folder of one tiny two-epoch run, in a process of its own (the kill -9 test resumes another
    process's run and compares it with this one), shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("two_epochs")
    result = run_script("train.py", *tiny, "--epochs", "2", "--checkpoint-dir", folder, timeout=900)
    assert result.returncode == 0, result.stderr
    return folder, result


# -----------------------------------------------------------------------------
# the units

def test_learning_rate_warms_up_then_falls_along_a_cosine_to_zero():
    lr = [train.learning_rate(step, 4e-3, 10, 110) for step in range(111)]
    assert lr[0] == pytest.approx(4e-4) and lr[9] == pytest.approx(4e-3)  # linear over the first ten steps
    assert lr[10] == pytest.approx(4e-3) and lr[60] == pytest.approx(2e-3) and lr[110] == pytest.approx(0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert train.learning_rate(5, 1.0, 0, 10) == pytest.approx(0.5)  # no warm-up at all


def test_the_running_average_follows_the_trained_weights_with_a_growing_decay():
    torch.manual_seed(0)
    model = UNet(UNetConfig(n_channels=4))
    average = train.RunningAverage(model)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    before = model.output.weight.detach().clone()
    with torch.no_grad():
        model.output.weight.add_(1.0)
    model.encoder[0].norm.num_batches_tracked.fill_(7)
    average.update(model, step=1)  # decay 2 / 11: the average moves 9 / 11 of the way
    assert torch.allclose(average.model.output.weight, before + 9 / 11, atol=1e-6)
    assert average.model.encoder[0].norm.num_batches_tracked.item() == 7  # counts are copied, not averaged
    average.update(model, step=990)  # decay 991 / 1000: late in a run it moves 0.9 % of the way
    assert torch.allclose(average.model.output.weight, before + 9 / 11 + (2 / 11) * 0.009, atol=1e-6)


def test_steps_that_fill_a_time_budget():
    # 600 s for 4 epochs, each with 30 s of validation beside its steps of 0.5 s: (150 - 30) / 0.5
    assert train.steps_to_fill(600, 4, 0.5, 30) == 240
    assert train.steps_to_fill(100, 4, 0.5, 30) < 1  # not even one step fits


def test_the_state_a_checkpoint_keeps_comes_back_as_it_was(tiny, tmp_path):
    args = train.parse_args(["--checkpoint-dir", str(tmp_path), *map(str, tiny)])
    procs = train.start_processes(args)
    data = train.load_data(args, procs)
    run = train.Run(args, procs, data, UNetConfig(n_channels=4))
    run.state = train.TrainState(epoch=3, step=96, steps_per_epoch=32, warmup_steps=19, best_val_loss=0.5,
                                 best_val_sdr=4.25, history=[dict(epoch=1, val_sdr=4.25)])
    train.save_run(tmp_path / "last.pth", run, resumable=True)
    other = train.Run(args, procs, data, UNetConfig(n_channels=4))
    with torch.no_grad():
        other.network.output.weight.add_(1.0)
    train.resume_run(other, read_checkpoint(tmp_path / "last.pth"))
    assert other.state == run.state
    assert torch.equal(other.network.output.weight, run.network.output.weight)
    assert torch.equal(other.average.model.output.weight, run.average.model.output.weight)


def test_an_epoch_is_one_pass_over_the_training_audio(capsys):
    """10 synthetic songs of 20 s: 10 x 215 frames = 2,150, at a hop of 64 frames 34 patches, in batches of 1:
    34 steps an epoch (above the floor of 32), whatever the machine; two songs make 7 patches: the floor."""
    args = train.parse_args(["--synthetic", "--batch-size", "1", "--epochs", "2"])
    procs = train.Processes(torch.device("cpu"))
    tracks = datasets.load_tracks(datasets.DataSource("synthetic"), "train")
    data = train.Data(datasets.DataSource("synthetic"), [tracks], [], np.ones((1, 2)))
    assert train.fixed_plan(args, procs, data, None, time.time()) == 34
    assert ("plan: 2 epochs x 34 steps of 1 patches (68 patches); an epoch: one pass over 2,150 frames of training "
            "audio = 34 patches at a hop of 64 frames") in capsys.readouterr().out
    assert train.one_pass(train.Data(data.source, [tracks[:2]], [], data.weights), args, procs)[:2] == (32, 7)


# -----------------------------------------------------------------------------
# runs

def test_a_run_plans_first_and_saves_what_it_planned(tiny, tmp_path, capsys):
    assert run_here(*tiny, "--epochs", "2", "--checkpoint-dir", tmp_path) == 0
    out = capsys.readouterr().out
    plan = "plan: 2 epochs x 32 steps of 2 patches (128 patches); an epoch: one pass over 264 frames"
    assert plan in out and out.index(plan) < out.index("before training")
    last = read_checkpoint(tmp_path / "last.pth")
    assert last["steps_per_epoch"] == 32 and last["step"] == 64 and [h["epoch"] for h in last["history"]] == [1, 2]
    assert last["warmup_steps"] == 12  # a fifth of a short run, not WARMUP_STEPS
    assert last["history"][-1]["lr"] < 0.01 * last["args"]["lr"]  # the cosine ends at the last step


def test_a_checkpoint_is_only_tensors_and_plain_values(two_epochs):
    """Both files load with weights_only=True; best_model.pth is the model and its record only."""
    folder, _ = two_epochs
    last, best = read_checkpoint(folder / "last.pth"), read_checkpoint(folder / "best_model.pth")
    assert {"optimizer", "scaler", "torch_rng", "cuda_rng"} <= set(last) and "optimizer" not in best
    assert isinstance(last["args"], dict) and last["args"]["epochs"] == 2
    assert isinstance(last["torch_rng"], torch.Tensor)
    history = last["history"]
    assert len(history) == 2 and all(isinstance(v, (int, float, list)) for h in history for v in h.values())
    for h in history:
        assert len(h["val_sdr_songs"]) == 2  # the held-apart singer's two songs
        assert h["val_sdr"] == np.median(h["val_sdr_songs"]) and h["val_sdr_mean"] == np.mean(h["val_sdr_songs"])
    assert "history" in best and "args" in best and best["step"] <= last["step"]
    # the model saved is the running average of the trained weights, which last.pth also holds for --resume
    average, trained = last["model"], last["trained_model"]
    assert average.keys() == trained.keys() and "trained_model" not in best
    assert not torch.equal(average["output.weight"], trained["output.weight"])
    assert torch.equal(average["encoder.0.norm.num_batches_tracked"], trained["encoder.0.norm.num_batches_tracked"])


def test_best_model_is_the_epoch_with_the_best_validation_sdr_and_tensorboard_has_it_all(two_epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder, result = two_epochs
    history = read_checkpoint(folder / "last.pth")["history"]
    sdrs = [h["val_sdr"] for h in history]
    assert len(history) == 2 and all(np.isfinite(sdrs))
    best = read_checkpoint(folder / "best_model.pth")
    assert best["epoch"] == 1 + int(np.argmax(sdrs)) and best["best_val_sdr"] == max(sdrs)
    events = EventAccumulator(str(folder / "logs"), size_guidance={"images": 0, "audio": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "val/loss", "val/sdr", "val/sdr_mean", "val/mask_mean", "val/mask_std", "train/lr",
                   "train/loss_step"):
        assert scalar in tags["scalars"], scalar
    assert [e.step for e in events.Scalars("val/loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("val/sdr_mean")][1:] == pytest.approx([h["val_sdr_mean"] for h in history])
    assert {"separation/0", "separation/1"} <= set(tags["images"])
    assert [e.step for e in events.Images("separation/0")] == [0, 1, 2]
    assert {"separation/0_vocals", "separation/0_mixture"} <= set(tags["audio"])
    assert [e.step for e in events.Audio("separation/0_mixture")] == [0]
    audio = events.Audio("separation/0_vocals")[-1]
    assert audio.sample_rate == dg.SAMPLE_RATE and audio.length_frames == 3 * dg.SAMPLE_RATE
    assert "val loss" in result.stdout and "val SDR" in result.stdout and "mask mean" in result.stdout


def test_time_budget_sizes_the_epochs_and_prints_the_plan(tiny, tmp_path, capsys):
    assert run_here(*tiny, "--epochs", "2", "--time-budget", "0.3", "--checkpoint-dir", tmp_path) == 0
    out = capsys.readouterr().out
    match = re.search(r"plan: 2 epochs x (\d+) steps of 2 patches .*sized to --time-budget 0.3 min: ([\d.]+) s a step",
                      out)
    assert match, out
    last = read_checkpoint(tmp_path / "last.pth")
    if last["epoch"] == 1:  # a machine that got much slower after planning (other jobs) may leave no time at all
        assert "time budget: not one more step fits in 0.3 min" in out
        return
    # epoch 2 was resized by the time epoch 1 took, and the learning rate still ends its cosine at the last step
    resized = re.search(r"epoch 1/2: .*; next epochs (\d+) steps", out)
    assert resized, out
    assert last["epoch"] == 2 and last["steps_per_epoch"] == int(resized[1]) >= 1
    assert last["step"] == int(match[1]) + int(resized[1]) == last["history"][-1]["step"]
    assert last["history"][-1]["lr"] < 0.01 * last["args"]["lr"]


def test_a_stems_folder_alone_trains_and_validates_on_its_held_apart_tracks(tmp_path, capsys):
    """A run on a folder of stems only: MUSDB18 is not looked for, a tenth is held apart and named, and
    nothing is written beside the data (the decoded audio goes to --cache-dir)."""
    make_stems_folder(tmp_path / "mine", [f"singer{i}_song" for i in range(10)], "mixture", seconds=4)
    assert run_here("--stems", tmp_path / "mine", "--epochs", "1", "--n-channels", "4", "--batch-size", "2", "--cpu",
                    "--checkpoint-dir", tmp_path / "ck", "--cache-dir", tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert f"dataset: stems folder {tmp_path / 'mine'}" in out and "MUSDB18" not in out
    assert "tracks: 9 train, 1 validation" in out
    assert "validation: the held-apart tracks of the stems folders, singer9_song ... singer9_song" in out
    assert read_checkpoint(tmp_path / "ck" / "best_model.pth")["dataset"] == f"stems folder {tmp_path / 'mine'}"
    assert not [p for p in (tmp_path / "mine").rglob("*") if p.suffix not in (".flac", "")]


def test_two_sources_are_drawn_by_weight_with_levels_matched(tiny, tmp_path, capsys):
    make_stems_folder(tmp_path / "mine", ["a_1", "b_1", "c_1"], seconds=4)
    assert run_here(*tiny, "--stems", tmp_path / "mine", "--source-weights", "3", "1:0", "--epochs", "1",
                    "--checkpoint-dir", tmp_path / "ck") == 0
    out = capsys.readouterr().out
    assert "tracks: 8 + 2 train, 3 validation" in out
    assert "sources drawn for the vocals 3 : 1, for the accompaniment 3 : 0" in out
    assert re.search(r"scaled to the first's levels \(vocals x[\d.]+, accompaniment x[\d.]+\)", out)


def test_musdb18_as_wav_stems_and_more_songs_than_exist(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(utils.DataError, match="no MUSDB18 tracks"):
        run_here("--musdb-root", tmp_path / "empty", "--checkpoint-dir", tmp_path / "ck")
    root = tmp_path / "hq"
    make_wav_dataset(root, ["A - Train One", "B - Train Two", "ANiMAL - Rockshow"])  # the last: musdb's valid split
    assert run_here("--musdb-root", root, "--n-songs", "50", "--epochs", "1", "--n-channels", "4", "--batch-size", "2",
                    "--checkpoint-dir", tmp_path / "ck", "--cache-dir", tmp_path / "cache") == 0
    out, err = capsys.readouterr()
    assert "warning: --n-songs 50: only 2 train tracks exist" in err and "using all" in err
    assert "MUSDB18-HQ wav" in out and "2 train, 1 validation" in out
    assert "1 epochs x 32 steps" in out  # two 3 s songs: the floor
    assert (tmp_path / "ck" / "best_model.pth").exists()
    assert not any(p.suffix == ".npy" for p in root.rglob("*"))  # nothing written beside the dataset


def test_init_fine_tunes_from_a_trained_model_and_refuses_one_that_does_not_fit(tiny, two_epochs, tmp_path, capsys):
    """--init starts from the weights (the first validation scores exactly what the model scored), with a
    fresh optimiser; another width, other STFT settings or --resume beside it: one line, nothing written."""
    trained_path = two_epochs[0] / "best_model.pth"
    trained = read_checkpoint(trained_path)
    assert run_here(*tiny, "--epochs", "1", "--init", trained_path, "--checkpoint-dir", tmp_path / "b") == 0
    out = capsys.readouterr().out
    assert f"initialised from {trained_path}" in out
    before = f"before training: validation loss {trained['best_val_loss']:.4f}, SDR {trained['best_val_sdr']:.2f} dB"
    assert before in out
    tuned = read_checkpoint(tmp_path / "b" / "last.pth")
    assert tuned["step"] == 32 and tuned["epoch"] == 1  # a new run: its own steps and schedule
    write_bad_checkpoint("other_stft", tmp_path / "other_stft.pth")
    for init, flags, message in ((trained_path, ["--n-channels", "8"], "give --n-channels 4"),
                                 (tmp_path / "other_stft.pth", [], "other spectrogram settings"),
                                 (trained_path, ["--resume"], "give one of them")):
        with pytest.raises(SystemExit, match=message):
            run_here(*tiny, *flags, "--init", init, "--checkpoint-dir", tmp_path / "c")
        assert not (tmp_path / "c").exists()


# -----------------------------------------------------------------------------
# the process itself: one-line errors, kill -9 and --resume, Ctrl-C, torchrun

@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                           (["--lr", "-0.001"], "--lr must be positive"),
                                           (["--epochs", "0"], "--epochs must be at least 1"),
                                           (["--time-budget", "0"], "--time-budget must be positive"),
                                           (["--source-weights", "1", "-1"], "--source-weights must be at least 0"),
                                           (["--source-weights", "1:0", "1:0"], "lend each stem from some source, "
                                                                                "got 1:0 1:0"),
                                           (["--source-weights", "1", "1:x"], "argument --source-weights: '1:x' is "
                                                                              "not W or V:A")])
def test_bad_training_flags(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_args(["--synthetic", *flags])


@pytest.mark.parametrize("flags,message", [(["--resume"], "--resume:"),
                                           (["--musdb-root", "/nonexistent/musdb"], "no such folder"),
                                           (["--source-weights", "1", "1", "1"], "--source-weights: 3 given for 2 "
                                                                                 "sources"),
                                           (["--epochs", "3", "--time-budget", "0.0001"],
                                            "--time-budget 0.0001 min: loading the data alone took")])
def test_a_bad_start_is_one_line_on_stderr_and_writes_nothing(flags, message, tiny_stems, tmp_path):
    source = [] if "--musdb-root" in flags else ["--stems", tiny_stems, "--stems", tiny_stems]
    result = run_script("train.py", *source, *flags, "--cache-dir", tmp_path / "cache", "--checkpoint-dir",
                        tmp_path / "ck")
    assert_one_line_error(result, message)
    assert not (tmp_path / "ck").exists()


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


def wait_for(path, process, timeout=300):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_kill_9_during_training_then_resume_continues_exactly(tiny, two_epochs, tmp_path):
    """A run killed during epoch 2 and resumed ends with exactly the weights of a run that was never interrupted
    (two_epochs, the same flags): model, optimiser, schedule, RNG streams all come back. The resumed part builds
    its batches in two worker processes: the batches do not depend on that. A last.pth of before the running
    average (no trained_model) resumes too, its one weight set starting both."""
    flags = [*tiny, "--epochs", "2"]
    straight, folder = two_epochs[0], tmp_path / "killed"
    args = [sys.executable, str(REPO / "train.py"), *map(str, flags), "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    wait_for(folder / "last.pth", process)
    time.sleep(0.2)
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
    steps = checkpoint["steps_per_epoch"]
    assert f"plan: 1 epoch(s) left of --epochs 2, each {steps} steps of 2 patches" in result.stdout
    final = read_checkpoint(folder / "last.pth")
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    for weights in ("model", "trained_model"):  # the running average and the trained weights
        a, b = read_checkpoint(straight / "last.pth")[weights], final[weights]
        assert all(torch.equal(a[k], b[k]) for k in a), weights
    result = run_script("train.py", *flags, "--checkpoint-dir", tmp_path / "old", "--resume", timeout=900)
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(tmp_path / "old" / "last.pth")["epoch"] == 2


def test_ctrl_c_stops_cleanly_and_says_where_the_checkpoints_are(tiny, tmp_path):
    folder = tmp_path / "ck"
    args = [sys.executable, str(REPO / "train.py"), *map(str, tiny), "--epochs", "3", "--checkpoint-dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for(folder / "last.pth", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "interrupted in epoch" in out and str(folder / "last.pth") in out and "--resume" in out
    load_model(folder / "last.pth")


def torchrun(*args, timeout=900):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights_and_resume(tiny, tmp_path):
    folder = tmp_path / "ck"
    result = torchrun(*tiny, "--epochs", "1", "--checkpoint-dir", folder)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "x 2 processes" in out and "DDP: weights identical across 2 ranks" in out
    assert "1 epochs x 32 steps of 4 patches" in out  # a step takes a batch from each rank
    assert out.count("epoch 1/1:") == 1  # only rank 0 logs
    model, _ = load_model(folder / "best_model.pth", expected_spec=dg.SPEC_CONFIG)  # loads without DDP
    with torch.no_grad():
        assert model(torch.rand(1, 1, 512, 128)).shape == (1, 1, 512, 128)
    result = torchrun(*tiny, "--epochs", "2", "--checkpoint-dir", folder, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "DDP: weights identical across 2 ranks" in result.stdout
    assert read_checkpoint(folder / "last.pth")["epoch"] == 2
