"""
Train the U-Net singing-voice separator.

    python train.py                                          # defaults: see --help
    python train.py --musdb-root ../shared/data/MUSDB18-7 --n-songs 94
    torchrun --standalone --nproc_per_node=4 train.py --musdb-root MUSDB18/musdb18

One story, top to bottom: settings -> DDP set-up -> data -> model and optimiser (fresh or
resumed) -> learning-rate schedule -> validation -> the loop, which saves the last and the best
checkpoint (by the vocals SDR of musdb's validation split, or by validation loss) to
--checkpoint-dir and writes TensorBoard logs to <checkpoint-dir>/logs.
"""
import argparse
import copy
import math
import os
import random
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
from unet_model import UNet, UNetConfig, amp_dtype, save_checkpoint, write_checkpoint

# -----------------------------------------------------------------------------
# settings

parser = argparse.ArgumentParser(description="Train the U-Net singing-voice separator (Jansson et al. 2017).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# I/O
parser.add_argument("--checkpoint-dir", default="checkpoints", help="best_model.pth, last.pth and logs/ go here")
parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pth")
# data
parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (stems or HQ wav); default: MUSDB18/musdb18 "
                    "in the repo, else the 7 s preview download, else the built-in synthetic set")
parser.add_argument("--download", action="store_true", help="download the 7 s previews without asking")
parser.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic set")
parser.add_argument("--cache-dir", default=str(dg.DEFAULT_CACHE_DIR), help="decoded 8192 Hz audio is cached here")
parser.add_argument("--target", default="vocals", choices=dg.STEMS, help="source the mask extracts "
                    "(accompaniment: the original material's instrumental model)")
parser.add_argument("--n-songs", type=int, default=10, help="training tracks to use")
parser.add_argument("--steps-per-epoch", type=int, default=None, help="batches per epoch, whatever the number of "
                    "tracks (default: as many as fit in --time-budget on this machine)")
parser.add_argument("--no-remix", action="store_true", help="train on songs as mixed instead of random remixes "
                    "of vocals and accompaniment from different tracks")
parser.add_argument("--gain", action="store_true", help="random gains (0.25-1.25) per source; measured neutral on "
                    "vocals and 0.35 dB worse on accompaniment on the MUSDB18 previews, so off by default")
parser.add_argument("--no-channel-swap", action="store_true", help="always the left channel instead of a random one")
parser.add_argument("--no-speed", action="store_true", help="no random speed change (each source is otherwise "
                    "played 0.85-1.15 times as fast, pitch and tempo together)")
parser.add_argument("--short-tracks", default="fill", choices=dg.SHORT_TRACKS, help="tracks shorter than a patch: "
                    "followed by further remixes until the patch is full, padded with silence, or repeated to fill it")
# model
parser.add_argument("--n-channels", type=int, default=16, help="first-layer width; layer k has n_channels * 2**k")
parser.add_argument("--dropout", type=float, default=0.5, help="dropout of the first three decoder layers")
parser.add_argument("--input-transform", default="linear", choices=["linear", "log1p"],
                    help="what the network sees of the normalised magnitudes (the mask always scales linear ones)")
# optimiser and schedule
parser.add_argument("--epochs", type=int, default=20, help="maximum number of epochs")
parser.add_argument("--time-budget", type=float, default=30.0, help="minutes the whole run may take, loading and "
                    "validation included: --steps-per-epoch is chosen from the speed measured before training "
                    "(unused when --steps-per-epoch is given)")
parser.add_argument("--batch-size", type=int, default=16, help="patches per step (per process under torchrun)")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of Adam")
parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                    help="cosine: linear warm-up, then cosine decay to lr/10 over all epochs")
parser.add_argument("--warmup-steps", type=int, default=100, help="steps of linear warm-up")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
parser.add_argument("--ema", type=float, default=0.0, help="validate and save an exponential moving average of the "
                    "weights with this decay (e.g. 0.998); 0: the weights as trained")
