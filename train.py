"""
Train the U-Net singing-voice separator.

    python train.py                    # 20 epochs on 10 songs; prints its plan first
    python train.py --epochs 2         # start small to test quickly
    python train.py --musdb-root ../shared/data/MUSDB18-7 --n-songs 94 --time-budget 30
    torchrun --standalone --nproc_per_node=4 train.py --musdb-root MUSDB18/musdb18

Top to bottom: settings -> DDP -> data -> the plan -> model, its running average and the optimiser -> validation ->
the loop, which saves last.pth and best_model.pth (best validation SDR) to --checkpoint-dir, TensorBoard logs to
<checkpoint-dir>/logs. What is validated and saved is a running average of the trained weights (see `average`).
An epoch is the same training on every machine: one pass over the training audio at the patch overlap, at least
MIN_STEPS_PER_EPOCH steps; --time-budget MIN instead sizes the epochs so that the run takes about MIN minutes.
"""
import argparse
import copy
import itertools
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data_generator as dg
import evaluate
import inference
from unet_model import (CheckpointError, UNet, UNetConfig, amp_dtype, load_model, masked_l1_loss, read_checkpoint,
                        save_checkpoint, stored_config, train_step)

# An epoch ends with a validation, which costs as much as many training steps. On a few short songs (the
# synthetic set, the MUSDB18 previews) one pass is only a handful of steps: so an epoch is at least this many.
MIN_STEPS_PER_EPOCH = 32
# Adam's first updates, taken before its moment estimates settle, can throw a freshly initialised
# network far off; the learning rate rises linearly over these steps (at most a fifth of the run).
WARMUP_STEPS = 100
BUDGET_MARGIN = 0.03  # of --time-budget, kept free for what the plan cannot time (saving, the last log lines)



def stem_weights(text):
    """One source's --source-weights: 'W' (vocals and accompaniment alike) or 'V:A' -> (V, A)."""
    try:
        values = tuple(float(part) for part in text.split(":"))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not W or V:A (numbers)")
    return values * (3 - len(values))


# settings
parser = argparse.ArgumentParser(description="Train the U-Net singing-voice separator (Jansson et al. 2017).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--checkpoint-dir", default="checkpoints", help="best_model.pth, last.pth and logs/ go here")
parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pth")
parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (stems or HQ wav); default: MUSDB18/musdb18 "
                    "in the repo, else the 7 s preview download, else the built-in synthetic set")
parser.add_argument("--download", action="store_true", help="download the 7 s previews without asking")
parser.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic set")
parser.add_argument("--stems", action="append", default=[], metavar="DIR", help="also train on a folder of track "
                    "folders (vocals.* + accompaniment.*, mixture.* or drums/bass/other.*) or MIR-1K; repeatable; "
                    "used whole less a held-apart tenth, which validates a run without --musdb-root")
parser.add_argument("--source-weights", type=stem_weights, nargs="+", default=None, metavar="W|V:A", help="how "
                    "often each source lends a remix's vocals and, apart, its accompaniment, one W (both) or V:A per "
                    "source: MUSDB18 first, then each --stems. None: with MUSDB18 1 1:0 (the stems folders lend "
                    "vocals only), without it all equal")
parser.add_argument("--init", default=None, metavar="CHECKPOINT", help="start from this model's weights (fine-tuning: "
                    "fresh optimiser and schedule)")
parser.add_argument("--cache-dir", default=str(dg.DEFAULT_CACHE_DIR), help="decoded 8192 Hz audio is cached here")
parser.add_argument("--target", default="vocals", choices=dg.STEMS, help="source the mask extracts "
                    "(accompaniment: the original material's instrumental model)")
parser.add_argument("--n-songs", type=int, default=10, help="MUSDB18 training tracks to use")
parser.add_argument("--n-channels", type=int, default=16, help="first-layer width; layer k has n_channels * 2**k")
parser.add_argument("--epochs", type=int, default=20, help="passes over the training audio (see the printed plan)")
parser.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="size the epochs so that the "
                    "whole run, loading and validation included, takes about MIN minutes on this machine")
