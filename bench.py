"""Benchmarks for the machine they run on, which they name first (CPU features, torch, threads, date):
`python bench.py [--only inference|memory|training|live]`. inference: inference.py end to end next to the floor
(a Python process that imports torch, reads the same file and writes two stems); memory: peak RSS of
inference.py on a 3- and a 60-minute file; training: patches/s of train.py's step (unet_model.train_step)
in float32 and with train.py's autocast, alone and with the batches built as train.py builds them; live: live.py
fed 44.1 kHz stereo at its own pace at each latency of LIVE_LATENCIES: the latency measured from a click in to the
click out, and the share of real time the separation takes."""
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import data_generator as dg
import separator
import synthetic
from unet_model import UNet, UNetConfig, amp_dtype, load_model, save_checkpoint, train_step
from utils import Parser, choose_device, fail, run_cli

REPO = Path(__file__).resolve().parent
MEMORY_MINUTES = (3, 60)  # lengths of the files whose peak memory is measured
TRAIN_BATCH = {"cpu": 16, "cuda": 64}  # train.py's default on the CPU; a batch that fills a GPU
TRAIN_STEPS = 3  # timed steps per round; --repeats rounds, the median is reported
LIVE_LATENCIES = (0.5, 1.0, 2.0)  # seconds
LIVE_SECONDS, LIVE_CLICKS = 24, 8  # of 44.1 kHz stereo fed to live.py at each latency; clicks in it, one at a time
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides oneDNN's float32 and bf16 speed
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # environment limits on kernels
FLOOR = """import sys, torch, soundfile as sf
audio, rate = sf.read(sys.argv[1], dtype="float32")
for stem in ("vocals", "accompaniment"):
    sf.write(f"{sys.argv[2]}/floor_{stem}.wav", audio, rate, subtype="FLOAT")"""
# a synthetic 16-bit stereo song of any length, written in blocks by a child (this process does not grow)
SONG = """import sys, soundfile as sf, soxr, synthetic
block = soxr.resample(synthetic.synthetic_track("test", 1).mixture.T, synthetic.SAMPLE_RATE, 44100)
with sf.SoundFile(sys.argv[1], "w", 44100, 2, subtype="PCM_16") as f:  # argv[2]: length in samples
    for start in range(0, int(sys.argv[2]), len(block)):
        f.write(block[:int(sys.argv[2]) - start])"""
