"""inference.py: files in, stems out, and the command line on good, bad and unusual input (errors: one line on
stderr, nothing written)."""
import numpy as np
import pytest
import soundfile as sf
import torch

import data_generator as dg
import inference
import separator
from conftest import BAD_CHECKPOINTS, write_bad_checkpoint, SONGS, assert_one_line_error, needs_shared, run_script
from unet_model import CheckpointError, load_model


def noise(channels, seconds, rate, seed=0):
    return (np.random.default_rng(seed).standard_normal((channels, int(seconds * rate))) * 0.1).astype(np.float32)


@needs_shared
@pytest.mark.parametrize("song", ["slow_motion_dream_excerpt.mp3", "karissa_hobbs_lets_go_fishin.ogg"])
def test_inference_cli_on_real_songs(tiny_checkpoint, tmp_path, song):
    path = SONGS / song
    tmp_path = tmp_path / "out"
    result = run_script("inference.py", "--audio", path, "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    info = sf.info(str(path))
    stem = path.stem
    for name in ("vocals", "accompaniment"):
        out = tmp_path / f"{stem}_{name}.wav"
        audio, rate = sf.read(str(out), dtype="float32")
        assert rate == info.samplerate == 44100
        assert audio.shape == (info.frames, 2)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}_accompaniment.wav", f"{stem}_vocals.wav"]
    assert "real time" in result.stdout


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
        inference.separate_file(path, outputs, separator.model_mask_fn(model, torch.device("cpu")))
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
    result = run_script("inference.py", "--audio", folder, folder / "missing.wav", "--checkpoint", tiny_checkpoint,
                        "--output-dir", out)
    assert_one_line_error(result)  # the first error line on stderr, none on stdout, no traceback
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad) + 1, result.stderr  # one line per bad file, each on stderr
    assert sorted(p.name for p in out.iterdir()) == ["good_accompaniment.wav", "good_vocals.wav"]
    assert "1 of 6 files separated" in result.stdout and "5 failed" in result.stdout
    assert "good.wav" in result.stdout and "real time" in result.stdout