parser.add_argument("--batch-size", type=int, default=16, help="patches per step (per process under torchrun)")
parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of Adam (warm-up, cosine decay to 0)")
parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
parser.add_argument("--seed", type=int, default=0, help="random seed")
parser.add_argument("--workers", type=int, default=None, help="processes building batches beside the step (same batches "
                    "whatever the number); default 0 on the CPU, where the step needs every core, up to 8 per GPU")
parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as every error here
args = parser.parse_args()
launched = time.time()  # the time budget counts from here: loading and decoding the data are part of the run


def fail(message):
    sys.exit(f"error: {message}")


for name, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1),
                         ("--n-songs", args.n_songs, 1), ("--n-channels", args.n_channels, 1),
                         ("--workers", args.workers, 0)):
    if value is not None and value < low:
        fail(f"{name} must be at least {low}, got {value}")
for name, value in (("--lr", args.lr), ("--time-budget", args.time_budget)):
    if value is not None and not value > 0:
        fail(f"{name} must be positive, got {value}")
if args.source_weights is not None and (min(map(min, args.source_weights)) < 0
                                       or not all(sum(column) > 0 for column in zip(*args.source_weights))):
    fail(f"--source-weights must be at least 0 and lend each stem from some source, got "
         f"{' '.join(':'.join(f'{w:g}' for w in pair) for pair in args.source_weights)}")
if args.init is not None and args.resume:
    fail("--init starts a new run and --resume continues one: give one of them")

# DDP: torchrun sets RANK; every process trains on its own remixes, rank 0 alone logs and saves
ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
use_cuda = torch.cuda.is_available() and not args.cpu
rank, world_size = 0, 1
device = torch.device("cuda" if use_cuda else "cpu")
if ddp:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
master = rank == 0
autocast_dtype = amp_dtype(device)  # bf16 on CUDA and on CPUs with native bf16, else float32
if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
can_fork = "fork" in torch.multiprocessing.get_all_start_methods()  # not on Windows
if args.workers is None:
    per_gpu = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    args.workers = max(0, min(8, per_gpu - 1)) if device.type == "cuda" and can_fork else 0
elif args.workers > 0 and not can_fork:
    fail("--workers needs processes started by fork, which this system does not have; use --workers 0")


def log(message):
    if master:
        print(message, flush=True)


def agree(value):
    """The largest of the ranks' values, so that every rank plans the same run."""
    if not ddp:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


checkpoint_dir = Path(args.checkpoint_dir)
best_path, last_path = checkpoint_dir / "best_model.pth", checkpoint_dir / "last.pth"
checkpoint = None
if args.resume:
    try:
        checkpoint = read_checkpoint(last_path)  # data only: a checkpoint that would run code is refused
        model_config = stored_config(checkpoint, last_path)
    except CheckpointError as e:
        fail(f"--resume: {e}")
    if checkpoint.get("target", "vocals") != args.target:
        fail(f"--resume: {last_path} was trained with --target {checkpoint['target']}, not {args.target}")

init_weights = None
if args.init is not None:  # checked before the data are loaded: a wrong checkpoint fails in seconds
    try:
        init_model, init_checkpoint = load_model(args.init, expected_spec=dg.SPEC_CONFIG)
    except CheckpointError as e:
        fail(f"--init: {e}")
    if init_model.config.n_channels != args.n_channels:
        fail(f"--init {args.init}: a model of --n-channels {init_model.config.n_channels}, this run's is "
             f"{args.n_channels}; give --n-channels {init_model.config.n_channels}")
    if init_checkpoint.get("target", "vocals") != args.target:
        fail(f"--init {args.init}: trained with --target {init_checkpoint['target']}, not {args.target}")
    init_weights = init_model.state_dict()

# data
try:
    source = dg.find_data_source(args.musdb_root, args.download, args.synthetic,
                                 interactive=None if master else False, stems=args.stems)
    log(f"dataset: {source.describe()}")
    train_sources = dg.training_sources(source, args.n_songs, args.cache_dir, args.seed, progress=master)
    valid_tracks = dg.load_tracks(source, "valid", None, args.cache_dir, args.seed, progress=master)
except dg.DataError as e:
    fail(str(e))
