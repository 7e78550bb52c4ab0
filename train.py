"""
Train the U-Net singing-voice separator.

    python train.py                    # 20 epochs on 10 songs; prints its plan first
    python train.py --epochs 2         # start small to test quickly
    python train.py --musdb-root ../shared/data/MUSDB18-7 --stems ../shared/data/MIR-1K --n-songs 94   # the recipe
    torchrun --standalone --nproc_per_node=4 train.py --musdb-root MUSDB18/musdb18

main() reads top to bottom: settings -> processes (torchrun) -> data -> the plan -> model, its running average and
the optimiser -> the loop, which validates after every epoch and saves last.pth and best_model.pth (best validation
SDR) to --checkpoint-dir, TensorBoard logs to <checkpoint-dir>/logs. Where the run stands (TrainState) is what a
checkpoint records beside the weights and what --resume reads back. An epoch is the same training on every machine:
one pass over the training audio at the patch overlap, at least MIN_STEPS_PER_EPOCH steps; --time-budget MIN instead
sizes the epochs so that the run takes about MIN minutes here.
"""
import argparse
import copy
import itertools
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data_generator as dg
import datasets
import separator
from scores import target_sdr
from unet_model import UNet, UNetConfig, amp_dtype, load_model, masked_l1_loss, read_checkpoint, save_checkpoint, \
    stored_config, train_step
from utils import CheckpointError, Parser, add_device_arg, choose_device, fail, run_cli

# An epoch ends with a validation, which costs as much as many training steps. On a few short songs (the
# synthetic set, the MUSDB18 previews) one pass is only a handful of steps: so an epoch is at least this many.
MIN_STEPS_PER_EPOCH = 32
# Adam's first updates, taken before its moment estimates settle, can throw a freshly initialised
# network far off; the learning rate rises linearly over these steps (at most a fifth of the run).
WARMUP_STEPS = 100
BUDGET_MARGIN = 0.03  # of --time-budget, kept free for what the plan cannot time (saving, the last log lines)


# settings --------------------------------------------------------------------------------------------------------

def stem_weights(text):
    """One source's --source-weights: 'W' (vocals and accompaniment alike) or 'V:A' -> (V, A)."""
    try:
        values = tuple(float(part) for part in text.split(":"))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not W or V:A (numbers)")
    return values * (3 - len(values))


def parse_args(argv=None):
    parser = Parser("Train the U-Net singing-voice separator (Jansson et al. 2017).")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="best_model.pth, last.pth and logs/ go here")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pth")
    datasets.add_data_args(parser, training=True)
    parser.add_argument("--source-weights", type=stem_weights, nargs="+", default=None, metavar="W|V:A", help="how "
                        "often each source lends a remix's vocals and, apart, its accompaniment, one W (both) or V:A "
                        "per source: MUSDB18 first, then each --stems. None: with MUSDB18 1 1:0 (the stems folders "
                        "lend vocals only), without it all equal")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT", help="start from this model's weights "
                        "(fine-tuning: fresh optimiser and schedule)")
    parser.add_argument("--target", default="vocals", choices=dg.STEMS, help="source the mask extracts "
                        "(accompaniment: the original material's instrumental model)")
    parser.add_argument("--n-channels", type=int, default=16, help="first-layer width; layer k has n_channels * 2**k")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training audio (see the printed plan)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="size the epochs so that the "
                        "whole run, loading and validation included, takes about MIN minutes on this machine")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per step (per process under torchrun)")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of Adam (warm-up, cosine to 0)")
    add_device_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workers", type=int, default=None, help="processes building batches beside the step (same "
                        "batches whatever the number); default 0 on the CPU, where the step needs every core, up to 8 "
                        "per GPU")
    args = parser.parse_args(argv)
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
    return args


# this process's place in the run ---------------------------------------------------------------------------------

