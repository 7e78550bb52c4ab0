"""
Benchmarks for the machine they run on: `python bench.py [--only inference|memory|training]`.
- inference: seconds to separate a 3-minute 44.1 kHz stereo song end to end with inference.py, next to
  the floor (start Python, import torch, read the song, write two stems), librosa's REPET-SIM, and
  three files in one call; memory: peak RSS separating a 10- and a 60-minute file;
- training: patches per second of train.py's step (unet_model.train_step) alone and with the batches
  built as train.py builds them (synthetic set), on the CPU and on CUDA when present.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import data_generator as dg
import synthetic
from unet_model import CheckpointError, UNet, UNetConfig, amp_dtype, load_model, save_checkpoint, train_step

REPO = Path(__file__).resolve().parent
MEMORY_MINUTES = (10, 60)  # lengths of the files whose peak memory is measured
TRAIN_BATCH = {"cpu": 16, "cuda": 64}  # train.py's default on the CPU; a batch that fills a GPU
TRAIN_STEPS = 5  # timed steps per round; --repeats rounds, the median is reported

FLOOR = """
import sys, torch, soundfile as sf
audio, rate = sf.read(sys.argv[1], dtype="float32")
for stem in ("vocals", "accompaniment"):
    sf.write(f"{sys.argv[2]}/floor_{stem}.wav", audio, rate, subtype="FLOAT")
"""

# REPET-SIM (Rafii & Pardo 2012) as librosa documents it: the repeating accompaniment is the median of each
# frame's nearest neighbours (cosine similarity, at least 2 s apart); soft masks split each channel.
REPET_SIM = """
import sys, numpy as np, librosa, soundfile as sf
audio, rate = sf.read(sys.argv[1], dtype="float32", always_2d=True)
stems = {"vocals": [], "accompaniment": []}
for channel in audio.T:
    spec = librosa.stft(channel)
    magnitude, phase = np.abs(spec), np.exp(1j * np.angle(spec))
    repeating = librosa.decompose.nn_filter(magnitude, aggregate=np.median, metric="cosine",
                                            width=int(librosa.time_to_frames(2, sr=rate)))
    repeating = np.minimum(magnitude, repeating)
    vocal_mask = librosa.util.softmask(magnitude - repeating, 10 * repeating, power=2)
    music_mask = librosa.util.softmask(repeating, 2 * (magnitude - repeating), power=2)
    for stem, mask in (("vocals", vocal_mask), ("accompaniment", music_mask)):
        stems[stem].append(librosa.istft(mask * magnitude * phase, length=len(channel)))
for stem, channels in stems.items():
    sf.write(f"{sys.argv[2]}/repet_{stem}.wav", np.stack(channels, axis=1), rate, subtype="FLOAT")
"""


def machine():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{(names or [platform.processor() or platform.machine()])[0]}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


def run_timed(command):
    """Wall time (s) and peak RSS (MiB) of a child process; one line on stderr if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    err = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(map(str, command[:3]))} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return elapsed, usage.ru_maxrss / 1024


def make_song(path, seconds):
    """write_song in a child process: synthesising in this process would inflate its memory,
    and a child's peak RSS counts the parent's pages it was forked from."""
    code = f"import bench; from pathlib import Path; bench.write_song(Path({str(path)!r}), {seconds})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def write_song(path, seconds, rate=44100, subtype="PCM_16"):
    """A synthetic stereo song of any length, written in blocks (memory stays small)."""
    block = synthetic.synthetic_track("test", 1, rate=rate, seconds=30).mixture.T
    with sf.SoundFile(str(path), "w", rate, 2, subtype=subtype) as f:
        remaining = int(seconds * rate)
        while remaining > 0:
            f.write(block[:remaining])
            remaining -= len(block)


def benchmark_checkpoint(args, workdir):
    """(path, description, model config) of the model to time: --checkpoint, or a random one of the same size."""
    if Path(args.checkpoint).exists():
        try:
            model, _ = load_model(args.checkpoint)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        return args.checkpoint, f"{args.checkpoint}", model.config
    path = workdir / "random_init.pth"  # the same network and cost as a trained one
    save_checkpoint(path, UNet(UNetConfig()).eval(), dg.SPEC_CONFIG)
    return path, "random n_channels=16 (no trained checkpoint found; the timing is the same)", UNetConfig()