train_tracks = [track for tracks in train_sources for track in tracks]
if not all(train_sources) or not valid_tracks:
    fail(f"{source.describe()}: needs training tracks in every source and validation tracks, found "
         f"{' + '.join(str(len(tracks)) for tracks in train_sources)} and {len(valid_tracks)}")
source_weights = np.array(args.source_weights or dg.default_weights(source, len(train_sources)))
if len(source_weights) != len(train_sources):
    fail(f"--source-weights: {len(source_weights)} given for {len(train_sources)} sources (MUSDB18 or the synthetic "
         f"set, then each --stems)")
log(f"tracks: {' + '.join(str(len(tracks)) for tracks in train_sources)} train, {len(valid_tracks)} validation; "
    f"each patch a random remix of them")
if len(train_sources) > 1:
    gains = "; ".join(f"vocals x{tracks[0].gains[0]:.2f}, accompaniment x{tracks[0].gains[1]:.2f}"
                      for tracks in train_sources[1:])
    log(f"{dg.describe_weights(source_weights)}; the other sources' stems scaled to the first's levels ({gains})")
if source.kind == "stems":
    log(f"validation: the held-apart tracks of the stems folders, {valid_tracks[0].name} ... {valid_tracks[-1].name} "
        f"(never trained on)")


class TrainingBatches(torch.utils.data.Dataset):
    """Item k: training batch k of this rank, (vocals, accompaniment) each (batch, PATCH_SAMPLES), from a random
    stream seeded by (seed, rank, key, k): workers can build batches in any order, the run is the same with any
    number of them, and --resume needs only the step count. (No __len__: the loader's sampler says which k.)"""

    def __init__(self, key=0):
        self.key = key

    def __getitem__(self, k):
        stream = np.random.default_rng([args.seed, rank, self.key, k])
        vocals, accompaniment = dg.training_batch(train_sources, args.batch_size, stream, source_weights)
        return torch.from_numpy(vocals), torch.from_numpy(accompaniment)


def batch_loader(first, key=0):
    """Batches first, first + 1, ... in order, built by --workers processes ahead of the step (here when 0); endless,
    since a --time-budget run resizes its epochs as it goes."""
    return torch.utils.data.DataLoader(
        TrainingBatches(key), batch_size=None, sampler=itertools.count(first), num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None, worker_init_fn=lambda _: torch.set_num_threads(1),
        multiprocessing_context="fork" if args.workers > 0 else None,  # workers inherit the tracks, no pickling
        generator=torch.Generator())  # its seed draw would otherwise shift the global stream dropout uses


def to_spectrograms(vocals, accompaniment):
    """A batch on the device: (mixture, target) normalised magnitudes (batch, 1, 512, 128)."""
    return dg.patch_spectrograms(vocals.to(device, non_blocking=True), accompaniment.to(device, non_blocking=True),
                                 args.target)


def one_pass():
    """(steps per epoch, patches, frames) of one pass over the training audio at the patch hop, in batches
    of every rank, at least MIN_STEPS_PER_EPOCH; frames per song (a patch takes one channel)."""
    frames = sum(dg.n_frames(track.vocals.shape[1]) for track in train_tracks)
    patches = math.ceil(frames / dg.patch_hop(0.5))
    return max(MIN_STEPS_PER_EPOCH, math.ceil(patches / (args.batch_size * world_size))), patches, frames


def describe_plan(steps_per_epoch):
    patches = args.epochs * steps_per_epoch * args.batch_size * world_size
    return f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size * world_size} patches ({patches:,} patches)"


by_budget = args.time_budget is not None and checkpoint is None  # a resumed run keeps the plan of its last epoch
if checkpoint is not None:
    steps_per_epoch = checkpoint.get("steps_per_epoch") or checkpoint["args"]["steps_per_epoch"]
    left = max(0, args.epochs - checkpoint["epoch"])  # a budget run's earlier epochs may have had other sizes
    log(f"plan: {left} epoch(s) left of --epochs {args.epochs}, each {steps_per_epoch} steps of "
        f"{args.batch_size * world_size} patches, as {last_path} planned them")
elif not by_budget:
    steps_per_epoch, pass_patches, pass_frames = one_pass()
    log(f"plan: {describe_plan(steps_per_epoch)}; an epoch: one pass over {pass_frames:,} frames of training audio "
        f"= {pass_patches:,} patches at a hop of {dg.patch_hop(0.5)} frames, at least {MIN_STEPS_PER_EPOCH} steps")