@pytest.mark.parametrize("kind", ["empty", "text", "zero_length", "corrupt_mp3", "missing", "nan"])
def test_the_command_line_reports_a_bad_file_on_stderr_and_writes_nothing(kind, tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make_bad_file(kind, inputs)
    out = tmp_path / "out"
    result = run_script("inference.py", "--audio", path, "--checkpoint", tiny_checkpoint, "--output-dir", out)
    assert_one_line_error(result, str(path), BAD_FILES[kind])
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "error" not in result.stdout
    assert not out.exists() or not any(out.rglob("*"))  # no stems, no temporary files


def test_unwritable_output_folder(tmp_path, tiny_checkpoint):
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_script("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir",
                        blocker / "sub")
    assert_one_line_error(result, "cannot create output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "song.wav", "tiny.pth"]


def test_an_input_is_never_overwritten(tmp_path, tiny_checkpoint):
    """A Demucs-style template that would put a stem exactly on the input is refused."""
    (tmp_path / "vocals").mkdir()
    song = tmp_path / "vocals" / "song.wav"
    sf.write(str(song), tone(1, 44100), 44100)
    original = song.read_bytes()
    result = run_script("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path,
                 "--filename", "{stem}/{track}.{ext}")
    assert_one_line_error(result, "would overwrite an input")
    assert song.read_bytes() == original
    assert not (tmp_path / "accompaniment").exists() or not any((tmp_path / "accompaniment").iterdir())


def test_rerun_replaces_outputs_and_a_failed_run_keeps_the_earlier_ones(tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = separator.model_mask_fn(model, torch.device("cpu"))
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
    mask_fn = separator.model_mask_fn(model, torch.device("cpu"))
    rate_out, channels_out, frames = inference.separate_file(path, outputs, mask_fn,
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
    inference.separate_file(path, outputs, separator.model_mask_fn(model, torch.device("cpu")))
    vocals = sf.read(str(outputs["vocals"]))[0]
    assert np.isfinite(vocals).all()
    if signal_kind == "silence":
        assert np.abs(vocals).max() == 0
    else:
        assert np.abs(vocals).max() > 0.01


@pytest.mark.parametrize("problem,message", BAD_CHECKPOINTS)
def test_bad_checkpoints(problem, message, tmp_path):
    path = tmp_path / "model.pth"
    write_bad_checkpoint(problem, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, expected_spec=dg.SPEC_CONFIG)
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run_script("inference.py", "--audio", song, "--checkpoint", path)
    assert_one_line_error(result, message)
    assert "error" not in result.stdout
    expected = ["song.wav"] + ([] if problem == "missing" else ["model.pth"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)




@pytest.mark.parametrize("script,flags,message", [
    ("inference.py", ["--shifts", "0"], "--shifts must be at least 1, got 0"),
    ("inference.py", ["--filename", "{track}.{ext}"], "--filename must contain {track} and {stem}"),
    ("evaluate.py", ["--shifts", "-1", "--folder", "."], "--shifts must be at least 1, got -1"),
    ("evaluate.py", ["--shifts", "two", "--folder", "."], "argument --shifts: invalid int value: 'two'")])
def test_bad_separation_flags(script, flags, message, tmp_path, tiny_checkpoint):
    """--cpu and --shifts are declared once (add_model_args, add_separator_args) and checked one way."""
    song = tmp_path / "song.wav"
    sf.write(str(song), tone(1, 8000), 8000)
    result = run_script(script, *flags, "--checkpoint", tiny_checkpoint,
                        *(["--audio", song] if script == "inference.py" else []))
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav", "tiny.pth"]


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py"])
def test_removed_flags_are_gone(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    for flag in ("--accompaniment", "--extension", "--mask-channels", "--mask-exponent", "--overlap", "--batch-size",
                 "--no-amp", "--wiener"):
        assert flag not in result.stdout, flag
    assert "--shifts" in result.stdout and "--cpu" in result.stdout


def test_a_checkpoint_with_a_mask_exponent_is_used_with_the_masks_as_predicted(tiny_checkpoint, tmp_path):
    """Checkpoints of the previous version may hold mask_exponent: it no longer changes anything."""
    old = tmp_path / "old.pth"
    torch.save(dict(torch.load(tiny_checkpoint, weights_only=True), mask_exponent=0.5), old)
    song = tmp_path / "song.wav"
    sf.write(str(song), noise(2, 3.0, 22050).T, 22050)
    vocals = []
    for name, path in (("old", old), ("plain", tiny_checkpoint)):
        result = run_script("inference.py", "--audio", song, "--checkpoint", path, "--output-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "model: " in result.stdout and "error" not in result.stderr
        vocals.append(sf.read(str(tmp_path / name / "song_vocals.wav"), dtype="float32")[0])
    # two processes may differ in the last bits (CPU kernels can pick their path by the buffers' alignment);
    # mask^0.5 would move these samples by orders of magnitude more
    np.testing.assert_allclose(vocals[0], vocals[1], rtol=0, atol=1e-6)


def test_plot_and_flac_and_filename_template(tiny_checkpoint, tmp_path):
    song = tmp_path / "song.wav"
    sf.write(str(song), noise(2, 4.0, 16000).T, 16000)
    result = run_script("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir",
                        tmp_path / "out", "--filename", "{stem}/{track}.{ext}", "--format", "flac", "--plot",
                        "--shifts", "1", "--n-channels", "99")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("warning: --n-channels 99 ignored")
    for stem in dg.STEMS:
        audio, rate = sf.read(str(tmp_path / "out" / stem / "song.flac"))
        assert rate == 16000 and audio.shape == (4 * 16000, 2)
    assert (tmp_path / "out" / "vocals" / "song_mask.png").read_bytes()[:4] == b"\x89PNG"


def test_without_audio_the_first_test_track_of_the_dataset_is_separated(tiny_checkpoint, tmp_path):
    result = run_script("inference.py", "--synthetic", "--checkpoint", tiny_checkpoint, "--output-dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(written) == 3 and all(p.endswith((
        "_mixture.wav", "_vocals.wav", "_accompaniment.wav")) for p in written)
    assert "vocals: SDR" in result.stdout and "accompaniment: SDR" in result.stdout
