"""separator.py: the streaming engine against a plain whole-array reference, its masks and cross-fades, and the
live engine: the offline output at full look-ahead, the same output whatever the blocks, each sample on time."""
import numpy as np
import pytest
import soxr
import torch

import data_generator as dg
import separator
from unet_model import load_model


def ones_mask(patches, first_patch):
    return torch.ones_like(patches)


def noise(channels, seconds, rate, seed=0):
    return (np.random.default_rng(seed).standard_normal((channels, int(seconds * rate))) * 0.1).astype(np.float32)


def cpu_mask_fn(checkpoint, batch_size=16):
    return separator.model_mask_fn(load_model(checkpoint)[0], torch.device("cpu"), batch_size)


@pytest.mark.parametrize("rate", [8000, 8192, 22050, 44100, 96000])
@pytest.mark.parametrize("channels,seconds", [(1, 0.2), (2, 13.1), (3, 2.0)])
def test_a_mask_of_ones_gives_back_the_input(rate, channels, seconds):
    audio = noise(channels, seconds, rate)
    vocals, accompaniment = separator.separate(audio, rate, ones_mask)
    assert vocals.shape == audio.shape and vocals.dtype == np.float32
    assert np.abs(vocals - audio).max() < 1e-5
    assert np.abs(accompaniment).max() < 1e-5