@dataclass
class Processes:
    """One process, or one of torchrun's (RANK in the environment): every rank trains on its own remixes, rank 0
    alone logs and saves."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    ddp: bool = False

    @property
    def master(self):
        return self.rank == 0

    def log(self, message):
        if self.master:
            print(message, flush=True)

    def agree(self, value):
        """The largest of the ranks' values, so that every rank plans the same run."""
        if not self.ddp:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()


def start_processes(args):
    """The Processes of this run, with torch.distributed started under torchrun; resolves --workers."""
    device = choose_device(args.cpu)
    procs = Processes(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(device)
        procs = Processes(device, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), ddp=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    can_fork = "fork" in torch.multiprocessing.get_all_start_methods()  # not on Windows
    if args.workers is None:
        per_gpu = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = max(0, min(8, per_gpu - 1)) if device.type == "cuda" and can_fork else 0
    elif args.workers > 0 and not can_fork:
        fail("--workers needs processes started by fork, which this system does not have; use --workers 0")
    return procs


# the units: where the run stands, the learning rate, the running average, the time budget -----------------------

@dataclass
class TrainState:
    """Where the run stands and what it has recorded: what a checkpoint saves beside the weights (save_run) and
    --resume reads back (TrainState.of). epoch: epochs completed; step: training steps taken."""
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    warmup_steps: int = 0
    best_val_loss: float = float("inf")
    best_val_sdr: float = float("-inf")
    history: list = field(default_factory=list)

    @classmethod
    def of(cls, checkpoint):
        state = cls(**{k: checkpoint[k] for k in ("epoch", "step", "best_val_loss", "best_val_sdr", "history")})
        state.steps_per_epoch = checkpoint.get("steps_per_epoch") or checkpoint["args"]["steps_per_epoch"]
        state.warmup_steps = checkpoint.get("warmup_steps")  # None: a checkpoint from before it was saved
        return state


def learning_rate(step, peak, warmup_steps, total_steps):
    """Linear warm-up to `peak`, then cosine decay to 0 at the last step, so that the weights of the last epochs
    settle rather than keep moving at a tenth of the peak rate."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class RunningAverage:
    """The model that is validated and saved: an exponential moving average of the trained weights (and BatchNorm
    statistics). Each small batch moves the trained weights a little at random, and that noise made the validation
    SDR and the mask's mean swing from epoch to epoch. It stays in eval mode."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        """Move towards model's weights after `step` steps: the decay (1 + step) / (10 + step) grows with the run, so
        the average spans roughly the last tenth of the steps so far, and early on follows the fast learning."""
        decay = (1 + step) / (10 + step)
        for mean, value in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mean.is_floating_point():
                mean.lerp_(value, 1 - decay)
            else:  # BatchNorm's count of batches
                mean.copy_(value)


def steps_to_fill(seconds, epochs, step_seconds, epoch_seconds):
    """Steps per epoch for `epochs` epochs to fill `seconds`, each epoch also costing epoch_seconds beside its
    steps (validation, logs); less than 1 when not even one step fits."""
    return int((seconds / epochs - epoch_seconds) / step_seconds)


# data --------------------------------------------------------------------------------------------------------------

@dataclass
class Data:
    """The run's songs: the training tracks by source, the validation tracks, and how often each source lends
    each stem, (n_sources, 2)."""
    source: datasets.DataSource
    train: list
    valid: list
    weights: np.ndarray


def load_data(args, procs):
    source = datasets.find_data_source(args.musdb_root, args.download, args.synthetic,
                                       interactive=None if procs.master else False, stems=args.stems)
    procs.log(f"dataset: {source.describe()}")
    train = datasets.training_sources(source, args.n_songs, args.cache_dir, args.seed, progress=procs.master)
    valid = datasets.load_tracks(source, "valid", None, args.cache_dir, args.seed, progress=procs.master)
    if not all(train) or not valid:
        fail(f"{source.describe()}: needs training tracks in every source and validation tracks, found "
             f"{' + '.join(str(len(tracks)) for tracks in train)} and {len(valid)}")
    weights = np.array(args.source_weights or dg.default_weights(source, len(train)))
    if len(weights) != len(train):
        fail(f"--source-weights: {len(weights)} given for {len(train)} sources (MUSDB18 or the synthetic set, then "
             f"each --stems)")
    procs.log(f"tracks: {' + '.join(str(len(tracks)) for tracks in train)} train, {len(valid)} validation; "
              f"each patch a random remix of them")
    if len(train) > 1:
        gains = "; ".join(f"vocals x{t[0].gains[0]:.2f}, accompaniment x{t[0].gains[1]:.2f}" for t in train[1:])
        procs.log(f"{dg.describe_weights(weights)}; the other sources' stems scaled to the first's levels ({gains})")
    if source.kind == "stems":
        procs.log(f"validation: the held-apart tracks of the stems folders, {valid[0].name} ... {valid[-1].name} "
                  f"(never trained on)")
    return Data(source, train, valid, weights)


class TrainingBatches(torch.utils.data.Dataset):
    """Item k: training batch k of this rank, (vocals, accompaniment) each (batch, PATCH_SAMPLES), from a random
    stream seeded by (seed, rank, key, k): workers can build batches in any order, the run is the same with any
    number of them, and --resume needs only the step count. (No __len__: the loader's sampler says which k.)"""

    def __init__(self, data, batch_size, seed, rank, key=0):
        self.data, self.batch_size, self.seed, self.rank, self.key = data, batch_size, seed, rank, key

    def __getitem__(self, k):
        stream = np.random.default_rng([self.seed, self.rank, self.key, k])
        vocals, accompaniment = dg.training_batch(self.data.train, self.batch_size, stream, self.data.weights)
        return torch.from_numpy(vocals), torch.from_numpy(accompaniment)


def batch_loader(data, args, procs, first, key=0):
    """Batches first, first + 1, ... in order, built by --workers processes ahead of the step (here when 0); endless,
    since a --time-budget run resizes its epochs as it goes."""
    return torch.utils.data.DataLoader(
        TrainingBatches(data, args.batch_size, args.seed, procs.rank, key), batch_size=None,
        sampler=itertools.count(first), num_workers=args.workers, pin_memory=procs.device.type == "cuda",
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None,
        worker_init_fn=lambda _: torch.set_num_threads(1),
        multiprocessing_context="fork" if args.workers > 0 else None,  # workers inherit the tracks, no pickling
        generator=torch.Generator())  # its seed draw would otherwise shift the global stream dropout uses


def one_pass(data, args, procs):
    """(steps per epoch, patches, frames) of one pass over the training audio at the patch hop, in batches
    of every rank, at least MIN_STEPS_PER_EPOCH; frames per song (a patch takes one channel)."""
    frames = sum(dg.n_frames(track.vocals.shape[1]) for tracks in data.train for track in tracks)
    patches = math.ceil(frames / dg.patch_hop(0.5))
    return max(MIN_STEPS_PER_EPOCH, math.ceil(patches / (args.batch_size * procs.world_size))), patches, frames


def describe_plan(args, procs, steps_per_epoch):
    patches = args.epochs * steps_per_epoch * args.batch_size * procs.world_size
    return (f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size * procs.world_size} patches "
            f"({patches:,} patches)")


# checkpoints: the model, its record and what --resume needs, written and read here ---------------------------------

def read_checkpoints(args):
    """(last.pth of --resume, weights of --init), each None unless asked for; checked before the data are loaded, so
    that a wrong checkpoint fails in seconds. Checkpoints are data: one that would run code is refused."""
    resumed = init = None
    try:
        if args.resume:
            last = Path(args.checkpoint_dir) / "last.pth"
            resumed = read_checkpoint(last)
            stored_config(resumed, last)
            if resumed.get("target", "vocals") != args.target:
                fail(f"--resume: {last} was trained with --target {resumed['target']}, not {args.target}")
    except CheckpointError as e:
        fail(f"--resume: {e}")
    if args.init is not None:
        try:
            model, checkpoint = load_model(args.init, expected_spec=dg.SPEC_CONFIG)
        except CheckpointError as e:
            fail(f"--init: {e}")
        if model.config.n_channels != args.n_channels:
            fail(f"--init {args.init}: a model of --n-channels {model.config.n_channels}, this run's is "
                 f"{args.n_channels}; give --n-channels {model.config.n_channels}")
        if checkpoint.get("target", "vocals") != args.target:
            fail(f"--init {args.init}: trained with --target {checkpoint['target']}, not {args.target}")
        init = model.state_dict()
    return resumed, init


def save_run(path, run, resumable):
    """Tensors and plain values: best_model.pth the averaged model and its record, last.pth also what --resume needs
    (the trained weights among it)."""
    cuda_rng = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    extra = dict(trained_model=run.network.state_dict(), optimizer=run.optimizer.state_dict(), cuda_rng=cuda_rng,
                 scaler=run.scaler.state_dict(), torch_rng=torch.get_rng_state()) if resumable else {}
    save_checkpoint(path, run.average.model, dg.SPEC_CONFIG, run.args.target, args=vars(run.args),
                    dataset=run.data.source.describe(), **asdict(run.state), **extra)


def resume_run(run, checkpoint):
    """Everything save_run wrote into last.pth back into the run, so that it continues exactly."""
    run.network.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))  # absent: before the average
    run.average.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["torch_rng"])
    if run.device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], run.device)
    run.state = TrainState.of(checkpoint)