parser.add_argument("--select", default="sdr", choices=["sdr", "loss"], help="what picks best_model.pth and counts "
                    "for --patience: the validation songs' SDR of the target as inference separates it (BSSEval v4 at "
                    "8192 Hz, median over songs), or the validation loss")
parser.add_argument("--mask-exponents", default="0.4,0.5,0.6,0.8,1", help="after training, best_model.pth is "
                    "calibrated: the exponent of these that gives its masks the best validation SDR is stored in it "
                    "and applied by inference.py ('1': keep the masks as predicted, no calibration)")
parser.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better "
                    "validation score, the one --select names (0: never: the schedule is sized to the run, and the "
                    "score of 14 short validation songs is too noisy to cut it short; README, results)")
# system
parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
parser.add_argument("--seed", type=int, default=0, help="random seed")
parser.add_argument("--workers", type=int, default=None, help="processes that build training batches (remix, "
                    "resample) beside the model step; default 0 on the CPU, where the step needs every core, and up "
                    "to 8 per GPU on CUDA, where one process feeds the GPU only 6 %% of what it can train on (README, "
                    "speed); the batches are the same whatever the number")
parser.add_argument("--no-amp", action="store_true", help="full float32 instead of bf16/fp16 autocast (used on "
                    "CUDA and on CPUs with native bf16)")
args = parser.parse_args()
launched = time.time()  # the time budget counts from here: loading and decoding the data are part of the run


def fail(message):
    sys.exit(f"error: {message}")


for name, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1),
                         ("--n-songs", args.n_songs, 1), ("--steps-per-epoch", args.steps_per_epoch, 1),
                         ("--n-channels", args.n_channels, 1), ("--workers", args.workers, 0)):
    if value is not None and value < low:
        fail(f"{name} must be at least {low}, got {value}")
if args.steps_per_epoch is None and not args.time_budget > 0:
    fail(f"--time-budget must be positive when --steps-per-epoch is not given, got {args.time_budget}")
if not args.lr > 0:
    fail(f"--lr must be positive, got {args.lr}")
if not 0 <= args.dropout < 1:
    fail(f"--dropout must be in [0, 1), got {args.dropout}")
if not 0 <= args.ema < 1:
    fail(f"--ema must be in [0, 1) (0: off), got {args.ema}")
try:
    mask_exponents = sorted({float(p) for p in args.mask_exponents.split(",")})
except ValueError:
    mask_exponents = []
if not mask_exponents or min(mask_exponents) <= 0:
    fail(f"--mask-exponents takes positive numbers separated by commas, got {args.mask_exponents!r}")

# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK; every process trains on its own remixes, rank 0 alone logs and saves

ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
if ddp:
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
master = rank == 0
autocast_dtype = amp_dtype(device, not args.no_amp)
use_amp = autocast_dtype is not None
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
if args.resume and not last_path.exists():
    fail(f"--resume: no {last_path} to resume from (train without --resume first)")

# -----------------------------------------------------------------------------
# data

try:
    evaluate.import_museval()  # every epoch's validation SDR needs it: fail now, not after loading
    source = dg.find_data_source(args.musdb_root, args.download, args.synthetic,
                                 interactive=None if master else False)
    log(f"dataset: {source.describe()}")
    train_tracks = dg.load_tracks(source, "train", args.n_songs, args.cache_dir, args.seed, progress=master)
    valid_tracks = dg.load_tracks(source, "valid", None, args.cache_dir, args.seed, progress=master)
except dg.DataError as e:
    fail(str(e))
if not train_tracks or not valid_tracks:
    fail(f"{source.describe()}: needs training and validation tracks, found {len(train_tracks)} and {len(valid_tracks)}")
augment = dict(remix=not args.no_remix, gain=args.gain, channel_swap=not args.no_channel_swap,
               speed=not args.no_speed, short_tracks=args.short_tracks)
log(f"tracks: {len(train_tracks)} train, {len(valid_tracks)} validation; augmentation: "
    + (", ".join(k for k, v in augment.items() if v is True) or "none")
    + f"; tracks shorter than a patch: {args.short_tracks}")


