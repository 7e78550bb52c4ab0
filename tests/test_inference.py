"""inference.py: the streaming separator against a plain whole-array reference, and the command
line on good, bad and unusual input (errors: one line on stderr, nothing written)."""
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import data_generator as dg
import inference
from conftest import BAD_CHECKPOINTS, write_bad_checkpoint, SONGS, assert_one_line_error, needs_shared, run_script
from unet_model import CheckpointError, load_model


def ones_mask(patches, first_patch):
    return torch.ones_like(patches)


def noise(channels, seconds, rate, seed=0):
    return (np.random.default_rng(seed).standard_normal((channels, int(seconds * rate))) * 0.1).astype(np.float32)


def cpu_mask_fn(checkpoint, batch_size=16):
    return inference.model_mask_fn(load_model(checkpoint)[0], torch.device("cpu"), batch_size)


@pytest.mark.parametrize("rate", [8000, 8192, 22050, 44100, 96000])
@pytest.mark.parametrize("channels,seconds", [(1, 0.2), (2, 13.1), (3, 2.0)])
def test_a_mask_of_ones_gives_back_the_input(rate, channels, seconds):
    audio = noise(channels, seconds, rate)
    vocals, accompaniment = inference.separate(audio, rate, ones_mask)
    assert vocals.shape == audio.shape and vocals.dtype == np.float32
    assert np.abs(vocals - audio).max() < 1e-5
    assert np.abs(accompaniment).max() < 1e-5


@pytest.mark.parametrize("shifts", [1, 2])
def test_streaming_in_small_blocks_equals_one_block(tiny_checkpoint, shifts):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"), batch_size=4)
    rate = 22050
    calls = []
    counted = lambda patches, first: calls.append(first) or mask_fn(patches, first)
    audio = noise(2, 150.3, rate, seed=1)  # long enough for several groups of patches per network call
    whole = inference.separate(audio, rate, mask_fn, shifts=shifts)
    separator = inference.make_separator(rate, 2, counted, shifts=shifts)
    parts = [separator.process(audio[:, i:i + 12345]) for i in range(0, audio.shape[1], 12345)]
    parts.append(separator.finish())
    for k in range(2):
        streamed = np.concatenate([p[k] for p in parts], axis=1)
        assert streamed.shape == audio.shape
        assert np.abs(streamed - whole[k]).max() < 1e-5
    assert np.abs(whole[0]).max() > 0.01  # the model let something through
    assert len(calls) > shifts  # the stream did call the network more than once per copy


