"""
The built-in synthetic multitrack set: a singer over drums, bass and chords, made in code, so that
the whole pipeline and the tests run with no dataset and no ffmpeg. It is not real music: a model
trained on it learns the idea of the task, not a useful separator. datasets.load_tracks serves
these songs for a synthetic DataSource.
"""
import numpy as np

from audio import SAMPLE_RATE, Track

SYNTHETIC_SPLIT_SIZES = {"train": 10, "valid": 6, "test": 4}  # songs per split
SYNTHETIC_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
SYNTHETIC_SECONDS = 20.0
# (F1, F2, F3) in Hz of five sung vowels, and their bandwidths
VOWELS = np.array([[800, 1150, 2800], [400, 1700, 2600], [300, 2100, 3000],
                   [450, 800, 2830], [325, 700, 2530]], dtype=np.float64)
FORMANT_BANDWIDTHS = np.array([80.0, 90.0, 120.0])
FORMANT_GAINS = np.array([1.0, 0.5, 0.25])


def synthetic_track(split, index, seed=0, rate=SAMPLE_RATE, seconds=SYNTHETIC_SECONDS):
    """One song of `split` ('train', 'valid' or 'test'), the same for the same arguments everywhere:
    a Track with vocals and accompaniment, each (2, seconds * rate) float32 at `rate`."""
    rng = np.random.default_rng([seed, SYNTHETIC_SPLIT_IDS[split], index])
    n = int(seconds * rate)
    song = synthetic_song_plan(rng)
    vocals = synth_voice(rng, song, n, rate)
    drums = synth_drums(rng, song, n, rate)
    bass = synth_bass(rng, song, n, rate)
    chords = synth_chords(rng, song, n, rate)
    stems = [(vocals, 0.12, rng.uniform(-0.15, 0.15))]
    stems += [(drums, rng.uniform(0.08, 0.16), rng.uniform(-0.3, 0.3)),
              (bass, rng.uniform(0.06, 0.12), rng.uniform(-0.1, 0.1)),
              (chords, rng.uniform(0.05, 0.1), rng.uniform(-0.6, 0.6))]
    stereo = [pan(level_rms(x, rms), position) for x, rms, position in stems]
    accompaniment = stereo[1] + stereo[2] + stereo[3]
    scale = min(1.0, 0.9 / np.abs(stereo[0] + accompaniment).max())  # headroom, as in a mastered song
    return Track(f"synthetic-{split}-{index:03d}", (stereo[0] * scale).astype(np.float32),
                 (accompaniment * scale).astype(np.float32), source="synthetic")