class TrainingBatches(torch.utils.data.Dataset):
    """Item k: the waveforms of training batch k of this rank, (vocals, accompaniment), each
    (batch, PATCH_SAMPLES). Every batch draws from a random stream of its own, seeded by (seed,
    rank, k): worker processes can build batches in any order, the run is the same with any
    number of them, and --resume needs only the step count. Each rank remixes differently."""

    def __init__(self, n_batches, key=0):
        self.n_batches, self.key = n_batches, key

    def __len__(self):
        return self.n_batches

    def __getitem__(self, k):
        stream = np.random.default_rng([args.seed, rank, self.key, k])
        vocals, accompaniment = dg.training_batch(train_tracks, args.batch_size, stream, **augment)
        return torch.from_numpy(vocals), torch.from_numpy(accompaniment)


def batch_loader(first, last, key=0):
    """Batches first..last-1 in order, built by --workers processes ahead of the step (in this
    process when 0), in pinned memory on CUDA so that the copy overlaps with the GPU's work."""
    return torch.utils.data.DataLoader(
        TrainingBatches(last, key), batch_size=None, sampler=range(first, last), num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None, worker_init_fn=lambda _: torch.set_num_threads(1),
        multiprocessing_context="fork" if args.workers > 0 else None,  # workers inherit the tracks, no pickling
        generator=torch.Generator())  # its seed draw would otherwise shift the global stream dropout uses


def to_spectrograms(vocals, accompaniment):
    """A training batch on the device: (mixture, target) normalised magnitudes (batch, 1, 512, 128).
    Waveforms are cut on the CPU; the STFT runs on the device."""
    return dg.patch_spectrograms(vocals.to(device, non_blocking=True), accompaniment.to(device, non_blocking=True),
                                 args.target)


if args.steps_per_epoch is None and not args.resume and time.time() - launched > args.time_budget * 60:
    fail(f"--time-budget {args.time_budget:g} min: loading the data alone took {time.time() - launched:.0f} s; "
         f"give more minutes or a fixed --steps-per-epoch")
if master:  # only now that the data is there: a failed start leaves no empty folders behind
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--checkpoint-dir {checkpoint_dir}: cannot create it ({e.strerror})")

# -----------------------------------------------------------------------------
# model and optimiser: fresh, or resumed with everything needed to continue exactly

torch.manual_seed(args.seed)
random.seed(args.seed)
model_config = UNetConfig(n_channels=args.n_channels, dropout=args.dropout, input_transform=args.input_transform)
start_epoch, step, best_val_loss, best_val_sdr, bad_epochs, history = 0, 0, float("inf"), float("-inf"), 0, []
checkpoint = None
if args.resume:
    checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
    model_config = UNetConfig(**checkpoint["model_config"])
    if checkpoint.get("target", "vocals") != args.target:
        fail(f"--resume: {last_path} was trained with --target {checkpoint['target']}, not {args.target}")