# the run: the model, its average and optimiser, and what validation and the loop do with them ----------------------

class Run:
    """The model being trained (`network`; `model` is its DDP wrapper under torchrun), its RunningAverage, the
    optimiser and loss scaler, the TrainState, and the data and settings they work with."""

    def __init__(self, args, procs, data, model_config, init_weights=None):
        self.args, self.procs, self.data, self.device = args, procs, data, procs.device
        self.autocast_dtype = amp_dtype(self.device)  # bf16 on CUDA and on CPUs with native bf16, else float32
        torch.manual_seed(args.seed)
        self.network = UNet(model_config).to(self.device, memory_format=torch.channels_last)  # faster oneDNN
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=args.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        if init_weights is not None:
            self.network.load_state_dict(init_weights)
        self.average, self.state, self.writer = RunningAverage(self.network), TrainState(), None
        self.model = self.network

    def start(self, resumed):
        """Resume from last.pth (or not), wrap the network for DDP, open the logs; returns the model's line."""
        if resumed is not None:
            resume_run(self, resumed)
        if self.procs.ddp:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.procs.master:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(self.args.checkpoint_dir) / "logs"))
        return (f"model: U-Net, n_channels={self.network.config.n_channels}, {self.network.get_num_params():,} "
                f"parameters, on {self.device}" + (f" x {self.procs.world_size} processes" if self.procs.ddp else "")
                + (f", autocast {self.autocast_dtype}" if self.autocast_dtype else ""))

    def step(self, batch, lr):
        """One training step on a batch of (vocals, accompaniment) waveforms; the average follows. -> loss"""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        vocals, accompaniment = (x.to(self.device, non_blocking=True) for x in batch)
        mixture, target = dg.patch_spectrograms(vocals, accompaniment, self.args.target)
        loss = train_step(self.model, self.optimizer, self.scaler, mixture, target, self.autocast_dtype).item()
        self.state.step += 1
        self.average.update(self.network, self.state.step)
        return loss

    @torch.no_grad()
    def validation_loss(self):
        """(loss, mask mean, mask std) over every patch of the validation songs as mixed, shared out between ranks."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss x elements, mask, mask^2, elements
        for track in self.data.valid[self.procs.rank::self.procs.world_size]:
            mixture, target = dg.validation_patches(track, self.args.target)
            for j in range(0, mixture.shape[0], self.args.batch_size):
                x = mixture[j:j + self.args.batch_size].to(self.device)
                y = target[j:j + self.args.batch_size].to(self.device)
                with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    mask = self.average.model(x).float()
                n = float(mask.numel())
                sums += torch.stack([masked_l1_loss(mask, x, y) * n, mask.sum(), mask.square().sum(),
                                     torch.tensor(n, device=self.device)]).double()
        if self.procs.ddp:
            dist.all_reduce(sums)
        loss, mean = (sums[0] / sums[3]).item(), (sums[1] / sums[3]).item()
        return loss, mean, math.sqrt(max(0.0, (sums[2] / sums[3]).item() - mean ** 2))

    @torch.no_grad()
    def validation_sdr(self):
        """(median, mean, per-song list) of the target's SDR (dB) on the validation songs, separated by the separator
        at 8192 Hz and scored as evaluate.py scores (BSSEval v4): a steadier judge than the loss."""
        mask_fn = separator.model_mask_fn(self.average.model, self.device, self.args.batch_size)
        scores = torch.zeros(len(self.data.valid), dtype=torch.float64, device=self.device)
        for i, track in list(enumerate(self.data.valid))[self.procs.rank::self.procs.world_size]:
            stems = separator.separate(np.array(track.mixture), dg.SAMPLE_RATE, mask_fn, target=self.args.target)
            scores[i] = target_sdr(getattr(track, self.args.target), stems[dg.STEMS.index(self.args.target)],
                                   dg.SAMPLE_RATE)
        if self.procs.ddp:
            dist.all_reduce(scores)  # every song was scored by exactly one rank
        per_song = scores.cpu().tolist()  # nan: a song whose target is silent throughout
        if np.isnan(per_song).all():
            return float("nan"), float("nan"), per_song
        # the median (museval's statistic, and the one that selects) moves with whichever songs sit in the middle;
        # the mean of the songs is printed beside it as the steadier figure
        return float(np.nanmedian(per_song)), float(np.nanmean(per_song)), per_song

    def validate(self):
        """Every validation figure of the averaged model, as plain floats for the log and the history."""
        val_loss, mask_mean, mask_std = self.validation_loss()
        val_sdr, val_sdr_mean, val_sdr_songs = self.validation_sdr()  # DataError: what scoring needs is missing
        return dict(val_loss=val_loss, val_sdr=val_sdr, val_sdr_mean=val_sdr_mean, mask_mean=mask_mean,
                    mask_std=mask_std, val_sdr_songs=val_sdr_songs)

    def log_validation(self, epoch, val, train_loss=None, lr=None):
        """TensorBoard: the validation scalars, and pictures (mixture, mask, vocals) and audio of the first two
        validation songs' separations."""
        scalars = dict(train_loss=train_loss, val_loss=val["val_loss"], val_sdr=val["val_sdr"],
                       val_sdr_mean=val["val_sdr_mean"], val_mask_mean=val["mask_mean"], val_mask_std=val["mask_std"],
                       train_lr=lr)
        names = ("val_loss", "val_sdr", "val_sdr_mean") if train_loss is None else scalars
        for name in names:
            self.writer.add_scalar(name.replace("_", "/", 1), scalars[name], epoch)
        mask_fn = separator.model_mask_fn(self.average.model, self.device)
        for i, track in enumerate(self.data.valid[:2]):
            mixture = np.array(track.mixture[:1, :10 * dg.SAMPLE_RATE])
            (vocals, _), mask = separator.separate(mixture, dg.SAMPLE_RATE, mask_fn, target=self.args.target,
                                                   return_mask=True)
            self.writer.add_figure(f"separation/{i}", separator.separation_figure(mixture, mask, track.name), epoch)
            peak = max(1.0, float(np.abs(mixture).max()))  # TensorBoard clips audio at +-1
            for name, sound in (("vocals", vocals), ("mixture", mixture))[:1 if epoch else 2]:
                self.writer.add_audio(f"separation/{i}_{name}", torch.from_numpy(sound[0] / peak), epoch,
                                      sample_rate=dg.SAMPLE_RATE)
        self.writer.flush()

    def seconds_per_step(self, n_steps=8, n_untimed=2):
        """Seconds a training step takes here, timed on throwaway copies of the model and optimiser with batches
        of their own (key 1): the run itself, RNG streams included, is not changed. (.item() waits, also on CUDA.)"""
        model = copy.deepcopy(self.network)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.args.lr)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.scaler.is_enabled())
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):  # dropout's stream
            loader = batch_loader(self.data, self.args, self.procs, 0, key=1)
            for i, (vocals, accompaniment) in enumerate(itertools.islice(loader, n_untimed + n_steps)):
                if i == n_untimed:
                    t0 = time.time()
                spectrograms = dg.patch_spectrograms(vocals.to(self.device), accompaniment.to(self.device),
                                                     self.args.target)
                train_step(model, optimizer, scaler, *spectrograms, self.autocast_dtype).item()
        return (time.time() - t0) / n_steps