@pytest.mark.parametrize("shifts", [1, 2])
def test_streaming_in_small_blocks_equals_one_block(tiny_checkpoint, shifts):
    model, _ = load_model(tiny_checkpoint)
    mask_fn = separator.model_mask_fn(model, torch.device("cpu"), batch_size=4)
    rate = 22050
    calls = []
    counted = lambda patches, first: calls.append(first) or mask_fn(patches, first)
    audio = noise(2, 150.3, rate, seed=1)  # long enough for several groups of patches per network call
    whole = separator.separate(audio, rate, mask_fn, shifts=shifts)
    stream = separator.make_separator(rate, 2, counted, shifts=shifts)
    parts = [stream.process(audio[:, i:i + 12345]) for i in range(0, audio.shape[1], 12345)]
    parts.append(stream.finish())
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
    hop = separator.PATCH_HOP
    n_fft, hop_f = separator.full_band_stft_size(rate)
    window = torch.hann_window(n_fft)
    padded = np.pad(audio, ((0, 0), (0, hop_f)))  # a last frame centred at or past the end, as the separator's
    spec = torch.stft(torch.from_numpy(padded), n_fft, hop_f, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    times = np.arange(spec.shape[-1]) * hop_f / rate
    masks = []  # each copy's mask at the full-rate frames' times, (C, 512, full-rate frames)
    resampled = soxr.resample(audio.T, rate, dg.SAMPLE_RATE, quality="HQ").T
    for delay in separator.shift_delays(shifts):
        low = torch.from_numpy(separator.delayed(resampled, delay).copy())
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
    mask_fn = separator.model_mask_fn(model, torch.device("cpu"))
    audio = noise(2, seconds, rate, seed=2)
    vocals, accompaniment = separator.separate(audio, rate, mask_fn, shifts=1)
    expected = reference_separation(audio, rate, mask_fn)
    assert np.abs(vocals - expected).max() < 1e-4 * np.abs(audio).max()
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_shifts_average_the_masks_of_delayed_copies(tiny_checkpoint):
    """shifts=N masks the one full-rate STFT with the mean of the masks of N copies of the 8192 Hz
    signal delayed by k/N of the network's hop (768 samples), each realigned to the input."""
    assert separator.shift_delays(2) == [0, 384]
    assert separator.shift_delays(4) == [0, 192, 384, 576]
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    rate = 22050
    audio = noise(2, 9.7, rate, seed=6)
    vocals, accompaniment = separator.separate(audio, rate, mask_fn, shifts=3)
    assert vocals.shape == audio.shape
    assert np.abs(vocals - reference_separation(audio, rate, mask_fn, shifts=3)).max() < 1e-4 * np.abs(audio).max()
    one_pass = separator.separate(audio, rate, mask_fn, shifts=1)[0]
    assert np.abs(vocals - one_pass).max() > 1e-3  # the copies' masks do differ: their frames fall elsewhere
    assert np.allclose(vocals + accompaniment, audio, atol=1e-6)


def test_no_seams_at_patch_borders():
    """Patches that disagree strongly (mask 0.2, 0.8, 0.2, ...) are cross-faded: the output level of
    a steady noise changes gradually, not in steps at the borders."""
    def alternating(patches, first_patch):
        index = torch.arange(first_patch, first_patch + patches.shape[1])
        return (0.2 + 0.6 * (index % 2)).float()[None, :, None, None].expand_as(patches).clone()

    rate = 22050
    audio = noise(1, 40, rate, seed=3)
    vocals, _ = separator.separate(audio, rate, alternating)
    window = rate // 10
    level = np.sqrt(np.mean(vocals[0, :len(vocals[0]) // window * window].reshape(-1, window) ** 2, axis=1))
    steps = np.abs(np.diff(level)) / level[:-1]
    assert level.max() / level.min() > 2.5  # the masks did act
    assert steps.max() < 0.15, f"level jumps by {steps.max():.0%} within 0.1 s"


def test_full_band_output_keeps_energy_above_4khz():
    rate = 44100
    audio = noise(2, 5, rate, seed=4)
    vocals, _ = separator.separate(audio, rate, lambda p, f: torch.full_like(p, 0.5))
    spectrum = np.abs(np.fft.rfft(vocals[0]))
    freqs = np.fft.rfftfreq(vocals.shape[1], 1 / rate)
    high = spectrum[(freqs > 5000) & (freqs < 20000)].mean()
    low = spectrum[(freqs > 500) & (freqs < 3500)].mean()
    assert high > 0.8 * low  # white noise stays white: the band above 4 kHz is not cut off


def test_stereo_output_differs_between_channels_when_the_input_does(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    audio = noise(2, 8, 44100, seed=5)
    vocals, _ = separator.separate(audio, 44100, separator.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).mean() > 0.1 * np.abs(vocals).mean()
    same = np.repeat(audio[:1], 2, axis=0)
    vocals, _ = separator.separate(same, 44100, separator.model_mask_fn(model, torch.device("cpu")))
    assert np.abs(vocals[0] - vocals[1]).max() < 1e-6


def test_link_channels_pulls_stereo_masks_together_where_the_channels_sound_alike():
    masks = torch.tensor([[0.2, 0.2, 0.2], [0.6, 0.6, 0.6]])
    magnitude = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]])  # alike, right silent, right twice as loud
    linked = separator.link_channels(masks, magnitude)
    assert torch.allclose(linked, torch.tensor([[0.4, 0.2, 0.36], [0.4, 0.6, 0.44]]))
    assert torch.equal(separator.link_channels(masks[:1], magnitude[:1]), masks[:1])  # mono: untouched


def test_the_model_links_the_channels_of_a_stereo_recording(tiny_checkpoint):
    fn = separator.model_mask_fn(load_model(tiny_checkpoint)[0], torch.device("cpu"))
    patches = torch.rand(2, 2, 512, 128, generator=torch.Generator().manual_seed(0))
    own = torch.cat([fn(patches[c:c + 1], 0) for c in range(2)])  # each channel alone, as mono
    both = fn(patches, 0)
    assert torch.allclose(both, separator.link_channels(own, patches), atol=1e-6)
    assert (both - own).abs().max() > 1e-3


def test_a_voice_panned_hard_left_keeps_its_own_mask(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    left = noise(1, 6, 44100, seed=6)
    stereo = np.concatenate([left, np.zeros_like(left)])
    fn = separator.model_mask_fn(model, torch.device("cpu"))
    vocals, _ = separator.separate(stereo, 44100, fn)
    alone, _ = separator.separate(left, 44100, fn)
    # a batch of two channels against one: the network's kernels may round differently (bf16 on some CPUs)
    assert np.abs(vocals[0] - alone[0]).max() < 1e-4 * np.abs(left).max() and not vocals[1].any()
    centred, _ = separator.separate(np.concatenate([left, left]), 44100, fn)  # both alike: each gets the same
    assert np.abs(centred[0] - alone[0]).max() < 1e-4 * np.abs(left).max()



def test_separate_returns_the_stems_and_the_mask_the_stream_used(tiny_checkpoint):
    """return_mask gives the mask computed in one piece; the stream, which computes it in pieces,
    separates with the same mask (a mask of ones: the input itself)."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    audio = noise(2, 5.0, dg.SAMPLE_RATE, seed=7)
    stems, mask = separator.separate(audio, dg.SAMPLE_RATE, mask_fn, return_mask=True, shifts=1)
    assert stems.shape == (2, *audio.shape) and mask.shape == (2, dg.N_BINS, dg.n_frames(audio.shape[1]))
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1
    expected = reference_separation(audio, dg.SAMPLE_RATE, mask_fn)
    assert np.abs(stems[0] - expected).max() < 1e-4 * np.abs(audio).max()


# -----------------------------------------------------------------------------
# the live engine: a separator with a look-ahead

def stream_blocks(audio, rate, mask_fn, block, **options):
    """The separator fed `block` samples at a time -> (vocals, accompaniment) and, after each block, how many
    samples had been fed and how many had come out."""
    stream = separator.make_separator(rate, audio.shape[0], mask_fn, **options)
    parts, progress, fed, out = [], [], 0, 0
    for i in range(0, audio.shape[1], block):
        parts.append(stream.process(audio[:, i:i + block]))
        fed, out = fed + audio[:, i:i + block].shape[1], out + parts[-1][0].shape[1]
        progress.append((fed, out))
    parts.append(stream.finish())
    return np.stack([np.concatenate([p[k] for p in parts], axis=1) for k in range(2)]), progress


def test_live_options_follow_the_latency():
    """A latency of 12 s or more leaves the mask every patch of the offline grid; 1 s, patches every LIVE_HOP
    frames; too short a latency is one line that says how short it may be."""
    assert separator.live_options(13.0, 44100)["hop"] == separator.PATCH_HOP
    one = separator.live_options(1.0, 44100)
    assert one["hop"] == separator.LIVE_HOP and 0 < one["lookahead"] < separator.patch_samples(0, 1)[1]
    assert separator.live_options(2.0, 44100)["lookahead"] - one["lookahead"] == dg.SAMPLE_RATE
    with pytest.raises(separator.DataError, match=r"--latency 0.2 s is too short at 44100 Hz: give at least 0\.\d\d s"):
        separator.live_options(0.2, 44100)


@pytest.mark.parametrize("shifts", [1, 2])
def test_live_at_full_look_ahead_gives_the_offline_separation(tiny_checkpoint, shifts):
    """With 13 s of latency the live engine masks each patch of the offline grid as soon as its samples arrive,
    one at a time, and every frame still gets all of its patches: 100 s (two network calls' worth of patches
    offline, so the end is filled as offline fills it) come out as inference.py separates them."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    rate = 16000
    audio = noise(2, 100.0, rate, seed=11)
    offline = separator.separate(audio, rate, mask_fn, shifts=shifts)
    live, progress = stream_blocks(audio, rate, mask_fn, 4000, shifts=shifts, **separator.live_options(13.0, rate))
    assert live.shape == offline.shape
    assert np.abs(live - offline).max() < 1e-5 * np.abs(audio).max()
    assert progress[-1][1] > audio.shape[1] - 13 * rate  # ... and well before the end


def test_live_output_is_final_within_the_latency_and_does_not_depend_on_the_blocks(tiny_checkpoint):
    """At 1 s, every sample is out once the input has run (latency - LIVE_MARGIN) past it, whatever the blocks;
    the blocks do not change the output, which is as long as the input and differs from the offline one."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    rate = 44100
    audio = noise(2, 20.0, rate, seed=12)[:, :-777]
    options = dict(shifts=1, **separator.live_options(1.0, rate))
    small, progress = stream_blocks(audio, rate, mask_fn, 256, **options)
    assert all(out >= fed - (1.0 - separator.LIVE_MARGIN) * rate for fed, out in progress)
    assert max(fed - out for fed, out in progress) > 0.5 * rate  # it does use most of what the latency allows
    large, _ = stream_blocks(audio, rate, mask_fn, 30011, **options)
    assert small.shape == large.shape == (2, *audio.shape)
    assert np.abs(small - large).max() < 1e-6
    assert np.allclose(small[0] + small[1], audio, atol=1e-6)
    assert np.abs(small - separator.separate(audio, rate, mask_fn, shifts=1)).max() > 1e-3


@pytest.mark.parametrize("latency", [0.5, 1.0, 2.0])
def test_live_output_never_depends_on_input_beyond_the_latency(tiny_checkpoint, latency):
    """Two inputs that differ only from sample T on give the same output up to T - (latency - LIVE_MARGIN) * rate:
    the live engine looks no further ahead than it may."""
    mask_fn = cpu_mask_fn(tiny_checkpoint)
    rate, changed = 22050, 10 * 22050
    first = noise(2, 16.0, rate, seed=13)
    second = first.copy()
    second[:, changed:] = noise(2, 6.0, rate, seed=14)
    options = dict(shifts=1, **separator.live_options(latency, rate))
    a, b = (stream_blocks(x, rate, mask_fn, 1000, **options)[0] for x in (first, second))
    reach = changed - int((latency - separator.LIVE_MARGIN) * rate)
    assert np.array_equal(a[:, :, :reach], b[:, :, :reach])
    assert np.abs(a[:, :, reach:changed] - b[:, :, reach:changed]).max() > 1e-4  # it does look that far


def test_live_patches_before_the_recording_hold_the_recording_again():
    """A live patch that starts before the recording (its first seconds) is filled with what it holds of the
    recording, again and again, ending where the recording starts: as four copies of it in a row. Before a second of
    the recording has come, and in the recording's first offline patch (half a window before it), silence stays."""
    music = torch.randn(2, dg.PATCH_SAMPLES // 4, generator=torch.Generator().manual_seed(0))  # 3 s
    segment = torch.cat([torch.zeros(2, dg.PATCH_SAMPLES - music.shape[1]), music], dim=-1)
    filled = separator.early_patch(segment, music.shape[1] - dg.PATCH_SAMPLES)
    assert torch.allclose(filled, dg.stft(music.repeat(1, 4), center=False).abs(), atol=1e-4)
    assert torch.equal(separator.early_patch(segment, -dg.N_FFT // 2), dg.stft(segment, center=False).abs())
    heard = dg.SAMPLE_RATE - 1  # samples of the recording so far: not quite a second
    short = torch.cat([torch.zeros(2, dg.PATCH_SAMPLES - heard), music[:, :heard]], dim=-1)
    assert torch.equal(separator.early_patch(short, heard - dg.PATCH_SAMPLES), dg.stft(short, center=False).abs())
