"""
Live separation: raw PCM in on stdin, the vocals (or, for karaoke, the accompaniment) out on stdout, each output
sample exactly --latency seconds after its input sample arrived.

    ffmpeg -loglevel error -re -i song.mp3 -f s16le -ac 2 -ar 44100 - \\
      | python live.py --stem accompaniment | ffplay -loglevel error -nodisp -f s16le -ar 44100 -ch_layout stereo -

Three threads: one reads the input and notes when each block arrived; one runs the separator (separator.py, with
the look-ahead the latency leaves: live_options) on the newest input as it comes; this one writes each output
sample when it falls due: `latency` seconds after its input sample arrived, and never before the input has run
latency * rate samples past it (what the separator needs to hear). A steady input meets both at once; a burst
leaves on the clock, a pause holds back the samples that need what follows it. At the end of the input the rest
is flushed at once: the output is exactly as long as the input. A sample due before it was separated (an underrun:
the CPU fell behind) leaves as silence. The status line on stderr shows the latency, the share of real time the
separation takes and the underruns.
"""
import collections
import os
import queue
import sys
import threading
import time

import numpy as np
import torch

import separator
from audio import STEMS
from utils import DataError, Parser, fail, run_cli

FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
RATES, MAX_CHANNELS = (8000, 384000), 8
READ_FRAMES = 512  # samples per channel read at once at most: about 12 ms at 44.1 kHz, the output's grain in time
STATUS_SECONDS = 1.0, 30.0  # between status lines on a terminal, and in a log file


def decode(data, fmt, channels):
    """Interleaved PCM bytes (whole frames) -> (channels, samples) float32 in [-1, 1]."""
    samples = np.frombuffer(data, FORMATS[fmt]).reshape(-1, channels).T
    return samples.astype(np.float32) / (32768 if fmt == "s16le" else 1)


def encode(samples, fmt):
    """(channels, samples) float -> interleaved PCM bytes; 16-bit is rounded and clipped."""
    if fmt == "s16le":
        samples = np.clip(np.round(samples * 32768), -32768, 32767)
    return np.ascontiguousarray(samples.T).astype(FORMATS[fmt]).tobytes()


class Outbox:
    """The separated samples waiting to leave, in order. take() gives what is due, silence for what is not there
    yet; those samples are dropped when they do arrive, so that every later one keeps its time."""

    def __init__(self, channels):
        self.lock, self.parts, self.channels, self.late = threading.Lock(), collections.deque(), channels, 0

    def put(self, samples):
        with self.lock:
            drop = min(self.late, samples.shape[1])
            self.late -= drop
            if samples.shape[1] > drop:
                self.parts.append(samples[:, drop:])

    def take(self, n):
        """(channels, n) float32: the next n samples, the missing ones as silence -> (samples, how many missing)."""
        with self.lock:
            out, filled = np.zeros((self.channels, n), np.float32), 0
            while filled < n and self.parts:
                part = self.parts.popleft()
                used = min(n - filled, part.shape[1])
                out[:, filled:filled + used] = part[:, :used]
                if used < part.shape[1]:
                    self.parts.appendleft(part[:, used:])
                filled += used
            self.late += n - filled
            return out, n - filled


class Worker(threading.Thread):
    """The separator's thread: blocks from `inbox` (None: the input ended) through the stream into `outbox`, all
    that waits at once when it falls behind; it times itself for the status line."""

    def __init__(self, stream, stem, outbox):
        super().__init__(daemon=True)
        self.stream, self.stem, self.outbox, self.inbox = stream, STEMS.index(stem), outbox, queue.Queue()
        self.busy, self.separated, self.error, self.done, self.stopped = 0.0, 0, None, threading.Event(), False

    def stop(self):
        """End the thread after the block it is separating, if any, without separating the rest."""
        self.stopped = True
        self.inbox.put(None)
        self.join()

    def run(self):
        try:
            ended = False
            while not ended:
                blocks = [self.inbox.get()]
                while not self.inbox.empty():
                    blocks.append(self.inbox.get_nowait())
                if self.stopped:
                    break
                ended, blocks = blocks[-1] is None, [b for b in blocks if b is not None]
                started = time.perf_counter()
                if blocks:
                    self.outbox.put(self.stream.process(np.concatenate(blocks, axis=1))[self.stem])
                    self.separated += sum(b.shape[1] for b in blocks)
                if ended:
                    self.outbox.put(self.stream.finish()[self.stem])
                self.busy += time.perf_counter() - started
        except Exception as e:  # handed to the main thread, which reports it
            self.error = e
        self.done.set()


class Status:
    """The status line on stderr: redrawn in place on a terminal, a line now and then in a log."""

    def __init__(self, args):
        self.args, self.tty, self.shown = args, sys.stderr.isatty(), time.monotonic()
        self.underruns = self.missing = 0

    def line(self, worker, received):
        tenths = round(received * 10 / self.args.rate)  # rounded once, so 59.96 s reads 1:00.0, not 0:60.0
        load = worker.busy / max(worker.separated / self.args.rate, 1e-9)
        missing = f"{self.underruns} underrun(s), {self.missing / self.args.rate:.2f} s of silence" if self.underruns \
            else "no underrun"
        return (f"live: {self.args.stem}, latency {self.args.latency:.2f} s, separation {load:.2f}x real time, "
                f"{missing}, {tenths // 600}:{tenths % 600 / 10:04.1f} of audio")

    def show(self, worker, received, final=False):
        now = time.monotonic()
        if final or now - self.shown >= STATUS_SECONDS[0 if self.tty else 1]:
            end = "\n" if final or not self.tty else ""
            print(("\r" if self.tty else "") + self.line(worker, received), end=end, file=sys.stderr, flush=True)
            self.shown = now


