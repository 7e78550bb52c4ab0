"""The scores of a separation, in one place: museval's BSSEval v4 (SDR, SIR, SAR, ISR over 1 s windows, as SiSEC
2018 reported them) and the MDX challenges' global SDR (uSDR). museval's metrics module is loaded on its own, so
scoring needs no ffmpeg (`import museval` does, through stempeg)."""
import functools
import importlib.util
from pathlib import Path

import numpy as np

from audio import STEMS
from utils import DataError

METRICS = ("SDR", "SIR", "SAR", "ISR")


@functools.lru_cache(maxsize=None)
def museval_metrics():
    """museval's metrics.py (BSSEval v4) alone: the package's __init__ imports musdb and stempeg."""
    package = importlib.util.find_spec("museval")  # finds the package without running its __init__
    if package is None:
        raise DataError("museval not installed, needed to score separations (pip install museval)")
    spec = importlib.util.spec_from_file_location("museval_metrics", Path(package.origin).parent / "metrics.py")
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    return metrics


def bss_eval_v4(references, estimates, rate):
    """museval.evaluate, 1 s windows: (sources, samples, channels) arrays -> (SDR, ISR, SIR, SAR), (sources, frames)."""
    return museval_metrics().bss_eval(np.asarray(references, np.float64), np.asarray(estimates, np.float64),
                                      compute_permutation=False, window=rate, hop=rate, framewise_filters=False,
                                      bsseval_sources_version=False)[:4]


def bss_eval(references, estimates, rate):
    """BSSEval v4 of both stems, {stem: (channels, samples)} -> {stem: {metric: [per-frame]}}."""
    sdr, isr, sir, sar = bss_eval_v4(*(np.stack([x[s].T for s in STEMS]) for x in (references, estimates)), rate)
    return {stem: {m: v[i].tolist() for m, v in zip(METRICS, (sdr, sir, sar, isr))} for i, stem in enumerate(STEMS)}


def target_sdr(reference, estimate, rate):
    """Median over 1 s frames of one stem's BSSEval v4 SDR (dB), (channels, samples): v4's SDR depends only on the
    stem's own reference, so scored alone it equals bss_eval's, for less work (what train.py validates with)."""
    return frame_median(bss_eval_v4(np.asarray(reference).T[None], np.asarray(estimate).T[None], rate)[0][0])


def global_sdr(reference, estimate, delta=1e-7):
    """The MDX challenges' SDR (uSDR, dB) over the whole track and all channels; delta keeps silence finite."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10((np.sum(reference ** 2) + delta) / (np.sum((reference - estimate) ** 2) + delta)))


def frame_median(values):
    """Median over 1 s frames, ignoring frames where a metric is undefined (silent reference)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")