# channels-last: oneDNN's convolutions run 15-20 % faster on it (README, speed)
model = UNet(model_config).to(device, memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # bf16 needs no scaling
if checkpoint is not None:
    model.load_state_dict(checkpoint.get("train_model", checkpoint["model"]))  # "model" holds the average under --ema
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    start_epoch, step = checkpoint["epoch"], checkpoint["step"]
    best_val_loss, bad_epochs, history = checkpoint["best_val_loss"], checkpoint["bad_epochs"], checkpoint["history"]
    best_val_sdr = checkpoint.get("best_val_sdr", float("-inf"))
    torch.set_rng_state(checkpoint["torch_rng"])
    if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    log(f"resuming from {last_path}: epoch {start_epoch + 1}, step {step}, best validation loss {best_val_loss:.4f}, "
        f"SDR {best_val_sdr:.2f} dB")
log(f"model: U-Net, n_channels={model_config.n_channels}, {model.get_num_params():,} parameters, on {device}"
    + (f" x {world_size} processes" if ddp else "") + (f", autocast {autocast_dtype}" if use_amp else ""))
raw_model = model
# the weights that are validated and saved: an exponential moving average of the trained ones when --ema
eval_model = copy.deepcopy(raw_model) if args.ema > 0 else raw_model
if checkpoint is not None and args.ema > 0:
    eval_model.load_state_dict(checkpoint["model"])


@torch.no_grad()
def update_ema():
    """Move the averaged weights towards the trained ones; the decay ramps up over the first steps
    so that the random initialisation is forgotten quickly."""
    decay = min(args.ema, (1 + step) / (10 + step))
    for averaged, trained in zip(eval_model.state_dict().values(), raw_model.state_dict().values()):
        if averaged.is_floating_point():
            averaged.lerp_(trained, 1 - decay)
        else:
            averaged.copy_(trained)  # BatchNorm's batch counter


if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_step(model, optimizer, scaler, mixture, target):
    """One Adam step on the L1,1 loss between the masked mixture and the target, both
    (batch, 1, 512, 128) normalised magnitudes. Returns the loss tensor."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
        mask = model(mixture)
    loss = (mask.float() * mixture - target).abs().mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

# -----------------------------------------------------------------------------
# validation: the L1,1 loss on every patch of the validation songs as mixed

@torch.no_grad()
def estimate_val_loss():
    """(loss, mask mean, mask std) over the validation patches, shared out between ranks."""
    eval_model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # |error|, mask, mask^2, elements
    for i, track in enumerate(valid_tracks):
        if i % world_size != rank:
            continue
        mixture, target = dg.validation_patches(track, args.target)
        for j in range(0, mixture.shape[0], args.batch_size):
            x, y = mixture[j:j + args.batch_size].to(device), target[j:j + args.batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
                mask = eval_model(x).float()
            sums += torch.stack([(mask * x - y).abs().sum(), mask.sum(), mask.square().sum(),
                                 torch.tensor(float(mask.numel()), device=device)]).double()
    if ddp:
        dist.all_reduce(sums)
    eval_model.train()
    loss, mean = (sums[0] / sums[3]).item(), (sums[1] / sums[3]).item()
    return loss, mean, math.sqrt(max(0.0, (sums[2] / sums[3]).item() - mean ** 2))


@torch.no_grad()
def estimate_val_sdr(exponent=1.0):
    """(median, per-song list) of the target's SDR in dB over the validation songs as mixed, each
    separated by inference's separator at 8192 Hz and scored like evaluate.py (BSSEval v4, median
    over 1 s frames). This is what evaluate.py reports at the songs' own rate (it agreed within
    0.05 dB on the previews) for the cost of a validation loss, and a steadier judge of checkpoints
    than the L1 loss on a few short songs. exponent: the masks are raised to it. Songs are
    shared out between ranks."""
    eval_model.eval()
    mask_fn = inference.model_mask_fn(eval_model, device, args.batch_size, amp=use_amp, exponent=exponent)
    scores = torch.zeros(len(valid_tracks), dtype=torch.float64, device=device)
    for i, track in enumerate(valid_tracks):
        if i % world_size != rank:
            continue
        stems = inference.separate(np.array(track.mixture), dg.SAMPLE_RATE, mask_fn, target=args.target)
        estimate = stems[dg.STEMS.index(args.target)]
        scores[i] = evaluate.target_sdr(track.stem(args.target), estimate, dg.SAMPLE_RATE)
    if ddp:
        dist.all_reduce(scores)  # every song was scored by exactly one rank
    eval_model.train()
    per_song = scores.cpu().tolist()
    return float(np.nanmedian(per_song)), per_song  # nan: a song whose target is silent throughout


def validate():
    """Every validation figure of the current model, for the log and the history."""
    val_loss, mask_mean, mask_std = estimate_val_loss()
    val_sdr, val_sdr_songs = estimate_val_sdr()
    return dict(val_loss=val_loss, val_sdr=val_sdr, mask_mean=mask_mean, mask_std=mask_std, val_sdr_songs=val_sdr_songs)


def fit_mask_exponent():
    """Calibrate best_model.pth: the exponent p for which the masks M**p give the validation
    songs the highest median SDR, stored in the checkpoint as mask_exponent (inference.py and
    evaluate.py apply it). The L1,1 loss makes the mask cautious where the network is unsure,
    as a median is; SDR rewards fuller masks (exponents 0.4-0.6 gained 0.4-0.6 dB on the
    previews; README, results). Every rank takes part; rank 0 writes. Returns {p: SDR}; with a
    single exponent there is nothing to choose, and it is stored unscored."""
    if len(mask_exponents) == 1:
        exponent, scores = mask_exponents[0], {mask_exponents[0]: float("nan")}
    else:
        scores = score_mask_exponents()
        finite = {p: s for p, s in scores.items() if np.isfinite(s)}  # nan: no validation song has the target
        exponent = max(finite, key=finite.get) if finite else 1.0
    if master:
        best = torch.load(best_path, map_location="cpu", weights_only=False)
        best.update(mask_exponent=exponent, mask_exponent_sdr=scores)
        write_checkpoint(best_path, best)
    return exponent, scores


def score_mask_exponents():
    """{p: validation SDR of best_model.pth with its masks raised to p} for every --mask-exponents."""
    state = [torch.load(best_path, map_location="cpu", weights_only=False)["model"] if master else None]
    if ddp:
        dist.broadcast_object_list(state, src=0)
    eval_model.load_state_dict(state[0])  # training is over: the best weights replace the last
    return {p: estimate_val_sdr(p)[0] for p in mask_exponents}


def log_separations(epoch, n_tracks=2, seconds=10):
    """TensorBoard pictures (mixture, predicted mask, vocals) and audio of the vocals the current
    model separates from the first validation songs, through inference's separator."""
    eval_model.eval()
    mask_fn = inference.model_mask_fn(eval_model, device, amp=use_amp)
    for i, track in enumerate(valid_tracks[:n_tracks]):
        mixture = np.array(track.mixture[:1, :seconds * dg.SAMPLE_RATE])
        vocals, _, mask = inference.separate(mixture, dg.SAMPLE_RATE, mask_fn, target=args.target, return_mask=True)
        writer.add_figure(f"separation/{i}", inference.separation_figure(mixture, mask, track.name), epoch)
        peak = max(1.0, float(np.abs(mixture).max()))  # TensorBoard clips audio at +-1
        writer.add_audio(f"separation/{i}_vocals", torch.from_numpy(vocals[0] / peak), epoch, sample_rate=dg.SAMPLE_RATE)
        if epoch == 0:
            writer.add_audio(f"separation/{i}_mixture", torch.from_numpy(mixture[0] / peak), epoch,
                             sample_rate=dg.SAMPLE_RATE)
    eval_model.train()