elif time.time() - launched > args.time_budget * 60:
    fail(f"--time-budget {args.time_budget:g} min: loading the data alone took {time.time() - launched:.0f} s; "
         f"give more minutes")
else:
    log(f"plan: {args.epochs} epochs sized to --time-budget {args.time_budget:g} min once a step and a validation "
        f"have been timed")
if master:  # only now that the data is there: a failed start leaves no empty folders behind
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--checkpoint-dir {checkpoint_dir}: cannot create it ({e.strerror})")

# model and optimiser: fresh, or resumed with everything needed to continue exactly
torch.manual_seed(args.seed)
if checkpoint is None:
    model_config = UNetConfig(n_channels=args.n_channels)
model = UNet(model_config).to(device, memory_format=torch.channels_last)  # faster oneDNN convolutions (RESULTS.md)
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # bf16 needs no scaling
start_epoch, step, best_val_loss, best_val_sdr, history = 0, 0, float("inf"), float("-inf"), []
if init_weights is not None:
    model.load_state_dict(init_weights)
    log(f"initialised from {args.init} (its weights; a fresh optimiser and learning-rate schedule)")
# The model that is validated and saved is an exponential moving average of the trained weights (and BatchNorm
# statistics): each small batch moves the trained weights a little at random, and that noise made the validation
# SDR and the mask's mean swing from epoch to epoch (RESULTS.md, section 0). It stays in eval mode.
average = copy.deepcopy(model).eval().requires_grad_(False)
if checkpoint is not None:
    model.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))  # absent: a last.pth of before the average
    average.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    start_epoch, step, history = checkpoint["epoch"], checkpoint["step"], checkpoint["history"]
    best_val_loss, best_val_sdr = checkpoint["best_val_loss"], checkpoint["best_val_sdr"]
    torch.set_rng_state(checkpoint["torch_rng"])
    if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    log(f"resuming from {last_path}: epoch {start_epoch + 1}, step {step}, best validation SDR {best_val_sdr:.2f} dB")
log(f"model: U-Net, n_channels={model_config.n_channels}, {model.get_num_params():,} parameters, on {device}"
    + (f" x {world_size} processes" if ddp else "") + (f", autocast {autocast_dtype}" if autocast_dtype else ""))
