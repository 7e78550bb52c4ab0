"""Score separations with museval (BSSEval v4, 1 s windows), as SiSEC 2018 did, and with the global SDR of the
MDX challenges (uSDR), so the numbers compare with both eras. Each track goes through inference.py's separator at
its own rate and channels. Methods: model (the U-Net checkpoint); mix (the mixture as both estimates: the floor);
irm (the ideal ratio mask |vocals| / |mixture| at the model's STFT, same path: the ceiling of this design).
Per-track JSON in museval's format goes to --output-dir/<method>/, the summary to --output-dir/summary.json.

    python evaluate.py --musdb-root ../shared/data/MUSDB18-7 --subset train --split valid --methods model,mix,irm
    python evaluate.py --folder my_tracks/                   # track folders: vocals.* and accompaniment.* or mixture.*
    python evaluate.py --stems ../shared/data/MIR-1K         # the tracks train.py --stems held apart from training
"""
import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data_generator as dg
import inference
from unet_model import CheckpointError

METRICS = ("SDR", "SIR", "SAR", "ISR")
METHODS = ("model", "mix", "irm")


def musdb_eval_tracks(root, subset, split, limit=None):
    """Yield (name, mixture, {stem: audio}, rate) of a MUSDB18 folder's tracks, audio (channels, samples) float32."""
    tracks = dg.musdb_tracks(dg.find_data_source(root), subset, split)  # split applies to the train subset only
    if not tracks:
        split_text = f", split {split!r}" if subset == "train" else ""
        raise dg.DataError(f"{root}: no tracks in subset {subset!r}{split_text}")
    for track in tracks[:limit]:
        stems = dg.musdb_stems(track)
        yield track.name, stems.pop("mixture"), stems, int(track.rate)


def folder_eval_tracks(folder, limit=None, split="all", flag="--folder"):
    """Yield (name, mixture, references, rate), as musdb_eval_tracks, of a stems folder's tracks (any layout
    train.py --stems reads); split 'valid': only the tracks that train.py held apart from training."""
    entries = dg.stems_split(folder, split, flag)
    if not entries:
        raise dg.DataError(f"{flag} {folder}: no tracks to score")
    for entry in entries[:limit]:
        references, rate = dg.read_stems(entry)
        yield entry.name, references["vocals"] + references["accompaniment"], references, rate


def estimate(method, mixture, references, rate, mask_fn, options):
    """{'vocals', 'accompaniment'} estimates of one track, each (channels, samples)."""
    if method == "mix":
        return {"vocals": mixture, "accompaniment": mixture}
    if method == "irm":  # one oracle per shifted copy: each sees the recording delayed by its own amount
        low = [dg.resample(x, rate, dg.SAMPLE_RATE) for x in (references["vocals"], mixture)]
        mask_fn = [inference.oracle_mask_fn(*(inference.delayed(x, delay) for x in low))
                   for delay in inference.shift_delays(options["shifts"])]
        options = dict(options, target="vocals")
    return dict(zip(dg.STEMS, inference.separate(mixture, rate, mask_fn, **options)))  # (vocals, accompaniment)


@functools.lru_cache(maxsize=None)
def museval_metrics():
    """museval's metrics.py (BSSEval v4) alone, so scoring needs no ffmpeg: `import museval` (stempeg) does."""
    package = importlib.util.find_spec("museval")  # finds the package without running its __init__
    if package is None:
        raise dg.DataError("museval not installed, needed to score separations (pip install museval)")
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
    sdr, isr, sir, sar = bss_eval_v4(*(np.stack([x[s].T for s in dg.STEMS]) for x in (references, estimates)), rate)
    return {stem: {m: v[i].tolist() for m, v in zip(METRICS, (sdr, sir, sar, isr))} for i, stem in enumerate(dg.STEMS)}


def target_sdr(reference, estimate, rate):
    """Median over 1 s frames of one stem's BSSEval v4 SDR (dB), (channels, samples): v4's SDR depends only on the
    stem's own reference, so scored alone it equals bss_eval's, for less work (what train.py validates with)."""
    return frame_median(bss_eval_v4(np.asarray(reference).T[None], np.asarray(estimate).T[None], rate)[0][0])


