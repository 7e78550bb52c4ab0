"""
Benchmarks, printed side by side for the machine they ran on (nothing here is asserted by tests).

    python bench.py                      # everything (about 5 minutes on a 2-core CPU)
    python bench.py --only inference     # or memory, training

- inference: wall time and real-time factor to separate a 3-minute 44.1 kHz stereo song end to
  end (start Python, read, resample, STFT, U-Net, inverse STFT, write two stems), next to the
  floor for the same file (start Python, import torch, read the song, write two stems) and next
  to librosa's REPET-SIM vocal separation; and several files in one call;
- memory: peak resident memory (RSS) separating a 60-minute file, and a 10-minute one;
- training: patches per second of the model step alone and of the whole data + model loop,
  on the CPU and on CUDA when present.
Every run goes through inference.py / data_generator.py / unet_model.py, never a copy of them.
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
from unet_model import UNet, UNetConfig, amp_dtype, load_model, save_checkpoint

REPO = Path(__file__).resolve().parent

FLOOR = """
import sys, torch, soundfile as sf
audio, rate = sf.read(sys.argv[1], dtype="float32")
for stem in ("vocals", "accompaniment"):
    sf.write(f"{sys.argv[2]}/floor_{stem}.wav", audio, rate, subtype="FLOAT")
"""

# REPET-SIM (Rafii & Pardo 2012) as librosa documents it: the repeating accompaniment is the
# median of each frame's nearest neighbours (cosine similarity, at least 2 s apart); soft masks
# split each channel into vocals and accompaniment.
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
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def run_timed(command):
    """Wall time (s) and peak RSS (MiB) of a child process; fails loudly if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    out, err = process.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(map(str, command))}\n{err.decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def make_song(path, seconds):
    """write_song in a child process: synthesising in this process would inflate its memory,
    and a child's peak RSS counts the parent's pages it was forked from."""
    code = f"import bench; from pathlib import Path; bench.write_song(Path({str(path)!r}), {seconds})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def write_song(path, seconds, rate=44100, subtype="PCM_16"):
    """A synthetic stereo song of any length, written in blocks (memory stays small)."""
    piece = dg.synthetic_track("test", 1, rate=rate, seconds=30)
    block = piece.mixture.T
    with sf.SoundFile(str(path), "w", rate, 2, subtype=subtype) as f:
        remaining = int(seconds * rate)
        while remaining > 0:
            f.write(block[:remaining])
            remaining -= len(block)


def benchmark_checkpoint(args, workdir):
    if Path(args.checkpoint).exists():
        load_model(args.checkpoint)
        return args.checkpoint, f"{args.checkpoint}"
    path = workdir / "random_init.pth"  # the same network and cost as a trained one
    save_checkpoint(path, UNet(UNetConfig(n_channels=16)).eval(), dg.SPEC_CONFIG)
    return path, "randomly initialised n_channels=16 (no trained checkpoint found; timing is the same)"


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
    floor_s, separate_s, one_pass_s = (statistics.median(timings[k]) for k in ("floor", "separate", "one_pass"))
    results.append(("inference", f"floor: start Python, import torch, read, write 2 stems ({args.seconds:.0f} s song)",
                    f"{floor_s:.2f} s", f"{args.seconds / floor_s:.0f}x real time"))
    results.append(("inference", "U-Net separation end to end (inference.py, default --shifts 2)", f"{separate_s:.2f} s",
                    f"{args.seconds / separate_s:.0f}x real time, {separate_s / floor_s:.2f}x the floor"))
    results.append(("inference", "the same with --shifts 1 (one pass)", f"{one_pass_s:.2f} s",
                    f"{args.seconds / one_pass_s:.0f}x real time, {one_pass_s / floor_s:.2f}x the floor"))
    copies = [workdir / f"copy{i}.wav" for i in range(3)]
    for copy in copies:
        copy.write_bytes(song.read_bytes())
    several = run_timed(separate[:3] + [str(c) for c in copies] + separate[4:])[0]
    results.append(("inference", "3 songs in one call (one start-up)", f"{several:.2f} s",
                    f"{several / 3:.2f} s per song"))
    if not args.skip_repet:
        repet = run_timed([sys.executable, "-c", REPET_SIM, str(song), str(out)])[0]
        results.append(("inference", "librosa REPET-SIM, same file", f"{repet:.2f} s",
                        f"{args.seconds / repet:.0f}x real time, {repet / floor_s:.1f}x the floor"))


def bench_memory(args, workdir, checkpoint, results):
    out = workdir / "out_long"
    out.mkdir(exist_ok=True)
    for minutes in (10, args.memory_minutes):
        song = workdir / f"song_{minutes}min.wav"
        make_song(song, minutes * 60)
        command = [sys.executable, "inference.py", "--audio", str(song), "--checkpoint", str(checkpoint),
                   "--output-dir", str(out)] + (["--cpu"] if args.cpu else [])
        elapsed, rss = run_timed(command)
        results.append(("memory", f"peak RSS separating a {minutes}-minute 44.1 kHz stereo file", f"{rss:.0f} MiB",
                        f"{elapsed:.0f} s, {minutes * 60 / elapsed:.0f}x real time"))
        song.unlink()
        for f in out.iterdir():
            f.unlink()


def bench_training(args, results):
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.cpu else [])
    if args.musdb_root:
        source = dg.find_data_source(args.musdb_root)
        tracks = dg.load_tracks(source, "train", None, args.cache_dir)  # warms the decode cache first
        data = f"MUSDB18 at {args.musdb_root}, {len(tracks)} tracks, cache warm"
    else:
        tracks = [dg.synthetic_track("train", i) for i in range(10)]
        data = "synthetic, 10 songs"
    for device in devices:
        torch.manual_seed(0)
        model = UNet(UNetConfig()).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        dtype = amp_dtype(device)
        rng = np.random.default_rng(0)
        batch_size = args.batch_size if device.type == "cpu" else args.cuda_batch_size

        def batch():
            vocals, accompaniment = dg.training_batch(tracks, batch_size, rng)
            pin = device.type == "cuda"
            vocals, accompaniment = (torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a)
                                     for a in (vocals, accompaniment))
            return dg.patch_spectrograms(vocals.to(device, non_blocking=True),
                                         accompaniment.to(device, non_blocking=True))

        def step(mixture, target):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                mask = model(mixture)
            loss = (mask.float() * mixture - target).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        def measure(make_batch):
            fixed = batch()
            for _ in range(3):  # warm-up: allocator, cuDNN autotuning
                step(*fixed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.train_steps):
                step(*(make_batch() if make_batch else fixed)).item()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return args.train_steps * batch_size / (time.perf_counter() - start)

        alone, whole = measure(None), measure(batch)
        label = f"{device.type}" + (f" ({dtype})".replace("torch.", "") if dtype else " (float32)")
        results.append(("training", f"model step alone, batch {batch_size}, {label}", f"{alone:.1f} patches/s", ""))
        results.append(("training", f"whole loop (data: {data})", f"{whole:.1f} patches/s",
                        f"{100 * whole / alone:.0f}% of the model step alone"))