raw_model = model  # the network being trained (model is its DDP wrapper under torchrun)
if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# validation: the loss on every patch of the validation songs as mixed, and their SDR
@torch.no_grad()
def estimate_val_loss():
    """(loss, mask mean, mask std) over the validation patches, shared out between ranks (model in eval mode)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x elements, mask, mask^2, elements
    for track in valid_tracks[rank::world_size]:
        mixture, target = dg.validation_patches(track, args.target)
        for j in range(0, mixture.shape[0], args.batch_size):
            x, y = mixture[j:j + args.batch_size].to(device), target[j:j + args.batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                mask = average(x).float()
            n = float(mask.numel())
            sums += torch.stack([masked_l1_loss(mask, x, y) * n, mask.sum(), mask.square().sum(),
                                 torch.tensor(n, device=device)]).double()
    if ddp:
        dist.all_reduce(sums)
    loss, mean = (sums[0] / sums[3]).item(), (sums[1] / sums[3]).item()
    return loss, mean, math.sqrt(max(0.0, (sums[2] / sums[3]).item() - mean ** 2))


@torch.no_grad()
def estimate_val_sdr():
    """(median, mean, per-song list) of the target's SDR (dB) on the validation songs, separated by inference's
    separator at 8192 Hz, scored like evaluate.py (BSSEval v4): a steadier judge than the loss."""
    mask_fn = inference.model_mask_fn(average, device, args.batch_size)
    scores = torch.zeros(len(valid_tracks), dtype=torch.float64, device=device)
    for i, track in list(enumerate(valid_tracks))[rank::world_size]:
        stems = inference.separate(np.array(track.mixture), dg.SAMPLE_RATE, mask_fn, target=args.target)
        estimate = stems[dg.STEMS.index(args.target)]
        scores[i] = evaluate.target_sdr(getattr(track, args.target), estimate, dg.SAMPLE_RATE)
    if ddp:
        dist.all_reduce(scores)  # every song was scored by exactly one rank
    per_song = scores.cpu().tolist()  # nan: a song whose target is silent throughout
    if np.isnan(per_song).all():
        return float("nan"), float("nan"), per_song
    # the median (museval's statistic, and the one that selects) moves with whichever songs sit in the middle; the
    # mean of the songs is printed beside it as the steadier figure (RESULTS.md, section 0)
    return float(np.nanmedian(per_song)), float(np.nanmean(per_song)), per_song


def validate():
    """Every validation figure of the averaged model, as plain floats for the log and the history."""
    try:
        val_loss, mask_mean, mask_std = estimate_val_loss()
        val_sdr, val_sdr_mean, val_sdr_songs = estimate_val_sdr()
    except dg.DataError as e:  # what scoring needs is missing (see evaluate.target_sdr)
        fail(str(e))
    return dict(val_loss=val_loss, val_sdr=val_sdr, val_sdr_mean=val_sdr_mean, mask_mean=mask_mean, mask_std=mask_std,
                val_sdr_songs=val_sdr_songs)


def log_separations(epoch, n_tracks=2, seconds=10):
    """TensorBoard pictures (mixture, mask, vocals) and audio of the first validation songs' separations."""
    mask_fn = inference.model_mask_fn(average, device)
    for i, track in enumerate(valid_tracks[:n_tracks]):
        mixture = np.array(track.mixture[:1, :seconds * dg.SAMPLE_RATE])
        (vocals, _), mask = inference.separate(mixture, dg.SAMPLE_RATE, mask_fn, target=args.target, return_mask=True)
        writer.add_figure(f"separation/{i}", inference.separation_figure(mixture, mask, track.name), epoch)
        peak = max(1.0, float(np.abs(mixture).max()))  # TensorBoard clips audio at +-1
        writer.add_audio(f"separation/{i}_vocals", torch.from_numpy(vocals[0] / peak), epoch, sample_rate=dg.SAMPLE_RATE)
        if epoch == 0:
            writer.add_audio(f"separation/{i}_mixture", torch.from_numpy(mixture[0] / peak), epoch,
                             sample_rate=dg.SAMPLE_RATE)


def save(path, epoch, resumable):
    """Tensors and plain values: best_model.pth the averaged model and its record, last.pth also what --resume needs
    (the trained weights among it)."""
    extra = dict(trained_model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None) if resumable else {}
    save_checkpoint(path, average, dg.SPEC_CONFIG, args.target, args=vars(args), epoch=epoch, step=step,
                    steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps, best_val_loss=best_val_loss,
                    best_val_sdr=best_val_sdr, history=history, dataset=source.describe(), **extra)


writer = None
if master:
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(checkpoint_dir / "logs"))
from tqdm import tqdm

if checkpoint is None:
    val = validate()
    log(f"before training: validation loss {val['val_loss']:.4f}, SDR {val['val_sdr']:.2f} dB, "
        f"mask mean {val['mask_mean']:.3f} std {val['mask_std']:.3f}")
    t0 = time.time()
    if master:
        writer.add_scalar("val/loss", val["val_loss"], 0)
        writer.add_scalar("val/sdr", val["val_sdr"], 0)
        writer.add_scalar("val/sdr_mean", val["val_sdr_mean"], 0)
        log_separations(0)
    logging_seconds = agree(time.time() - t0)

# time budget: with --time-budget, as many steps per epoch as fit in it
def seconds_per_step(n_steps=8, n_untimed=2):
    """Seconds a training step takes here, timed on throwaway copies of the model and optimiser with batches
    of their own (key 1): the run itself, RNG streams included, is not changed. (.item() waits, also on CUDA.)"""
    trial_model = copy.deepcopy(raw_model)
    trial_optimizer = torch.optim.Adam(trial_model.parameters(), lr=args.lr)
    trial_scaler = torch.amp.GradScaler(device.type, enabled=scaler.is_enabled())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout's stream stays put
        for i, batch in enumerate(itertools.islice(batch_loader(0, key=1), n_untimed + n_steps)):
            if i == n_untimed:
                t0 = time.time()
            train_step(trial_model, trial_optimizer, trial_scaler, *to_spectrograms(*batch), autocast_dtype).item()
    return (time.time() - t0) / n_steps