# the plan: steps per epoch, fixed or sized to --time-budget ------------------------------------------------------

def fixed_plan(args, procs, data, resumed, launched):
    """Steps per epoch of a run that is not sized by the clock: one pass over the training audio, or, resumed, as
    last.pth planned them. None: a --time-budget run, whose epochs are sized once a step has been timed."""
    if resumed is not None:
        steps = resumed.get("steps_per_epoch") or resumed["args"]["steps_per_epoch"]
        procs.log(f"plan: {max(0, args.epochs - resumed['epoch'])} epoch(s) left of --epochs {args.epochs}, each "
                  f"{steps} steps of {args.batch_size * procs.world_size} patches, as "
                  f"{Path(args.checkpoint_dir) / 'last.pth'} planned them")  # a budget run's epochs may differ
        return steps
    if args.time_budget is None:
        steps, patches, frames = one_pass(data, args, procs)
        procs.log(f"plan: {describe_plan(args, procs, steps)}; an epoch: one pass over {frames:,} frames of training "
                  f"audio = {patches:,} patches at a hop of {dg.patch_hop(0.5)} frames, at least {MIN_STEPS_PER_EPOCH}"
                  f" steps")
        return steps
    if time.time() - launched > args.time_budget * 60:
        fail(f"--time-budget {args.time_budget:g} min: loading the data alone took {time.time() - launched:.0f} s; "
             f"give more minutes")
    procs.log(f"plan: {args.epochs} epochs sized to --time-budget {args.time_budget:g} min once a step and a "
              f"validation have been timed")
    return None