def save(path, epoch, resumable):
    """last.pth carries what --resume needs (optimiser, trained weights under --ema, RNG states);
    best_model.pth, the file users keep and share, only the model and its record (40 MB, not 118)."""
    extra = {}
    if resumable:
        extra = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        if args.ema > 0:
            extra["train_model"] = raw_model.state_dict()
    save_checkpoint(path, eval_model, dg.SPEC_CONFIG, args.target, args=vars(args), epoch=epoch, step=step,
                    best_val_loss=best_val_loss, best_val_sdr=best_val_sdr, bad_epochs=bad_epochs, history=history,
                    dataset=source.describe(), **extra)


# -----------------------------------------------------------------------------
# the loop

writer = None
if master:
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(checkpoint_dir / "logs"))
from tqdm import tqdm

if start_epoch >= args.epochs:
    log(f"nothing to do: {last_path} already finished epoch {start_epoch} of --epochs {args.epochs}")
if not args.resume:
    val = validate()
    log(f"before training: validation loss {val['val_loss']:.4f}, SDR {val['val_sdr']:.2f} dB, "
        f"mask mean {val['mask_mean']:.3f} std {val['mask_std']:.3f}")
    t0 = time.time()
    if master:
        writer.add_scalar("val/loss", val["val_loss"], 0)
        writer.add_scalar("val/sdr", val["val_sdr"], 0)
        log_separations(0)
    logging_seconds = agree(time.time() - t0)