def plan_by_budget():
    """Steps per epoch that fill --time-budget, from a step and a validation timed here."""
    t0 = time.time()  # validation again, timed without the first call's one-off costs (imports, kernel selection)
    validate()
    validation_seconds = agree(time.time() - t0) + logging_seconds  # what each epoch adds to its steps
    step_seconds = agree(seconds_per_step())
    elapsed = agree(time.time() - launched)
    left = args.time_budget * 60 * (1 - BUDGET_MARGIN) - elapsed
    steps = int((left / args.epochs - validation_seconds) / step_seconds)
    if steps < 1:
        fail(f"--time-budget {args.time_budget:g} min is too short here: loading took {elapsed:.0f} s, a training step "
             f"takes {step_seconds:.2f} s and a validation {validation_seconds:.0f} s; give more minutes or fewer --epochs")
    planned = elapsed + args.epochs * (steps * step_seconds + validation_seconds)
    log(f"plan: {describe_plan(steps)}, sized to --time-budget {args.time_budget:g} min: {step_seconds:.2f} s a step, "
        f"{validation_seconds:.1f} s a validation, {elapsed:.0f} s so far, planned to end after {planned / 60:.1f} min; "
        f"later epochs are resized by the time the last one took")
    return steps, validation_seconds


def replan(epoch, step_seconds, epoch_overhead):
    """Steps for each epoch after this one (ending, its validation still to come) that fill what is left of
    --time-budget, at the last epoch's seconds per step and per validation: the speed of a shared machine drifts
    during a run, and a plan fixed from the first steps missed its budget either way (RESULTS.md, section 0).
    0: even one step more would overrun."""
    epochs_left = args.epochs - epoch - 1
    left = args.time_budget * 60 * (1 - BUDGET_MARGIN) - agree(time.time() - launched) - epoch_overhead
    return max(0, int((left / epochs_left - epoch_overhead) / step_seconds))


if by_budget:
    steps_per_epoch, epoch_overhead = plan_by_budget()

# the loop: linear warm-up, then cosine decay of the learning rate to 0 at the last step, so that the weights of the
# last epochs settle rather than keep moving at a tenth of the peak rate. A --time-budget run recomputes total_steps
# whenever it resizes its epochs.
total_steps = step + (args.epochs - start_epoch) * steps_per_epoch
warmup_steps = min(WARMUP_STEPS, total_steps // 5)  # short runs must not spend most steps warming up
if checkpoint is not None:
    warmup_steps = checkpoint.get("warmup_steps", warmup_steps)  # as planned at the start


def get_lr(it):
    if it < warmup_steps:
        return args.lr * (it + 1) / warmup_steps
    progress = min(1.0, (it - warmup_steps) / max(1, total_steps - warmup_steps))
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_average():
    """Move the average a step towards the trained weights. The decay (1 + step) / (10 + step) grows with the run,
    so the average spans roughly the last tenth of the steps taken so far, and early on follows the fast learning."""
    decay = (1 + step) / (10 + step)
    for mean, value in zip(average.state_dict().values(), raw_model.state_dict().values()):
        if mean.is_floating_point():
            mean.lerp_(value, 1 - decay)
        else:  # BatchNorm's count of batches
            mean.copy_(value)


def on_ctrl_c(signum, frame):
    """First Ctrl-C: stop after the current step (an exception raised wherever the signal lands can hit
    a __del__, which swallows it); a second Ctrl-C stops at once."""
    global interrupted
    if interrupted:
        raise KeyboardInterrupt
    interrupted = True


def train_epoch(epoch, batches):
    """steps_per_epoch training steps. Returns (mean training loss, last learning rate)."""
    global step
    running = 0.0
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master,
               unit="step", leave=False)
    for _ in bar:
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, scaler, *to_spectrograms(*next(batches)), autocast_dtype).item()
        step += 1
        update_average()
        if interrupted:
            raise KeyboardInterrupt
        running += loss
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
        if master and step % 10 == 0:  # per-step curve, thinned
            writer.add_scalar("train/loss_step", loss, step)
    return running / steps_per_epoch, lr


