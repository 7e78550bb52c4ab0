"""Bad input gets one clear line and a non-zero exit, and nothing is lost; unusual input works."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data_generator as dg
import inference
from conftest import REPO
from unet_model import CheckpointError, UNet, UNetConfig, load_model, save_checkpoint


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors, text
    for word in words:
        assert word in errors[0], errors[0]


def tone(seconds, rate, channels=2):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 3300 * t)
    return np.stack([x * (0.5 + 0.5 * c / max(1, channels - 1)) for c in range(channels)], axis=1).astype(np.float32)


def make_bad_file(kind, folder):
    """A damaged or unusable input of the given kind; returns its path."""
    path = folder / f"{kind}.wav"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not audio\n" * 50)
    elif kind == "zero_length":
        sf.write(str(path), np.zeros((0, 2), np.float32), 44100)
    elif kind in ("nan", "inf"):
        audio = tone(3, 44100)
        audio[44100, 0] = np.nan if kind == "nan" else np.inf
        sf.write(str(path), audio, 44100, subtype="FLOAT")
    elif kind == "truncated_wav":
        sf.write(str(path), tone(3, 44100), 44100)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "truncated_flac":
        path = path.with_suffix(".flac")
        sf.write(str(path), np.random.default_rng(0).uniform(-0.5, 0.5, (44100 * 3, 2)), 44100)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt_mp3":
        path = path.with_suffix(".mp3")
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    return path


BAD_FILES = {"missing": "no such file", "empty": "empty", "text": "not a readable audio file",
             "zero_length": "no audio samples", "nan": "NaN", "inf": "infinite", "truncated_wav": "truncated",
             "truncated_flac": "corrupt", "corrupt_mp3": "not a readable audio file"}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_audio_is_refused_and_nothing_is_written(kind, tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make_bad_file(kind, inputs)
    before = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "out"
    model, _ = load_model(tiny_checkpoint)
    outputs = inference.output_paths(path, out, "{track}_{stem}.{ext}", "wav")
    out.mkdir()
    with pytest.raises(dg.DataError, match=BAD_FILES[kind]) as error:
        inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")))
    assert "\n" not in str(error.value)
    assert list(out.iterdir()) == []  # no stems, no half-written temporary files
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_a_batch_with_bad_files_separates_the_good_ones_and_fails(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = [make_bad_file(kind, folder) for kind in ("empty", "text", "nan", "truncated_wav")]
    good = folder / "good.wav"
    sf.write(str(good), tone(2, 22050), 22050)
    out = tmp_path / "out"
    result = run("inference.py", "--audio", folder, folder / "missing.wav", "--checkpoint", tiny_checkpoint,
                 "--output-dir", out)
    assert result.returncode == 1
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad) + 1, text  # one line per bad file
    assert sorted(p.name for p in out.iterdir()) == ["good_accompaniment.wav", "good_vocals.wav"]
    assert "1 of 6 files separated" in text and "5 failed" in text


def test_unwritable_output_folder(tmp_path, tiny_checkpoint):
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", blocker / "sub")
    assert_one_line_error(result, "cannot create output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "song.wav", "tiny.pth"]


def test_an_input_is_never_overwritten(tmp_path, tiny_checkpoint):
    """A Demucs-style template that would put a stem exactly on the input is refused."""
    (tmp_path / "vocals").mkdir()
    song = tmp_path / "vocals" / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    original = song.read_bytes()
    result = run("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path,
                 "--filename", "{stem}/{track}.{ext}")
    assert_one_line_error(result, "would overwrite an input")
    assert song.read_bytes() == original
    assert not (tmp_path / "accompaniment").exists() or not any((tmp_path / "accompaniment").iterdir())


def test_rerun_replaces_outputs_and_a_failed_run_keeps_the_earlier_ones(tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"))
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(40, 8000, channels=1), 8000)
    outputs = inference.output_paths(song, tmp_path, "{track}_{stem}.{ext}", "wav")
    for p in outputs.values():
        p.write_bytes(b"old")
    inference.separate_file(song, outputs, mask_fn)
    first = {k: sf.read(str(p))[0] for k, p in outputs.items()}
    assert first["vocals"].shape == (40 * 8000,)
    # the same name now holds audio that turns bad after the first 30 s block has been written
    audio = tone(40, 8000, channels=1)
    audio[35 * 8000] = np.nan
    sf.write(str(song), audio, 8000, subtype="FLOAT")
    with pytest.raises(dg.DataError, match="NaN"):
        inference.separate_file(song, outputs, mask_fn)
    for k, p in outputs.items():
        assert np.array_equal(sf.read(str(p))[0], first[k])  # earlier results intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav", "song_accompaniment.wav", "song_vocals.wav",
                                                           "tiny.pth"]


@pytest.mark.parametrize("subtype,rate,channels,seconds", [
    ("PCM_U8", 8000, 1, 3.0), ("PCM_16", 11025, 2, 0.2), ("PCM_24", 44100, 2, 5.0), ("PCM_32", 48000, 1, 2.0),
    ("FLOAT", 96000, 2, 2.0), ("DOUBLE", 16000, 4, 1.5)])
def test_unusual_but_valid_wavs(subtype, rate, channels, seconds, tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    path = tmp_path / "in.wav"
    sf.write(str(path), tone(seconds, rate, channels), rate, subtype=subtype)
    outputs = inference.output_paths(path, tmp_path, "{track}_{stem}.{ext}", "flac" if channels == 4 else "wav")
    rate_out, channels_out, frames = inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")),
                                                             fmt="flac" if channels == 4 else "wav")
    assert (rate_out, channels_out, frames) == (rate, channels, int(seconds * rate))
    for p in outputs.values():
        audio, r = sf.read(str(p), always_2d=True)
        assert r == rate and audio.shape == (frames, channels) and np.isfinite(audio).all()


@pytest.mark.parametrize("signal_kind", ["silence", "clipped"])
def test_silence_and_clipping(signal_kind, tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    rate = 44100
    audio = np.zeros((rate * 3, 2), np.float32) if signal_kind == "silence" else np.clip(tone(3, rate) * 8, -1, 1)
    path = tmp_path / "in.wav"
    sf.write(str(path), audio, rate, subtype="PCM_16")
    outputs = inference.output_paths(path, tmp_path, "{track}_{stem}.{ext}", "wav")
    inference.separate_file(path, outputs, inference.model_mask_fn(model, torch.device("cpu")), wiener=True)
    vocals = sf.read(str(outputs["vocals"]))[0]
    assert np.isfinite(vocals).all()
    if signal_kind == "silence":
        assert np.abs(vocals).max() == 0
    else:
        assert np.abs(vocals).max() > 0.01


@pytest.mark.parametrize("problem,message", [("missing", "python train.py"), ("corrupt", "not a readable checkpoint"),
                                             ("other_stft", "hop_length=512"), ("other_width", "do not fit"),
                                             ("not_ours", "not a checkpoint written by train.py")])
def test_bad_checkpoints(problem, message, tmp_path):
    path = tmp_path / "model.pth"
    if problem == "corrupt":
        path.write_bytes(b"\x80\x02garbage" * 100)
    elif problem == "other_stft":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dict(dg.SPEC_CONFIG, hop_length=512))
    elif problem == "other_width":
        save_checkpoint(path, UNet(UNetConfig(n_channels=4)), dg.SPEC_CONFIG)
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["model_config"]["n_channels"] = 8
        torch.save(checkpoint, path)
    elif problem == "not_ours":
        torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, expected_spec=dg.SPEC_CONFIG)
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run("inference.py", "--audio", song, "--checkpoint", path)
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["song.wav"] + ([] if problem == "missing" else ["model.pth"]))


@pytest.mark.parametrize("script,flags,message", [
    ("inference.py", ["--shifts", "0"], "--shifts must be at least 1"),
    ("inference.py", ["--overlap", "1"], "--overlap must be in [0, 1)"),
    ("inference.py", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("inference.py", ["--mask-exponent", "0"], "--mask-exponent must be positive"),
    ("evaluate.py", ["--mask-exponent", "-1", "--folder", "."], "--mask-exponent must be positive"),
    ("evaluate.py", ["--shifts", "0", "--folder", "."], "--shifts must be at least 1")])
def test_bad_separation_flags(script, flags, message, tmp_path, tiny_checkpoint):
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run(script, *flags, "--checkpoint", tiny_checkpoint, *(["--audio", song] if script == "inference.py" else []))
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav", "tiny.pth"]