def bench_inference(args, workdir, checkpoint, results):
    song = workdir / "song_3min.wav"
    make_song(song, args.seconds)
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    separate = [sys.executable, "inference.py", "--audio", str(song), "--checkpoint", str(checkpoint),
                "--output-dir", str(out)] + (["--cpu"] if args.cpu else [])
    floor = [sys.executable, "-c", FLOOR, str(song), str(out)]
    one_pass = separate + ["--shifts", "1"]
    timings = {"floor": [], "separate": [], "one_pass": []}
    for _ in range(args.repeats):  # interleaved, so that drifts in machine load hit all alike
        timings["floor"].append(run_timed(floor)[0])
        timings["separate"].append(run_timed(separate)[0])
        timings["one_pass"].append(run_timed(one_pass)[0])
    timings["repet"] = [run_timed([sys.executable, "-c", REPET_SIM, str(song), str(out)])[0]]
    floor_s = statistics.median(timings["floor"])
    for key, what in (("floor", f"floor: start Python, import torch, read, write 2 stems ({args.seconds:.0f} s song)"),
                      ("separate", "U-Net separation end to end (inference.py, default --shifts)"),
                      ("one_pass", "the same with --shifts 1 (one pass)"), ("repet", "librosa REPET-SIM, same file")):
        seconds = statistics.median(timings[key])
        results.append(("inference", what, f"{seconds:.2f} s",
                        f"{args.seconds / seconds:.0f}x real time, {seconds / floor_s:.2f}x the floor"))
    copies = [workdir / f"copy{i}.wav" for i in range(3)]
    for copy in copies:
        copy.write_bytes(song.read_bytes())
    several = run_timed(separate[:3] + [str(c) for c in copies] + separate[4:])[0]
    results.append(("inference", "3 songs in one call (one start-up)", f"{several:.2f} s", f"{several / 3:.2f} s per song"))


def bench_memory(args, workdir, checkpoint, results):
    out = workdir / "out_long"
    out.mkdir(exist_ok=True)
    for minutes in MEMORY_MINUTES:
        song = workdir / f"song_{minutes}min.wav"
        make_song(song, minutes * 60)
        command = [sys.executable, "inference.py", "--audio", str(song), "--checkpoint", str(checkpoint),
                   "--output-dir", str(out)] + (["--cpu"] if args.cpu else [])
        elapsed, rss = run_timed(command)
        results.append(("memory", f"peak RSS separating a {minutes}-minute 44.1 kHz stereo file", f"{rss:.0f} MiB",
                        f"{elapsed:.0f} s, {minutes * 60 / elapsed:.0f}x real time"))
        for f in [song, *out.iterdir()]:
            f.unlink()


def patches_per_second(model, device, batch_size, next_batch, repeats):
    """Median over rounds of TRAIN_STEPS train_step calls, on batches from next_batch()."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    train_step(model, optimizer, scaler, *next_batch(), amp_dtype(device)).item()  # warm-up: allocator, cuDNN
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(TRAIN_STEPS):
            train_step(model, optimizer, scaler, *next_batch(), amp_dtype(device)).item()  # .item() waits for it
        rates.append(TRAIN_STEPS * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_training(args, config, results):
    """train.py's step alone (one fixed batch) and with the batches built as train.py builds them."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.cpu else [])
    tracks = [synthetic.synthetic_track("train", i) for i in range(10)]
    for device in devices:
        torch.manual_seed(0)
        model = UNet(config).to(device, memory_format=torch.channels_last).train()
        batch_size, rng = TRAIN_BATCH[device.type], np.random.default_rng(0)

        def batch():
            vocals, accompaniment = (torch.from_numpy(a) for a in dg.training_batch(tracks, batch_size, rng))
            return dg.patch_spectrograms(vocals.to(device), accompaniment.to(device))

        fixed = batch()
        alone = patches_per_second(model, device, batch_size, lambda: fixed, args.repeats)
        whole = patches_per_second(model, device, batch_size, batch, args.repeats)
        dtype = str(amp_dtype(device) or "float32").replace("torch.", "")
        label = f"batch {batch_size}, n_channels={config.n_channels}, {device.type} ({dtype})"
        results.append(("training", f"train step alone, {label}", f"{alone:.1f} patches/s", ""))
        results.append(("training", "whole loop (data: synthetic, 10 songs)", f"{whole:.1f} patches/s",
                        f"{100 * whole / alone:.0f}% of the step alone"))


def main():
    parser = argparse.ArgumentParser(description="Benchmark inference speed, memory and training throughput.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=["inference", "memory", "training"], default=None, help="run one part")
    parser.add_argument("--checkpoint", default="checkpoints/best_model.pth", help="model to time (default n_channels "
                        "if missing)")
    parser.add_argument("--seconds", type=float, default=180, help="length of the inference test song")
    parser.add_argument("--repeats", type=int, default=3, help="timings to take the median of (inference: runs of "
                        "each command; training: rounds of a few steps)")
    parser.add_argument("--cpu", action="store_true", help="CPU only, even when CUDA is available")
    args = parser.parse_args()
    if args.repeats < 1 or not args.seconds > 0:
        sys.exit(f"error: --repeats must be at least 1 and --seconds positive, got {args.repeats} and {args.seconds:g}")
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint, described, config = benchmark_checkpoint(args, workdir)
        print(f"checkpoint: {described}")
        if args.only in (None, "inference"):
            bench_inference(args, workdir, checkpoint, results)
        if args.only in (None, "memory"):
            bench_memory(args, workdir, checkpoint, results)
        if args.only in (None, "training"):
            bench_training(args, config, results)
    print("\n| part | measurement | value | note |\n|---|---|---|---|")
    for part, what, value, note in results:
        print(f"| {part} | {what} | {value} | {note} |")


if __name__ == "__main__":
    main()