def write_all(data):
    """Write bytes to stdout whole (a pipe may take them in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def read_input(size, arrivals):
    """The reader's thread: stdin in reads of at most `size` bytes, each put in `arrivals` with the time it came;
    b"" at the end."""
    while True:
        try:
            chunk = os.read(0, size)
        except OSError as e:
            chunk = e
        arrivals.put((time.monotonic(), chunk))
        if not isinstance(chunk, bytes) or not chunk:
            return


def stream_pipe(args, worker, status):
    """Hand the input to the worker as it arrives, write each output sample when it falls due, then, at the end
    of the input, flush the rest once the worker has finished. Returns the bytes of a last incomplete frame."""
    frame = args.channels * FORMATS[args.format].itemsize
    delay, arrivals, blocks = round(args.latency * args.rate), queue.Queue(), collections.deque()
    threading.Thread(target=read_input, args=(READ_FRAMES * frame, arrivals), daemon=True).start()
    received = written = by_clock = 0  # samples in, samples out, samples whose input arrived a latency ago
    pending, ended = b"", False
    while not ended:
        try:  # until the next block's samples fall due, unless more input comes first
            arrived, chunk = arrivals.get(timeout=max(0.0, blocks[0][0] + args.latency - time.monotonic())
                                          if blocks else None)
            if not isinstance(chunk, bytes):
                raise DataError(f"cannot read the input ({chunk})")
            ended, data = not chunk, pending + chunk
            whole = len(data) - len(data) % frame
            if whole:
                samples = decode(data[:whole], args.format, args.channels)
                if not np.isfinite(samples).all():
                    raise DataError("the input holds NaN or infinite samples")
                worker.inbox.put(samples)
                received += samples.shape[1]
                blocks.append((arrived, received))
            pending = data[whole:]
        except queue.Empty:
            pass
        while blocks and blocks[0][0] + args.latency <= time.monotonic():
            by_clock = blocks.popleft()[1]
        if min(by_clock, received - delay) > written:
            samples, missing = worker.outbox.take(min(by_clock, received - delay) - written)
            status.underruns, status.missing = status.underruns + (missing > 0), status.missing + missing
            write_all(encode(samples, args.format))
            written += samples.shape[1]
        if worker.error is not None:
            raise worker.error
        status.show(worker, received)
    worker.inbox.put(None)
    worker.done.wait()
    if worker.error is not None:
        raise worker.error
    write_all(encode(worker.outbox.take(received - written)[0], args.format))  # the end: everything is there
    status.show(worker, received, final=True)
    return pending


def main(argv=None):
    parser = Parser("Separate live audio: raw PCM in on stdin, one stem out on stdout, --latency seconds later.")
    separator.add_model_args(parser)
    parser.add_argument("--rate", type=int, default=44100, help="sample rate of the input and output, Hz")
    parser.add_argument("--channels", type=int, default=2, help="channels of the input and output, interleaved")
    parser.add_argument("--format", default="s16le", choices=FORMATS, help="sample format of the input and output")
    parser.add_argument("--stem", default="vocals", choices=STEMS, help="what to send on: the vocals, or the "
                        "accompaniment for karaoke")
    parser.add_argument("--latency", type=float, default=1.0, metavar="SECONDS", help="from an input sample to its "
                        "output sample; the longer, the more of what follows the network hears (12 s and more: the "
                        "offline separation of inference.py)")
    args = parser.parse_args(argv)
    if not RATES[0] <= args.rate <= RATES[1]:
        fail(f"--rate {args.rate}: give a sample rate from {RATES[0]} to {RATES[1]} Hz")
    if not 1 <= args.channels <= MAX_CHANNELS:
        fail(f"--channels {args.channels}: give 1 to {MAX_CHANNELS} channels")
    if not args.latency > 0:
        fail(f"--latency must be positive, got {args.latency:g}")
    options = separator.live_options(args.latency, args.rate)
    for stream, name, use in ((sys.stdin, "stdin", "pipe raw PCM into it"), (sys.stdout, "stdout", "pipe it into a "
                                                                              "player or a file")):
        if stream.isatty():
            fail(f"{name} is a terminal: {use} (see README, Live separation)")
    mask_fn, checkpoint, line = separator.load_mask_fn(args.checkpoint, args.cpu)
    mask_fn(torch.zeros(args.channels, 1, 512, 128), 0)  # the first call chooses kernels: not during the stream
    print(line, file=sys.stderr, flush=True)  # ready
    stream = separator.make_separator(args.rate, args.channels, mask_fn, separator.LIVE_SHIFTS,
                                      target=checkpoint.get("target", "vocals"), **options)
    worker, status = Worker(stream, args.stem, Outbox(args.channels)), Status(args)
    worker.start()
    try:
        pending = stream_pipe(args, worker, status)
    except BrokenPipeError:  # the listener has gone: nothing more to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 0
    except KeyboardInterrupt:
        print(("\n" if status.tty else "") + "live: interrupted", file=sys.stderr)
        return 130
    finally:
        worker.stop()  # before the interpreter ends: a thread inside the separator would crash its exit
    if pending:
        raise DataError(f"the input ended inside a frame: {len(pending)} byte(s) left over, a frame being "
                        f"{args.channels} channel(s) of {FORMATS[args.format].itemsize} bytes")
    return 0


if __name__ == "__main__":
    run_cli(main)