def end_epoch(epoch, train_loss, lr, t0):
    """Validate, record, log, save last.pth, and best_model.pth when the validation SDR is the best so far
    (the first epoch always counts: its SDR is nan when no validation song has the target)."""
    global best_val_loss, best_val_sdr
    t_val = time.time()
    val = validate()
    improved = val["val_sdr"] > best_val_sdr or best_val_sdr == float("-inf")
    if improved:
        best_val_loss, best_val_sdr = val["val_loss"], val["val_sdr"]
    history.append(dict(epoch=epoch + 1, step=step, train_loss=train_loss, **val, lr=lr,
                        validation_seconds=time.time() - t_val, seconds=time.time() - t0))
    if master:
        for tag, value in (("train/loss", train_loss), ("val/loss", val["val_loss"]), ("val/sdr", val["val_sdr"]),
                           ("val/sdr_mean", val["val_sdr_mean"]),
                           ("val/mask_mean", val["mask_mean"]), ("val/mask_std", val["mask_std"]), ("train/lr", lr)):
            writer.add_scalar(tag, value, epoch + 1)
        log_separations(epoch + 1)
        writer.flush()
        if improved:
            save(best_path, epoch + 1, resumable=False)
        save(last_path, epoch + 1, resumable=True)
    log(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, "
        f"val SDR {val['val_sdr']:.2f} dB{' (best)' if improved else ''}, songs' mean {val['val_sdr_mean']:.2f} dB, "
        f"mask mean {val['mask_mean']:.3f} std {val['mask_std']:.3f}, lr {lr:.1e}, {time.time() - t0:.0f} s"
        + (f"; next epochs {steps_per_epoch} steps" if by_budget and epoch + 1 < args.epochs and not out_of_time else ""))


def check_replicas():
    """DDP keeps replicas in step by averaging gradients; check that it did."""
    checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    log(f"DDP: weights {'identical' if all(torch.equal(g, gathered[0]) for g in gathered) else 'DIFFERENT'} across {world_size} ranks "
        f"(parameter sums {', '.join(f'{g.item():.6f}' for g in gathered)})")


if start_epoch >= args.epochs:
    log(f"nothing to do: {last_path} already finished epoch {start_epoch} of --epochs {args.epochs}")
interrupted = False  # set by on_ctrl_c
if not ddp:  # under torchrun every rank gets the signal and must not stop at different steps
    signal.signal(signal.SIGINT, on_ctrl_c)
started, epoch = time.time(), start_epoch
batches = iter(batch_loader(step))
try:
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        train_loss, lr = train_epoch(epoch, batches)
        out_of_time = False
        if by_budget and epoch + 1 < args.epochs:  # before end_epoch saves, so that last.pth holds the new plan
            steps = replan(epoch, agree(time.time() - t0) / steps_per_epoch, epoch_overhead)
            out_of_time = steps == 0
            if not out_of_time:
                steps_per_epoch, total_steps = steps, step + (args.epochs - epoch - 1) * steps
        t1 = time.time()
        end_epoch(epoch, train_loss, lr, t0)
        epoch_overhead = agree(time.time() - t1)
        if interrupted:  # Ctrl-C during validation: this epoch is complete and saved, stop here
            raise KeyboardInterrupt
        if out_of_time:
            log(f"time budget: not one more step fits in {args.time_budget:g} min (the machine got much slower); "
                f"stopping after epoch {epoch + 1}")
            break
except KeyboardInterrupt:
    log(f"\ninterrupted in epoch {epoch + 1}; the last completed epoch is in {last_path} "
        f"(continue with --resume), the best model so far in {best_path}")
    if ddp:
        dist.destroy_process_group()
    sys.exit(130)
if ddp:
    check_replicas()
log(f"done in {time.time() - started:.0f} s: best validation SDR {best_val_sdr:.2f} dB (loss {best_val_loss:.4f}); "
    f"best model {best_path}, last {last_path}, logs {checkpoint_dir / 'logs'}")
if writer is not None:
    writer.close()
if ddp:
    dist.barrier()  # every rank done with its last collective before any tears the group down (gloo can abort otherwise)
    dist.destroy_process_group()