# -----------------------------------------------------------------------------
# time budget: unless --steps-per-epoch is given, as many steps as fit in --time-budget minutes


def seconds_per_step(n_steps=8, n_untimed=2):
    """Seconds one training step (batch and Adam step) takes here, timed on throwaway copies of
    the model and optimiser with batches of their own (key 1): the run itself, RNG streams
    included, is exactly what it would be with the resulting --steps-per-epoch."""
    torch_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    trial_model = copy.deepcopy(raw_model)
    trial_optimizer = torch.optim.Adam(trial_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    trial_scaler = torch.amp.GradScaler(device.type, enabled=scaler.is_enabled())
    for i, batch in enumerate(batch_loader(0, n_untimed + n_steps, key=1)):
        if i == n_untimed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.time()
        train_step(trial_model, trial_optimizer, trial_scaler, *to_spectrograms(*batch)).item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.time() - t0) / n_steps
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    del trial_model, trial_optimizer
    return seconds


BUDGET_MARGIN = 0.03  # of the budget, kept free for what the plan cannot time (saving, the last log lines)
by_budget = args.steps_per_epoch is None
if by_budget and checkpoint is not None:  # a resumed run keeps the plan it started with
    args.steps_per_epoch = checkpoint["args"]["steps_per_epoch"]
    by_budget = False
elif by_budget:
    t0 = time.time()  # validation again, timed without the first call's one-off costs (imports, kernel selection)
    estimate_val_loss()
    t1 = time.time()
    estimate_val_sdr()
    validation_seconds = agree(time.time() - t0) + logging_seconds  # what each epoch adds to its steps
    calibration_seconds = len(mask_exponents) * agree(time.time() - t1) if len(mask_exponents) > 1 else 0
    step_seconds = agree(seconds_per_step())
    elapsed = agree(time.time() - launched)
    left = args.time_budget * 60 * (1 - BUDGET_MARGIN) - elapsed - calibration_seconds
    args.steps_per_epoch = int((left / args.epochs - validation_seconds) / step_seconds)
    if args.steps_per_epoch < 1:
        fail(f"--time-budget {args.time_budget:g} min is too short here: loading took {elapsed:.0f} s, a training step "
             f"takes {step_seconds:.2f} s and a validation {validation_seconds:.0f} s; give more minutes or fewer --epochs")
    planned = elapsed + args.epochs * (args.steps_per_epoch * step_seconds + validation_seconds) + calibration_seconds
    log(f"time budget {args.time_budget:g} min: {step_seconds:.2f} s a step, {validation_seconds:.1f} s a validation, "
        f"{elapsed:.0f} s so far -> {args.epochs} epochs x {args.steps_per_epoch} steps "
        f"({args.epochs * args.steps_per_epoch * args.batch_size:,} patches), planned to end after "
        f"{planned / 60:.1f} min (the same run: --steps-per-epoch {args.steps_per_epoch})")

# -----------------------------------------------------------------------------
# learning-rate schedule