def budget_left(args, procs, launched):
    """Seconds of --time-budget left, less BUDGET_MARGIN, as the slowest rank sees it."""
    return args.time_budget * 60 * (1 - BUDGET_MARGIN) - procs.agree(time.time() - launched)


def plan_by_budget(run, launched, logging_seconds):
    """(steps per epoch, seconds an epoch costs beside its steps) that fill --time-budget, from a step and a
    validation timed here (validation again, without the first call's one-off costs: imports, kernel choice)."""
    args, procs = run.args, run.procs
    t0 = time.time()
    run.validate()
    epoch_seconds = procs.agree(time.time() - t0) + logging_seconds
    step_seconds = procs.agree(run.seconds_per_step())
    elapsed = procs.agree(time.time() - launched)
    steps = steps_to_fill(budget_left(args, procs, launched), args.epochs, step_seconds, epoch_seconds)
    if steps < 1:
        fail(f"--time-budget {args.time_budget:g} min is too short here: loading took {elapsed:.0f} s, a training "
             f"step takes {step_seconds:.2f} s and a validation {epoch_seconds:.0f} s; give more minutes or fewer "
             f"--epochs")
    planned = elapsed + args.epochs * (steps * step_seconds + epoch_seconds)
    procs.log(f"plan: {describe_plan(args, procs, steps)}, sized to --time-budget {args.time_budget:g} min: "
              f"{step_seconds:.2f} s a step, {epoch_seconds:.1f} s a validation, {elapsed:.0f} s so far, planned to "
              f"end after {planned / 60:.1f} min; later epochs are resized by the time the last one took")
    return steps, epoch_seconds