def synthetic_song_plan(rng):
    """Tempo, key and chord progression shared by all parts of one song."""
    beat = 60.0 / rng.uniform(80, 140)
    root = int(rng.integers(40, 52))  # MIDI note of the key's bass root (E2..D#3)
    scale = [0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.6 else [0, 2, 3, 5, 7, 8, 10]
    degrees = rng.choice([0, 3, 4, 5, 1], size=4, replace=True)
    degrees[0] = 0  # start on the tonic, so the key is heard
    return dict(beat=beat, root=root, scale=scale, progression=degrees)


def sung_melody(rng, song, n, rate):
    """The score of the voice: phrases of notes of the key with rests to breathe between them.
    Returns (note, envelope, formants, base): MIDI note (n,) (NaN in rests), syllable envelope
    (n,), vowel formants (3, n) that glide from syllable to syllable, and the voice's register."""
    beat = song["beat"]
    timbre = rng.uniform(0.85, 1.2)  # a lower or higher voice moves all formants
    base = song["root"] + 12 * int(rng.integers(1, 3))
    note, envelope, formants = np.full(n, np.nan), np.zeros(n), np.zeros((3, n))
    position, degree = rng.uniform(0, 2) * beat, int(rng.integers(0, 7))
    vowel = VOWELS[rng.integers(len(VOWELS))]
    while position < n / rate:
        phrase_end = position + beat * rng.integers(4, 12)
        while position < min(phrase_end, n / rate):
            length = beat * rng.choice([0.5, 1, 1, 1.5, 2])
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 9))
            a, b = int(position * rate), min(n, int((position + length) * rate))
            note[a:b] = base + song["scale"][degree % 7] + 12 * (degree // 7)
            seg = np.arange(b - a) / rate
            attack, release = rng.uniform(0.02, 0.06), rng.uniform(0.04, 0.1)  # breathy onsets
            envelope[a:b] = (np.minimum(1, seg / attack) * np.clip((length - seg) / release, 0, 1)
                             * rng.uniform(0.6, 1.0))
            new_vowel = VOWELS[rng.integers(len(VOWELS))] * timbre
            ramp = np.clip(seg / 0.08, 0, 1)
            formants[:, a:b] = vowel[:, None] * (1 - ramp) + new_vowel[:, None] * ramp
            vowel = new_vowel
            position += length
        position += beat * rng.choice([1, 2, 3])
    return note, envelope, formants, base


def synth_voice(rng, song, n, rate):
    """A singer: the melody with glides, vibrato and jitter; harmonics shaped by the vowel
    formants; breath noise, strongest at onsets. Returns (n,) float64."""
    note, envelope, formants, base = sung_melody(rng, song, n, rate)
    sung = ~np.isnan(note)
    # hold the last pitch through rests so that glides start from where the voice was
    idx = np.where(sung, np.arange(n), 0)
    np.maximum.accumulate(idx, out=idx)
    note = np.nan_to_num(np.where(sung, note, note[idx]), nan=base)
    glide = max(1, int(rng.uniform(0.03, 0.07) * rate))
    pitch = np.convolve(np.pad(note, (glide, glide), mode="edge"), np.ones(glide) / glide, "same")[glide:-glide]
    vibrato_rate, vibrato_depth = rng.uniform(4.8, 6.5), rng.uniform(0.2, 0.6)
    t = np.arange(n) / rate
    vibrato = vibrato_depth * np.sin(2 * np.pi * vibrato_rate * t + rng.uniform(0, 6.3))
    vibrato *= np.clip(np.convolve(envelope > 0.5, np.ones(int(0.3 * rate)) / (0.3 * rate), "same"), 0, 1)
    jitter = np.convolve(rng.standard_normal(n), np.ones(int(0.05 * rate)) / (0.05 * rate) ** 0.5, "same") * 0.03
    f0 = midi_hz(pitch + vibrato + jitter)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    n_harmonics = int(min(40, (rate / 2 - 50) / f0.min()))
    h = np.arange(1, n_harmonics + 1)[:, None]
    freq = h * f0[None]
    amp = formant_gain(freq, formants) * (freq < min(rate / 2 - 50, 10000))
    voice = np.sum(amp * np.sin(h * phase[None] + rng.uniform(0, 6.3, size=(n_harmonics, 1))), axis=0)
    breath = np.diff(rng.standard_normal(n + 1)) * 0.02  # high-frequency air
    onset = np.convolve(np.clip(np.diff(envelope, prepend=0) * rate * 0.05, 0, 1), np.ones(int(0.04 * rate)), "same")
    return voice * envelope + breath * (0.3 * envelope + np.clip(onset, 0, 1))


def formant_gain(freq, formants):
    """Spectral envelope of a vowel at the given frequencies: a sum of resonances plus a tilt.
    freq: (harmonics, samples); formants: (3, samples). Returns (harmonics, samples)."""
    gain = np.zeros_like(freq)
    for k in range(3):
        gain += FORMANT_GAINS[k] / (1 + ((freq - formants[k]) / (FORMANT_BANDWIDTHS[k] / 2)) ** 2)
    return gain + 0.02 / (1 + freq / 1000)


def synth_drums(rng, song, n, rate):
    """Kick on 1 and 3, snare on 2 and 4, hi-hats on eighths, a little humanised. Returns (n,)."""
    beat = song["beat"]
    out = np.zeros(n)
    tk, ts, th = (np.arange(int(seconds * rate)) / rate for seconds in (0.3, 0.2, 0.06))
    kick = np.sin(2 * np.pi * np.cumsum(45 + 90 * np.exp(-tk / 0.03)) / rate) * np.exp(-tk / 0.12)
    step = 0
    while step * beat / 2 < n / rate:
        start = int((step * beat / 2 + rng.normal(0, 0.004)) * rate)
        if step % 4 == 0 or (step % 8 == 7 and rng.random() < 0.3):
            add_at(out, kick, start)
        if step % 4 == 2:
            add_at(out, (rng.standard_normal(len(ts)) * 0.6 + np.sin(2 * np.pi * 185 * ts)) * np.exp(-ts / 0.06), start)
        add_at(out, np.diff(rng.standard_normal(len(th) + 1)) * np.exp(-th / 0.015) * rng.uniform(0.15, 0.3), start)
        step += 1
    return out


def synth_bass(rng, song, n, rate):
    """The chord root an octave down, plucked on a rhythm of eighths and quarters. Returns (n,)."""
    beat = song["beat"]
    out = np.zeros(n)
    position, bar = 0.0, 0
    pattern = rng.choice([[1, 1, 1, 1], [1.5, 0.5, 1, 1], [0.5, 0.5, 1, 2]])
    while position < n / rate:
        degree = song["progression"][bar % len(song["progression"])]
        root = song["root"] + song["scale"][degree % 7]
        for length in pattern * beat:
            t = np.arange(int(length * rate)) / rate
            f = midi_hz(root + (12 if rng.random() < 0.15 else 0))
            h = np.arange(1, 9)[:, None]
            tone = np.sum(np.sin(2 * np.pi * h * f * t) / h ** 1.5 * (h * f < rate / 2 - 50), axis=0)
            add_at(out, tone * np.exp(-t / 0.35) * np.minimum(1, t / 0.005), int(position * rate))
            position += length
        bar += 1
    return out


def synth_chords(rng, song, n, rate):
    """Sustained triads, one per bar, with soft attacks and a little detune. Returns (n,)."""
    bar = 4 * song["beat"]
    out = np.zeros(n)
    t = np.arange(int(bar * rate)) / rate
    env = np.minimum(1, t / 0.15) * np.clip((bar - t) / 0.2, 0, 1)
    h = np.arange(1, 7)[:, None]
    for k in range(int(np.ceil(n / rate / bar))):
        degree = song["progression"][k % len(song["progression"])]
        chord = np.zeros(len(t))
        for note in chord_notes(song, degree):
            f = midi_hz(note) * (1 + rng.normal(0, 0.002))
            chord += np.sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6.3)) / h ** 2
                            * (h * f < rate / 2 - 50), axis=0)
        add_at(out, chord * env, int(k * bar * rate))
    return out


def chord_notes(song, degree):
    """MIDI notes of the triad on a scale degree, an octave above the bass."""
    return [song["root"] + 12 + song["scale"][(degree + k) % 7] + 12 * ((degree + k) // 7) for k in (0, 2, 4)]


def midi_hz(note):
    return 440.0 * 2 ** ((np.asarray(note, dtype=np.float64) - 69) / 12)


def level_rms(x, rms):
    return x * (rms / (np.sqrt(np.mean(x ** 2)) + 1e-8))


def pan(x, position):
    """Mono (samples,) -> stereo (2, samples); position in [-1, 1], constant power."""
    angle = (position + 1) * np.pi / 4
    return np.stack([np.cos(angle) * x, np.sin(angle) * x])


def add_at(out, x, start):
    """Add x into out from sample `start`, cut at out's ends."""
    part = out[max(0, start):max(0, start) + len(x)]  # a view: adding to it adds to out
    part += x[:len(part)]
