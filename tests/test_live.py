"""live.py as a pipe: each output sample leaves exactly the latency after its input sample, the output is as long as
the input, a closed listener or Ctrl-C ends it quietly, bad input is one line on stderr, and a real song piped
through ffmpeg comes out as the live engine separates it."""
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import separator
from conftest import REPO, SONGS, assert_one_line_error, needs_shared
from unet_model import load_model

RATE = 16000


def start(checkpoint, *flags):
    return subprocess.Popen([sys.executable, str(REPO / "live.py"), "--checkpoint", str(checkpoint), "--rate",
                             str(RATE), *map(str, flags)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)


class Reader(threading.Thread):
    """Collects a process's stdout as it comes."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.data = stream, bytearray()

    def run(self):
        while chunk := self.stream.read1(65536):
            self.data += chunk

    def settled(self, seconds=0.5, timeout=30):
        """The bytes read once nothing more has come for `seconds`."""
        started, size = time.time(), -1
        while size != len(self.data) and time.time() - started < timeout:
            size = len(self.data)
            time.sleep(seconds)
        return bytes(self.data)


def test_each_output_sample_leaves_exactly_the_latency_after_its_input(tiny_checkpoint):
    """A click at 0.5 s in 3 s of silence, then the input pauses: the output holds exactly 3 s less the latency
    (1 s) and no more until the input goes on, the click at its own sample; at the end of the input the last
    second is flushed, and the output is exactly as long as the input."""
    process = start(tiny_checkpoint, "--channels", "1", "--format", "f32le", "--latency", "1", "--stem",
                    "accompaniment")
    reader = Reader(process.stdout)
    reader.start()
    audio = np.zeros(3 * RATE + 123, np.float32)
    audio[RATE // 2] = 0.9
    process.stdin.write(audio.tobytes())
    process.stdin.flush()
    out = np.frombuffer(reader.settled(seconds=2), "<f4")
    assert len(out) == len(audio) - RATE  # sample n left when sample n + latency * rate arrived, not before
    assert int(np.abs(out).argmax()) == RATE // 2 and np.abs(out).max() > 0.1  # the click, on its own sample
    process.stdin.write(np.zeros(RATE // 4, np.float32).tobytes())
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    reader.join()
    out = np.frombuffer(bytes(reader.data), "<f4")
    assert len(out) == len(audio) + RATE // 4
    status = process.stderr.read().decode()
    assert "live: accompaniment, latency 1.00 s" in status and "no underrun" in status and "0:03.3 of audio" in status


def test_the_listener_closing_the_pipe_ends_it_quietly(tiny_checkpoint):
    process = start(tiny_checkpoint, "--latency", "0.6")
    process.stdin.write(np.zeros((RATE, 2), "<i2").tobytes())
    process.stdin.flush()
    process.stdout.read(1000)
    process.stdout.close()  # the listener has gone
    try:
        for _ in range(20):
            process.stdin.write(np.zeros((RATE // 10, 2), "<i2").tobytes())
            process.stdin.flush()
            time.sleep(0.05)
    except BrokenPipeError:
        pass  # live.py has already ended
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in process.stderr.read().decode()


def test_ctrl_c_ends_it_cleanly(tiny_checkpoint):
    process = start(tiny_checkpoint)
    process.stdin.write(np.zeros((2 * RATE, 2), "<i2").tobytes())
    process.stdin.flush()
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    err = process.stderr.read().decode()
    assert "live: interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,data,message", [
    (["--channels", "2"], b"\0" * (4 * RATE + 3), "the input ended inside a frame: 3 byte(s) left over, a frame being "
                                                  "2 channel(s) of 2 bytes"),
    (["--format", "f32le", "--channels", "1"], np.full(100, np.nan, "<f4").tobytes(), "NaN or infinite"),
    (["--rate", "0"], b"", "--rate 0: give a sample rate from 8000 to 384000 Hz"),
    (["--channels", "0"], b"", "--channels 0: give 1 to 8 channels"),
    (["--latency", "0.1"], b"", "--latency 0.1 s is too short"),
    (["--format", "s24le"], b"", "argument --format: invalid choice"),
    (["--checkpoint", "/nonexistent.pth"], b"", "no such checkpoint")])
def test_bad_input_is_one_line_on_stderr(tiny_checkpoint, flags, data, message):
    result = subprocess.run([sys.executable, str(REPO / "live.py"), "--checkpoint", str(tiny_checkpoint), "--rate",
                             str(RATE), *flags], input=data, capture_output=True, timeout=120, cwd=REPO)
    result.stdout, result.stderr = result.stdout.decode("latin-1"), result.stderr.decode()
    assert_one_line_error(result, message)
    if "byte(s) left over" in message:  # the whole frames before it did come out, all of them
        assert len(result.stdout) == 4 * RATE


@needs_shared
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_a_real_song_piped_through_ffmpeg_at_its_own_pace(tiny_checkpoint, tmp_path):
    """ffmpeg plays an mp3 at its own pace (-re) into live.py, whose output ffmpeg writes to a wav: as long as the
    song, no underrun, and the live engine's separation of the same samples up to 16-bit rounding."""
    song, out = SONGS / "slow_motion_dream_excerpt.mp3", tmp_path / "vocals.wav"
    pcm = ["-f", "s16le", "-ar", "44100"]
    decoded = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(song), *pcm, "-ac", "2", "-"],
                             capture_output=True, check=True).stdout
    command = (f"ffmpeg -loglevel error -re -i '{song}' {' '.join(pcm)} -ac 2 - | '{sys.executable}' live.py "
               f"--checkpoint '{tiny_checkpoint}' --latency 1 | ffmpeg -loglevel error {' '.join(pcm)} "
               f"-ch_layout stereo -i - '{out}'")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "no underrun" in result.stderr and "0:10.9 of audio" in result.stderr
    import soundfile as sf
    vocals, rate = sf.read(str(out), dtype="float32")
    mixture = np.frombuffer(decoded, "<i2").reshape(-1, 2).T.astype(np.float32) / 32768
    assert rate == 44100 and vocals.shape == mixture.T.shape
    mask_fn = separator.model_mask_fn(load_model(tiny_checkpoint)[0], separator.choose_device(True))
    expected = separator.separate(mixture, 44100, mask_fn, shifts=separator.LIVE_SHIFTS,
                                  **separator.live_options(1.0, 44100))[0]
    assert np.abs(vocals.T - expected).max() < 2 / 32768
    assert np.abs(expected).max() > 0.01