def reference_separation(audio, rate, mask_fn, shifts=1):
    """The separator written the plain way, on whole arrays, to check the streaming engine: with
    shifts, the masks of copies of the 8192 Hz signal delayed by shift_delays samples, realigned and
    averaged; the last patch filled past the end with the recording from its start (short inputs are one group)."""
    hop = inference.PATCH_HOP
    n_fft, hop_f = inference.full_band_stft_size(rate)
    window = torch.hann_window(n_fft)
    padded = np.pad(audio, ((0, 0), (0, hop_f)))  # a last frame centred at or past the end, as the separator's
    spec = torch.stft(torch.from_numpy(padded), n_fft, hop_f, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    times = np.arange(spec.shape[-1]) * hop_f / rate
    masks = []  # each copy's mask at the full-rate frames' times, (C, 512, full-rate frames)
    resampled = soxr.resample(audio.T, rate, dg.SAMPLE_RATE, quality="HQ").T
    for delay in inference.shift_delays(shifts):
        low = torch.from_numpy(inference.delayed(resampled, delay).copy())
        frames = dg.n_frames(low.shape[1])
        grid = (dg.n_patches(frames, hop) - 1) * hop + dg.PATCH_FRAMES  # past the end: the music again from its start
        filled = dg.loop_to(low, (grid - 1) * dg.HOP_LENGTH + dg.N_FFT // 2)
        patches = dg.to_patches(dg.stft(filled).abs()[..., :grid], hop)
        mask = dg.from_patches(mask_fn(patches, 0), hop, frames).numpy()  # (C, 512, frames)
        at = (times * dg.SAMPLE_RATE + delay) / dg.HOP_LENGTH
        masks.append([[np.interp(at, np.arange(frames), mask[c, b]) for b in range(512)] for c in range(len(audio))])
    mean_mask = np.mean(masks, axis=0)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    full = np.zeros(spec.shape, np.float32)
    for c in range(audio.shape[0]):
        in_time = mean_mask[c]  # (512, full-rate frames)
        inside = freqs <= 511 * 8
        for j in range(in_time.shape[1]):
            full[c, inside, j] = np.interp(freqs[inside] / 8, np.arange(512), in_time[:, j])
            full[c, ~inside, j] = in_time[-128:, j].mean()
    vocals = torch.istft(torch.from_numpy(full) * spec, n_fft, hop_f, window=window, center=True, length=audio.shape[1])
    return vocals.numpy()


@pytest.mark.parametrize("rate,seconds", [(44100, 20.0), (16000, 3.3)])
def test_streaming_engine_matches_a_plain_whole_array_implementation(tiny_checkpoint, rate, seconds):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = inference.model_mask_fn(model, torch.device("cpu"))
    audio = noise(2, seconds, rate, seed=2)
    vocals, accompaniment = inference.separate(audio, rate, mask_fn, shifts=1)
    expected = reference_separation(audio, rate, mask_fn)
    assert np.abs(vocals - expected).max() < 1e-4 * np.abs(audio).max()
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_shifts_average_the_masks_of_delayed_copies(tiny_checkpoint):
    """shifts=N masks the one full-rate STFT with the mean of the masks of N copies of the 8192 Hz
    signal delayed by k/N of the network's hop (768 samples), each realigned to the input."""
    assert inference.shift_delays(2) == [0, 384]
    assert inference.shift_delays(4) == [0, 192, 384, 576]
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    rate = 22050
    audio = noise(2, 9.7, rate, seed=6)
    vocals, accompaniment = inference.separate(audio, rate, mask_fn, shifts=3)
    assert vocals.shape == audio.shape
    assert np.abs(vocals - reference_separation(audio, rate, mask_fn, shifts=3)).max() < 1e-4 * np.abs(audio).max()
    one_pass = inference.separate(audio, rate, mask_fn, shifts=1)[0]
    assert np.abs(vocals - one_pass).max() > 1e-3  # the copies' masks do differ: their frames fall elsewhere
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_wiener_statistics_do_not_depend_on_the_block_of_frames_separated_together(tiny_checkpoint, monkeypatch):
    """The Wiener filter's statistics cover WIENER_FRAMES frames on the file's grid, however many
    frames the separator transforms at once (FULL_BAND_BLOCK)."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    audio = noise(2, 30.0, 22050, seed=8)
    big = inference.separate(audio, 22050, mask_fn, shifts=1, wiener=True)
    monkeypatch.setattr(inference, "FULL_BAND_BLOCK", inference.WIENER_FRAMES)
    small = inference.separate(audio, 22050, mask_fn, shifts=1, wiener=True)
    assert np.abs(big - small).max() < 1e-5
    assert np.abs(big[0] - inference.separate(audio, 22050, mask_fn, shifts=1)[0]).max() > 1e-3  # Wiener acted


def test_no_seams_at_patch_borders():
    """Patches that disagree strongly (mask 0.2, 0.8, 0.2, ...) are cross-faded: the output level of
    a steady noise changes gradually, not in steps at the borders."""
    def alternating(patches, first_patch):
        index = torch.arange(first_patch, first_patch + patches.shape[1])
        return (0.2 + 0.6 * (index % 2)).float()[None, :, None, None].expand_as(patches).clone()

    rate = 22050
    audio = noise(1, 40, rate, seed=3)
    vocals, _ = inference.separate(audio, rate, alternating)
    window = rate // 10
    level = np.sqrt(np.mean(vocals[0, :len(vocals[0]) // window * window].reshape(-1, window) ** 2, axis=1))
    steps = np.abs(np.diff(level)) / level[:-1]
    assert level.max() / level.min() > 2.5  # the masks did act
    assert steps.max() < 0.15, f"level jumps by {steps.max():.0%} within 0.1 s"


def test_full_band_output_keeps_energy_above_4khz():
    rate = 44100
    audio = noise(2, 5, rate, seed=4)
    vocals, _ = inference.separate(audio, rate, lambda p, f: torch.full_like(p, 0.5))
    spectrum = np.abs(np.fft.rfft(vocals[0]))
    freqs = np.fft.rfftfreq(vocals.shape[1], 1 / rate)
    high = spectrum[(freqs > 5000) & (freqs < 20000)].mean()
    low = spectrum[(freqs > 500) & (freqs < 3500)].mean()
    assert high > 0.8 * low  # white noise stays white: the band above 4 kHz is not cut off


def test_stereo_output_differs_between_channels_when_the_input_does(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    audio = noise(2, 8, 44100, seed=5)
    vocals, _ = inference.separate(audio, 44100, inference.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).mean() > 0.1 * np.abs(vocals).mean()
    same = np.repeat(audio[:1], 2, axis=0)
    vocals, _ = inference.separate(same, 44100, inference.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).max() < 1e-6


def test_link_channels_pulls_stereo_masks_together_where_the_channels_sound_alike():
    masks = torch.tensor([[0.2, 0.2, 0.2], [0.6, 0.6, 0.6]])
    magnitude = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]])  # alike, right silent, right twice as loud
    linked = inference.link_channels(masks, magnitude)
    assert torch.allclose(linked, torch.tensor([[0.4, 0.2, 0.36], [0.4, 0.6, 0.44]]))
    assert torch.equal(inference.link_channels(masks[:1], magnitude[:1]), masks[:1])  # mono: untouched


def test_the_model_links_the_channels_of_a_stereo_recording(tiny_checkpoint):
    fn = inference.model_mask_fn(load_model(tiny_checkpoint)[0], torch.device("cpu"))
    patches = torch.rand(2, 2, 512, 128, generator=torch.Generator().manual_seed(0))
    own = torch.cat([fn(patches[c:c + 1], 0) for c in range(2)])  # each channel alone, as mono
    both = fn(patches, 0)
    assert torch.allclose(both, inference.link_channels(own, patches), atol=1e-6)
    assert (both - own).abs().max() > 1e-3


def test_a_voice_panned_hard_left_keeps_its_own_mask(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    left = noise(1, 6, 44100, seed=6)
    stereo = np.concatenate([left, np.zeros_like(left)])
    fn = inference.model_mask_fn(model, torch.device("cpu"))
    vocals, _ = inference.separate(stereo, 44100, fn)
    alone, _ = inference.separate(left, 44100, fn)
    assert np.abs(vocals[0] - alone[0]).max() < 1e-5 * np.abs(left).max() and not vocals[1].any()
    centred, _ = inference.separate(np.concatenate([left, left]), 44100, fn)  # both alike: each gets the same
    assert np.abs(centred[0] - alone[0]).max() < 1e-5 * np.abs(left).max()


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
    result = run_script("inference.py", "--audio", song, "--checkpoint", tiny_checkpoint, "--output-dir", blocker / "sub")
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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["song.wav"] + ([] if problem == "missing" else ["model.pth"]))




@pytest.mark.parametrize("script,flags,message", [
    ("inference.py", ["--shifts", "0"], "--shifts must be at least 1, got 0"),
    ("inference.py", ["--filename", "{track}.{ext}"], "--filename must contain {track} and {stem}"),
    ("evaluate.py", ["--shifts", "-1", "--folder", "."], "--shifts must be at least 1, got -1"),
    ("evaluate.py", ["--shifts", "two", "--folder", "."], "argument --shifts: invalid int value: 'two'")])
def test_bad_separation_flags(script, flags, message, tmp_path, tiny_checkpoint):
    """--cpu, --shifts and --wiener are declared once (add_separator_args) and checked one way."""
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
                 "--no-amp"):
        assert flag not in result.stdout, flag
    assert "--shifts" in result.stdout and "--wiener" in result.stdout and "--cpu" in result.stdout


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
                        "--shifts", "1", "--wiener", "--n-channels", "99")
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


def test_separate_returns_the_stems_and_the_mask_the_stream_used(tiny_checkpoint):
    """return_mask gives the mask computed in one piece; the stream, which computes it in pieces,
    separates with the same mask (a mask of ones: the input itself)."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    audio = noise(2, 5.0, dg.SAMPLE_RATE, seed=7)
    stems, mask = inference.separate(audio, dg.SAMPLE_RATE, mask_fn, return_mask=True, shifts=1)
    assert stems.shape == (2, *audio.shape) and mask.shape == (2, dg.N_BINS, dg.n_frames(audio.shape[1]))
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1
    expected = reference_separation(audio, dg.SAMPLE_RATE, mask_fn)
    assert np.abs(stems[0] - expected).max() < 1e-4 * np.abs(audio).max()