total_steps = args.epochs * args.steps_per_epoch
warmup_steps = min(args.warmup_steps, total_steps // 5)  # short runs must not spend most steps warming up


def get_lr(it):
    """Linear warm-up, then cosine decay to lr / 10 at the last planned step."""
    if args.lr_schedule == "constant":
        return args.lr
    if it < warmup_steps:
        return args.lr * (it + 1) / warmup_steps
    progress = min(1.0, (it - warmup_steps) / max(1, total_steps - warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


started = time.time()
interrupted = False


def on_ctrl_c(signum, frame):
    """First Ctrl-C: stop after the current step. Raising KeyboardInterrupt at whatever bytecode
    the signal lands on can hit a __del__, where Python prints and swallows it and training goes
    on; a second Ctrl-C still stops at once."""
    global interrupted
    if interrupted:
        raise KeyboardInterrupt
    interrupted = True


if not ddp:  # under torchrun every rank gets the signal and must not stop at different steps
    signal.signal(signal.SIGINT, on_ctrl_c)
epoch = start_epoch
batches = iter(batch_loader(step, total_steps))
try:
    for epoch in range(start_epoch, args.epochs):
        model.train()
        running, t0 = 0.0, time.time()
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master,
                   unit="step", leave=False)
        for _ in bar:
            lr = get_lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(model, optimizer, scaler, *to_spectrograms(*next(batches)))
            step += 1
            if interrupted:
                raise KeyboardInterrupt
            if args.ema > 0:
                update_ema()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
            if master and step % 10 == 0:  # per-step curve, thinned
                writer.add_scalar("train/loss_step", loss.item(), step)
        train_loss = running / args.steps_per_epoch
        t_val = time.time()
        val = validate()
        val["validation_seconds"] = time.time() - t_val
        if args.select == "sdr":  # the first epoch always counts: its SDR is nan when no song has the target
            improved = val["val_sdr"] > best_val_sdr or best_val_sdr == float("-inf")
        else:
            improved = val["val_loss"] < best_val_loss
        bad_epochs = 0 if improved else bad_epochs + 1
        if improved:
            best_val_loss, best_val_sdr = val["val_loss"], val["val_sdr"]
        history.append(dict(epoch=epoch + 1, step=step, train_loss=train_loss, **val, lr=lr, seconds=time.time() - t0))
        if master:
            writer.add_scalar("train/loss", train_loss, epoch + 1)
            writer.add_scalar("val/loss", val["val_loss"], epoch + 1)
            writer.add_scalar("val/sdr", val["val_sdr"], epoch + 1)
            writer.add_scalar("val/mask_mean", val["mask_mean"], epoch + 1)
            writer.add_scalar("val/mask_std", val["mask_std"], epoch + 1)
            writer.add_scalar("train/lr", lr, epoch + 1)
            log_separations(epoch + 1)
            writer.flush()
            if improved:
                save(best_path, epoch + 1, resumable=False)
            save(last_path, epoch + 1, resumable=True)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, "
            f"val SDR {val['val_sdr']:.2f} dB{' (best)' if improved else ''}, mask mean {val['mask_mean']:.3f} "
            f"std {val['mask_std']:.3f}, lr {lr:.1e}, {time.time() - t0:.0f} s")
        if interrupted:  # Ctrl-C during validation: this epoch is complete and saved, stop here
            raise KeyboardInterrupt
        if by_budget and epoch + 1 < args.epochs and \
                agree(time.time() - launched + time.time() - t0) > args.time_budget * 60:
            log(f"time budget: the next epoch would end after {args.time_budget:g} min (the machine got slower "
                f"than measured at the start); stopping after epoch {epoch + 1}")
            break
        if args.patience and bad_epochs >= args.patience:
            log(f"early stop: no better validation {args.select} for {bad_epochs} epochs")
            break
except KeyboardInterrupt:
    log(f"\ninterrupted in epoch {epoch + 1}; the last completed epoch is in {last_path} "
        f"(continue with --resume), the best model so far in {best_path} (its mask exponent is fitted "
        f"when a run finishes)")
    if ddp:
        dist.destroy_process_group()
    sys.exit(130)
if ddp:  # DDP keeps replicas in step by averaging gradients; check that it did
    checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    log(f"DDP: weights {'identical' if identical else 'DIFFERENT'} across {world_size} ranks "
        f"(parameter sums {', '.join(f'{g.item():.6f}' for g in gathered)})")
exponent, scores = fit_mask_exponent()
if len(scores) > 1:
    log(f"mask exponent for {best_path}: {exponent:g} (validation SDR "
        + ", ".join(f"{s:.2f} dB at {p:g}" for p, s in scores.items()) + ")")
log(f"done in {time.time() - started:.0f} s: best by validation {args.select}: SDR {best_val_sdr:.2f} dB with the "
    f"masks as predicted" + (f", {scores[exponent]:.2f} dB with mask exponent {exponent:g}" if len(scores) > 1 else "")
    + f", loss {best_val_loss:.4f}; best model {best_path}, last {last_path}, logs {checkpoint_dir / 'logs'}")
if writer is not None:
    writer.close()
if ddp:
    dist.destroy_process_group()