# the loop ----------------------------------------------------------------------------------------------------------

class CtrlC:
    """First Ctrl-C: stop after the current step (an exception raised wherever the signal lands can hit a __del__,
    which swallows it); a second Ctrl-C stops at once."""

    def __init__(self):
        self.pressed = False

    def __call__(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True


def train_epoch(run, batches, total_steps, ctrl_c):
    """One epoch of state.steps_per_epoch steps. Returns (mean training loss, last learning rate)."""
    state, args = run.state, run.args
    running = 0.0
    bar = tqdm(range(state.steps_per_epoch), desc=f"epoch {state.epoch + 1}/{args.epochs}", unit="step",
               disable=not run.procs.master, leave=False)
    for _ in bar:
        lr = learning_rate(state.step, args.lr, state.warmup_steps, total_steps)
        loss = run.step(next(batches), lr)
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        running += loss
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
        if run.writer is not None and state.step % 10 == 0:  # per-step curve, thinned
            run.writer.add_scalar("train/loss_step", loss, state.step)
    return running / state.steps_per_epoch, lr


def end_epoch(run, train_loss, lr, t0):
    """Validate, record, log, save last.pth, and best_model.pth when the validation SDR is the best so far
    (the first epoch always counts: its SDR is nan when no validation song has the target). -> log line"""
    state, t_val = run.state, time.time()
    val = run.validate()
    improved = val["val_sdr"] > state.best_val_sdr or state.best_val_sdr == float("-inf")
    if improved:
        state.best_val_loss, state.best_val_sdr = val["val_loss"], val["val_sdr"]
    state.epoch += 1
    state.history.append(dict(epoch=state.epoch, step=state.step, train_loss=train_loss, **val, lr=lr,
                              validation_seconds=time.time() - t_val, seconds=time.time() - t0))
    if run.procs.master:
        run.log_validation(state.epoch, val, train_loss, lr)
        if improved:
            save_run(Path(run.args.checkpoint_dir) / "best_model.pth", run, resumable=False)
        save_run(Path(run.args.checkpoint_dir) / "last.pth", run, resumable=True)
    return (f"epoch {state.epoch}/{run.args.epochs}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, val "
            f"SDR {val['val_sdr']:.2f} dB{' (best)' if improved else ''}, songs' mean {val['val_sdr_mean']:.2f} dB, "
            f"mask mean {val['mask_mean']:.3f} std {val['mask_std']:.3f}, lr {lr:.1e}, {time.time() - t0:.0f} s")


def check_replicas(run):
    """DDP keeps replicas in step by averaging gradients; check that it did."""
    checksum = torch.stack([p.detach().double().sum() for p in run.network.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(run.procs.world_size)]
    dist.all_gather(gathered, checksum)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    run.procs.log(f"DDP: weights {'identical' if same else 'DIFFERENT'} across {run.procs.world_size} ranks "
                  f"(parameter sums {', '.join(f'{g.item():.6f}' for g in gathered)})")


def main(argv=None):
    launched = time.time()  # the time budget counts from here: loading and decoding the data are part of the run
    args = parse_args(argv)
    procs = start_processes(args)
    resumed, init_weights = read_checkpoints(args)
    data = load_data(args, procs)
    steps_per_epoch = fixed_plan(args, procs, data, resumed, launched)
    if procs.master:  # only now that the data is there: a failed start leaves no empty folders behind
        try:
            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--checkpoint-dir {args.checkpoint_dir}: cannot create it ({e.strerror})")
    last_path = Path(args.checkpoint_dir) / "last.pth"
    model_config = UNetConfig(n_channels=args.n_channels) if resumed is None else stored_config(resumed, last_path)
    run = Run(args, procs, data, model_config, init_weights)
    if init_weights is not None:
        procs.log(f"initialised from {args.init} (its weights; a fresh optimiser and learning-rate schedule)")
    if resumed is not None:
        procs.log(f"resuming from {last_path}: epoch {resumed['epoch'] + 1}, step "
                  f"{resumed['step']}, best validation SDR {resumed['best_val_sdr']:.2f} dB")
    procs.log(run.start(resumed))
    if resumed is None:
        t0, val = time.time(), run.validate()
        procs.log(f"before training: validation loss {val['val_loss']:.4f}, SDR {val['val_sdr']:.2f} dB, "
                  f"mask mean {val['mask_mean']:.3f} std {val['mask_std']:.3f}")
        if procs.master:
            run.log_validation(0, val)
        logging_seconds = procs.agree(time.time() - t0)
    epoch_seconds = None
    if steps_per_epoch is None:
        steps_per_epoch, epoch_seconds = plan_by_budget(run, launched, logging_seconds)
    run.state.steps_per_epoch = steps_per_epoch
    total_steps = run.state.step + (args.epochs - run.state.epoch) * steps_per_epoch
    if run.state.warmup_steps is None or resumed is None:  # a resumed run keeps the warm-up it planned
        run.state.warmup_steps = min(WARMUP_STEPS, total_steps // 5)  # short runs must not spend most steps warming
    return train(run, launched, total_steps, epoch_seconds)


def train(run, launched, total_steps, epoch_seconds):
    """The loop over the epochs still to train; --time-budget resizes the epochs after each one. -> exit status"""
    args, procs, state = run.args, run.procs, run.state
    last_path = Path(args.checkpoint_dir) / "last.pth"
    if state.epoch >= args.epochs:
        procs.log(f"nothing to do: {last_path} already finished epoch {state.epoch} of --epochs {args.epochs}")
    ctrl_c, started = CtrlC(), time.time()
    if not procs.ddp:  # under torchrun every rank gets the signal and must not stop at different steps
        signal.signal(signal.SIGINT, ctrl_c)
    batches = iter(batch_loader(run.data, args, procs, state.step))
    current = state.epoch + 1
    try:
        while state.epoch < args.epochs:
            t0, current = time.time(), state.epoch + 1
            train_loss, lr = train_epoch(run, batches, total_steps, ctrl_c)
            steps = None
            if epoch_seconds is not None and state.epoch + 1 < args.epochs:  # resized before end_epoch saves the plan
                # at the last epoch's speed: a shared machine's drifts, and a plan fixed at the start missed either way
                epochs_left = args.epochs - state.epoch - 1
                steps = max(0, steps_to_fill(budget_left(args, procs, launched) - epoch_seconds, epochs_left,
                                             procs.agree(time.time() - t0) / state.steps_per_epoch, epoch_seconds))
                if steps:
                    state.steps_per_epoch, total_steps = steps, state.step + epochs_left * steps
            t1 = time.time()
            line = end_epoch(run, train_loss, lr, t0)
            procs.log(line + (f"; next epochs {steps} steps" if steps else ""))
            epoch_seconds = None if epoch_seconds is None else procs.agree(time.time() - t1)
            if ctrl_c.pressed:  # Ctrl-C during validation: this epoch is complete and saved, stop here
                raise KeyboardInterrupt
            if steps == 0:
                procs.log(f"time budget: not one more step fits in {args.time_budget:g} min (the machine got much "
                          f"slower); stopping after epoch {state.epoch}")
                break
    except KeyboardInterrupt:
        procs.log(f"\ninterrupted in epoch {current}; the last completed epoch is in {last_path} (continue "
                  f"with --resume), the best model so far in {Path(args.checkpoint_dir) / 'best_model.pth'}")
        if procs.ddp:
            dist.destroy_process_group()
        return 130
    if procs.ddp:
        check_replicas(run)
    procs.log(f"done in {time.time() - started:.0f} s: best validation SDR {state.best_val_sdr:.2f} dB (loss "
              f"{state.best_val_loss:.4f}); best model {Path(args.checkpoint_dir) / 'best_model.pth'}, last "
              f"{last_path}, logs {Path(args.checkpoint_dir) / 'logs'}")
    if run.writer is not None:
        run.writer.close()
    if procs.ddp:
        dist.barrier()  # every rank done with its last collective before any tears the group down (gloo can abort)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)