def global_sdr(reference, estimate, delta=1e-7):
    """The MDX challenges' SDR (uSDR, dB) over the whole track and all channels; delta keeps silence finite."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10((np.sum(reference ** 2) + delta) / (np.sum((reference - estimate) ** 2) + delta)))


def save_track_json(scores, path):
    """Per-frame scores as museval.TrackStore writes them (5 decimals, infinite as NaN), for museval's tools."""
    from importlib.metadata import version
    q = lambda x: round(x, 5) if np.isfinite(x) else float("nan")
    frames = lambda values: [{"time": float(i), "duration": 1.0, "metrics": {m: q(values[m][i]) for m in METRICS}}
                             for i in range(len(values["SDR"]))]
    targets = [{"name": stem, "frames": frames(values)} for stem, values in scores.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    dg.atomic_write(path, lambda tmp: tmp.write_text(
        json.dumps({"targets": targets, "museval_version": version("museval")}, indent=2)))


def frame_median(values):
    """Median over 1 s frames, ignoring frames where a metric is undefined (silent reference)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


def summarise(per_track):
    """{method: {stem: {metric: median over tracks of the per-track frame medians, uSDR: mean over tracks}}}."""
    return {method: {stem: {**{m: float(np.nanmedian([t[stem][m] for t in tracks.values()])) for m in METRICS},
                            "uSDR": float(np.mean([t[stem]["uSDR"] for t in tracks.values()]))}
                     for stem in dg.STEMS}
            for method, tracks in per_track.items()}


def format_table(summary, columns=METRICS + ("uSDR",)):
    lines = [f"{'method':8s} {'target':14s} " + " ".join(f"{m:>7s}" for m in columns)]
    lines += [f"{method.upper():8s} {stem:14s} " + " ".join(f"{metrics[m]:7.2f}" for m in columns)
              for method, stems in summary.items() for stem, metrics in stems.items()]
    return "\n".join(lines)


def evaluate(tracks, methods, mask_fn, options, output_dir=None, progress=True):
    """Score every method on (name, mixture, references, rate) tracks; options as for inference.separate.
    Returns (per_track {method: {track: {stem: {metric: frame median, uSDR}}}}, summary)."""
    per_track = {m: {} for m in methods}
    for name, mixture, references, rate in tqdm(tracks, desc="tracks", unit="track", disable=not progress):
        for method in methods:
            estimates = estimate(method, mixture, references, rate, mask_fn, options)
            scores = bss_eval(references, estimates, rate)
            if output_dir is not None:
                save_track_json(scores, Path(output_dir) / method / f"{dg.safe_name(name)}.json")
            per_track[method][name] = {stem: {**{m: frame_median(v) for m, v in values.items()},
                                              "uSDR": global_sdr(references[stem], estimates[stem])}
                                       for stem, values in scores.items()}
    return per_track, summarise(per_track)


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
        "Score separations of a MUSDB-style set with museval (BSSEval v4, 1 s windows) and uSDR."))
    parser.add_argument("--checkpoint", default=inference.DEFAULT_CHECKPOINT, help="model to score (method 'model')")
    parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (stems or HQ wav)")
    parser.add_argument("--subset", default="test", choices=["train", "test"], help="MUSDB18 subset")
    parser.add_argument("--split", default="valid", choices=["train", "valid"], help="split of the train subset")
    parser.add_argument("--folder", default=None, help="instead of --musdb-root: every track of a folder of track "
                        "folders (vocals.* with accompaniment.*, mixture.* or drums/bass/other.*)")
    parser.add_argument("--stems", default=None, help="instead of --musdb-root: the tracks of a stems folder that "
                        "train.py --stems holds apart from training (e.g. MIR-1K's last two singers)")
    parser.add_argument("--methods", default="model", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--tracks", type=int, default=None, help="score only the first N tracks")
    parser.add_argument("--output-dir", default="outputs/eval", help="per-track JSON per method, and summary.json")
    inference.add_separator_args(parser)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as every error here
    args = parser.parse_args()
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods or any(m not in METHODS for m in methods):
            raise dg.DataError(f"--methods takes {', '.join(METHODS)}; got {args.methods!r}")
        inference.check_separator_args(args)
        if sum(x is not None for x in (args.musdb_root, args.folder, args.stems)) != 1:
            raise dg.DataError("give exactly one of --musdb-root, --folder or --stems")
        museval_metrics()  # before anything is separated
        mask_fn, options = None, dict(shifts=args.shifts, wiener=args.wiener)
        if "model" in methods:
            mask_fn, checkpoint, line = inference.load_mask_fn(args.checkpoint, args.cpu)
            options["target"] = checkpoint.get("target", "vocals")
            print(line)
        if args.musdb_root is not None:
            tracks = musdb_eval_tracks(args.musdb_root, args.subset, args.split, args.tracks)
        elif args.folder is not None:
            tracks = folder_eval_tracks(args.folder, args.tracks)
        else:
            tracks = folder_eval_tracks(args.stems, args.tracks, "valid", "--stems")
        started = time.time()
        per_track, summary = evaluate(tracks, methods, mask_fn, options, args.output_dir)
    except (dg.DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(f"\n{len(per_track[methods[0]])} tracks, {time.time() - started:.0f} s; median over tracks of median "
          f"over 1 s frames, uSDR: mean over tracks of the whole-track SDR (dB):")
    print(format_table(summary))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dg.atomic_write(out / "summary.json", lambda tmp: tmp.write_text(
        json.dumps(dict(args=vars(args), summary=summary, per_track=per_track), indent=1)))
    print(f"per-track JSON in {out}/<method>/, summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