def main():
    parser = argparse.ArgumentParser(description="Benchmark inference speed, memory and training throughput.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=["inference", "memory", "training"], default=None, help="run one part")
    parser.add_argument("--checkpoint", default="checkpoints/best_model.pth",
                        help="model to time (a random one of the same size if missing)")
    parser.add_argument("--seconds", type=float, default=180, help="length of the inference test song")
    parser.add_argument("--repeats", type=int, default=3, help="inference timings to take the median of")
    parser.add_argument("--memory-minutes", type=int, default=60, help="length of the long file for peak memory")
    parser.add_argument("--skip-repet", action="store_true", help="skip librosa's REPET-SIM")
    parser.add_argument("--train-steps", type=int, default=15, help="timed training steps per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch on the CPU")
    parser.add_argument("--cuda-batch-size", type=int, default=64, help="training batch on CUDA")
    parser.add_argument("--musdb-root", default=None, help="time training on this dataset (default: synthetic)")
    parser.add_argument("--cache-dir", default=str(dg.DEFAULT_CACHE_DIR), help="decoded-audio cache")
    parser.add_argument("--cpu", action="store_true", help="CPU only, even when CUDA is available")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint, described = benchmark_checkpoint(args, workdir)
        print(f"checkpoint: {described}")
        if args.only in (None, "inference"):
            bench_inference(args, workdir, checkpoint, results)
        if args.only in (None, "memory"):
            bench_memory(args, workdir, checkpoint, results)
        if args.only in (None, "training"):
            bench_training(args, results)
    print()
    print("| part | measurement | value | note |\n|---|---|---|---|")
    for part, what, value, note in results:
        print(f"| {part} | {what} | {value} | {note} |")


if __name__ == "__main__":
    main()