# A fresh small process runs the command and prints its peak RSS in KiB: a child started from bench.py
# itself would count bench.py's pages, which it holds until it starts the new program.
PEAK_RSS = """import resource, subprocess, sys
if subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode:
    sys.exit(1)  # the command's error is on stderr already
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def machine():
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "unknown CPU")
    flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    features = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FEATURES)
    gpu = f"\ngpu: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    # kernels capped below what the CPU has (e.g. ONEDNN_MAX_CPU_ISA=AVX2 to stand in for an AVX2 machine) must show
    capped = ", ".join(f"{v}={os.environ[v]}" for v in ISA_CAPS if v in os.environ)
    return (f"machine: {name}, {os.cpu_count()} cores; {features}\ntorch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; kernels {torch.backends.cpu.get_cpu_capability()}"
            + (f" (capped: {capped})" if capped else "")
            + f"; CPU autocast: {str(amp_dtype('cpu') or 'float32').replace('torch.', '')}\n"
            f"date: {datetime.datetime.now().isoformat(sep=' ', timespec='minutes')}{gpu}")


def run(command):
    """A child process's stdout and wall time (s); one line on stderr and exit if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, cwd=REPO, text=True)
    if done.returncode != 0:
        fail(f"{' '.join(map(str, command[:3]))} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout, time.perf_counter() - start


def benchmark_checkpoint(args, workdir):
    """(path, description) of the model to time: --checkpoint, or a random one of the same size."""
    if Path(args.checkpoint).exists():
        return args.checkpoint, f"{args.checkpoint}, n_channels={load_model(args.checkpoint)[0].config.n_channels}"
    path = workdir / "random_init.pth"  # the same network and cost as a trained one
    save_checkpoint(path, UNet(UNetConfig()).eval(), dg.SPEC_CONFIG)
    return path, "random, n_channels=16 (no trained checkpoint found; the timing is the same)"


def separate(args, checkpoint, song, out):
    return [sys.executable, "inference.py", "--audio", str(song), "--checkpoint", str(checkpoint),
            "--output-dir", str(out)] + (["--cpu"] if args.cpu else [])


def bench_inference(args, workdir, checkpoint):
    """inference.py and the floor, each once to warm the caches, then alternately --repeats times."""
    song, out = workdir / "song.wav", workdir / "out"
    run([sys.executable, "-c", SONG, song, str(int(args.seconds * 44100))])
    commands = [separate(args, checkpoint, song, out), [sys.executable, "-c", FLOOR, song, out]]
    # alternating, so that drifts in machine load hit both alike; the first round warms the caches
    rounds = [[run(command)[1] for command in commands] for _ in range(args.repeats + 1)]
    model, floor = (statistics.median(timings) for timings in zip(*rounds[1:]))
    print(f"| inference | floor: import torch, read, write 2 stems ({args.seconds:g} s song) | {floor:.2f} s | "
          f"median of {args.repeats}, alternating, after a warm-up run |")
    print(f"| inference | inference.py end to end (default settings) | {model:.2f} s | {model / floor:.2f}x the floor, "
          f"{args.seconds / model:.1f}x real time |", flush=True)


def bench_memory(args, workdir, checkpoint):
    """Peak RSS of inference.py separating each of MEMORY_MINUTES, measured by a fresh wrapper process."""
    out, peaks = workdir / "out", []
    for minutes in MEMORY_MINUTES:
        song = workdir / f"song_{minutes}min.wav"
        run([sys.executable, "-c", SONG, song, str(minutes * 60 * 44100)])
        peaks.append(int(run([sys.executable, "-c", PEAK_RSS, *separate(args, checkpoint, song, out)])[0]) / 1024)
        print(f"| memory | peak RSS, inference.py on a {minutes}-minute 44.1 kHz stereo file | {peaks[-1]:.0f} MiB | "
              f"{peaks[-1] / peaks[0]:.2f}x the {MEMORY_MINUTES[0]}-minute file |", flush=True)
        for f in [song, *out.iterdir()]:
            f.unlink()


def patches_per_second(steps, batch_size, repeats):
    """{name: median patches/s}: rounds of TRAIN_STEPS calls of each step function, alternating, after a warm-up."""
    rates = {name: [] for name in steps}
    for _ in range(repeats + 1):  # the first round warms up: allocator, oneDNN's kernel choice
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(TRAIN_STEPS):
                step().item()  # .item() waits for the device
            rates[name].append(TRAIN_STEPS * batch_size / (time.perf_counter() - start))
    return {name: statistics.median(r[1:]) for name, r in rates.items()}


def bench_training(args, workdir, checkpoint):
    """train.py's step on one batch (float32, train.py's autocast), and on batches built as train.py does."""
    config = load_model(checkpoint)[0].config
    device = choose_device(args.cpu)  # as train.py
    tracks, rng = [synthetic.synthetic_track("train", i) for i in range(10)], np.random.default_rng(0)
    batch_size, autocast = TRAIN_BATCH[device.type], amp_dtype(device)

    def step(dtype, next_batch):
        torch.manual_seed(0)
        model = UNet(config).to(device, memory_format=torch.channels_last).train()  # as train.py
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return lambda: train_step(model, optimizer, scaler, *next_batch(), dtype)

    def batch():  # as train.py's TrainingBatches
        waves = dg.training_batch([tracks], batch_size, rng)
        return dg.patch_spectrograms(*(torch.from_numpy(w).to(device) for w in waves))

    fixed, used = batch(), str(autocast or "float32").replace("torch.", "")
    alone = f"step alone, float32, batch {batch_size}, n_channels={config.n_channels}, {device.type}"
    steps = {alone: step(None, lambda: fixed),
             f"step alone, autocast {used}": step(autocast, lambda: fixed) if autocast else None,
             f"step and batches as train.py builds them ({used})": step(autocast, batch)}
    rates = patches_per_second({name: s for name, s in steps.items() if s}, batch_size, args.repeats)
    for name, rate in rates.items():
        print(f"| training | {name} | {rate:.1f} patches/s | {rate / next(iter(rates.values())):.2f}x float32 alone |")


def feed_at_pace(pipe, audio, rate, times, block=441):
    """Write (samples, channels) int16 audio to a pipe in blocks of `block` samples at the pace of its rate, noting
    in `times` when each block went; closes the pipe at the end."""
    started = time.perf_counter()
    for i in range(0, len(audio), block):
        time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        pipe.write(audio[i:i + block].tobytes())
        pipe.flush()
        times.append((i + block, time.perf_counter()))
    pipe.close()


def bench_live(args, workdir, checkpoint):
    """live.py at each latency: LIVE_SECONDS of 44.1 kHz stereo silence with LIVE_CLICKS clicks, fed at its own
    pace; a click leaves at the sample it came in on, so the time from writing its block to reading that sample back
    is the latency, measured. The separation's share of real time and the underruns come from live.py's status."""
    rate = 44100
    audio = np.zeros((LIVE_SECONDS * rate, 2), np.int16)
    clicks = [int((1.5 + k * (LIVE_SECONDS - 3) / LIVE_CLICKS) * rate) for k in range(LIVE_CLICKS)]
    audio[clicks] = 20000
    for latency in LIVE_LATENCIES:
        process = subprocess.Popen([sys.executable, "live.py", "--checkpoint", str(checkpoint), "--latency",
                                    str(latency), "--stem", "accompaniment"] + (["--cpu"] if args.cpu else []),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        process.stderr.readline()  # the model's line: loaded and warmed up, the stream can start
        fed, out, received = [], bytearray(), []
        feeder = threading.Thread(target=feed_at_pace, args=(process.stdin, audio, rate, fed))
        feeder.start()
        while chunk := process.stdout.read1(1 << 16):
            out += chunk
            received.append((len(out) // 4, time.perf_counter()))
        feeder.join()
        status = process.stderr.read().decode().strip().splitlines()
        if process.wait() != 0 or len(out) != audio.nbytes:
            fail(f"live.py --latency {latency} failed: {(status or ['?'])[-1]}")
        heard = np.abs(np.frombuffer(bytes(out), np.int16).reshape(-1, 2)).max(axis=1)
        delays = []
        for click in clicks:
            found = click + int(np.argmax(heard[click:click + rate // 10] > 1000))
            sent = next(t for end, t in fed if end > click)
            delays.append(next(t for end, t in received if end > found) - sent)
        load = next(word for word in status[-1].split(", ") if "real time" in word)
        print(f"| live | latency {latency:g} s, 44.1 kHz stereo at its own pace | {np.mean(delays):.3f} s measured "
              f"(clicks {min(delays):.3f}-{max(delays):.3f}) | {load.replace('separation ', 'separation: ')}, "
              f"{status[-1].split(', ')[-2]} |", flush=True)


def main():
    parser = Parser("Benchmark inference speed, memory, training throughput and live separation.")
    parser.add_argument("--only", choices=["inference", "memory", "training", "live"], default=None,
                        help="run one part")
    separator.add_model_args(parser)
    parser.add_argument("--seconds", type=float, default=180, help="length of the inference test song")
    parser.add_argument("--repeats", type=int, default=5, help="runs (inference) or rounds (training) per median")
    args = parser.parse_args()
    if args.repeats < 1 or not args.seconds > 0:
        fail(f"--repeats must be at least 1 and --seconds positive, got {args.repeats} and {args.seconds:g}")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        checkpoint, described = benchmark_checkpoint(args, Path(tmp))
        print(f"checkpoint: {described}\n\n| part | measurement | value | note |\n|---|---|---|---|")
        (Path(tmp) / "out").mkdir()
        for part, bench in (("inference", bench_inference), ("memory", bench_memory), ("training", bench_training),
                            ("live", bench_live)):
            if args.only in (None, part):
                bench(args, Path(tmp), checkpoint)


if __name__ == "__main__":
    run_cli(main)
