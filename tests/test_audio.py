"""audio.py: resampling (the bad-file checks are exercised through inference.py's tests)."""
import numpy as np

import audio


def test_resample_keeps_a_tone_at_its_frequency():
    rate = 44100
    t = np.arange(rate) / rate
    tone = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)]).astype(np.float32)
    low = audio.resample(tone, rate, audio.SAMPLE_RATE)
    assert low.shape == (2, audio.SAMPLE_RATE)
    peaks = np.abs(np.fft.rfft(low, axis=1)).argmax(axis=1)  # 1 s of audio: bin == Hz
    assert list(peaks) == [440, 880]


def test_threads_decoding_at_once_leave_stderr_working(tmp_path, capfd):
    """Decoders are silenced by pointing fd 2 at /dev/null; threads decoding together (as datasets.load_all reads
    tracks) must still leave it pointing at the real stderr, or every later error line would be lost."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import soundfile as sf
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.flac")
        sf.write(str(paths[-1]), np.zeros((8000, 2), np.float32), 8000)
    with ThreadPoolExecutor(4) as pool:
        assert len(list(pool.map(audio.load_audio, paths * 10))) == 80
    os.write(2, b"still here\n")
    assert "still here" in capfd.readouterr().err
