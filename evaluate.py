"""Score separations with museval (BSSEval v4, 1 s windows), as SiSEC 2018 did, and with the global SDR of the
MDX challenges (uSDR), so the numbers compare with both eras (scores.py). Each track goes through the separator at
its own rate and channels. Methods: model (the U-Net checkpoint); mix (the mixture as both estimates: the floor);
irm (the ideal ratio mask |vocals| / |mixture| at the model's STFT, same path: the ceiling of this design).
Per-track JSON in museval's format goes to --output-dir/<method>/, the summary to --output-dir/summary.json.

    python evaluate.py --musdb-root ../shared/data/MUSDB18-7 --subset train --split valid --methods model,mix,irm
    python evaluate.py --folder my_tracks/                   # track folders: vocals.* and accompaniment.* or mixture.*
    python evaluate.py --stems ../shared/data/MIR-1K         # the tracks train.py --stems held apart from training
    python evaluate.py --stems ../shared/data/MIR-1K --latency 1   # live.py's separation at 1 s of latency
"""
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm import tqdm

import audio
import data_generator as dg
import datasets
import separator
from scores import METRICS, bss_eval, frame_median, global_sdr, museval_metrics
from utils import DataError, Parser, atomic_write, run_cli, safe_name

METHODS = ("model", "mix", "irm")


def musdb_eval_tracks(root, subset, split, limit=None):
    """Yield (name, mixture, {stem: audio}, rate) of a MUSDB18 folder's tracks, audio (channels, samples) float32."""
    tracks = datasets.musdb_tracks(datasets.find_data_source(root), subset, split)  # split: the train subset's only
    if not tracks:
        split_text = f", split {split!r}" if subset == "train" else ""
        raise DataError(f"{root}: no tracks in subset {subset!r}{split_text}")
    for track in tracks[:limit]:
        stems = datasets.musdb_stems(track)
        yield track.name, stems.pop("mixture"), stems, int(track.rate)


def folder_eval_tracks(folder, limit=None, split="all", flag="--folder"):
    """Yield (name, mixture, references, rate), as musdb_eval_tracks, of a stems folder's tracks (any layout
    train.py --stems reads); split 'valid': only the tracks that train.py held apart from training."""
    entries = datasets.stems_split(folder, split, flag)
    if not entries:
        raise DataError(f"{flag} {folder}: no tracks to score")
    for entry in entries[:limit]:
        references, rate = datasets.read_stems(entry)
        yield entry.name, references["vocals"] + references["accompaniment"], references, rate


def eval_tracks(args):
    """The tracks of the one data source the flags name, as musdb_eval_tracks yields them."""
    if sum(map(bool, (args.musdb_root, args.folder, args.stems, args.synthetic))) != 1:
        raise DataError("give exactly one of --musdb-root, --folder, --stems or --synthetic")
    if args.musdb_root is not None:
        return musdb_eval_tracks(args.musdb_root, args.subset, args.split, args.tracks)
    if args.folder is not None:
        return folder_eval_tracks(args.folder, args.tracks)
    if args.stems:
        return (t for folder in args.stems for t in folder_eval_tracks(folder, args.tracks, "valid", "--stems"))
    tracks = datasets.load_tracks(datasets.DataSource("synthetic"), "test", args.tracks)
    return ((t.name, t.mixture, {"vocals": t.vocals, "accompaniment": t.accompaniment}, dg.SAMPLE_RATE) for t in tracks)


def estimate(method, mixture, references, rate, mask_fn, options):
    """{'vocals', 'accompaniment'} estimates of one track, each (channels, samples); options as for
    separator.separate, or with latency (seconds) instead of shifts: live.py's separation at that latency."""
    if method == "mix":
        return {"vocals": mixture, "accompaniment": mixture}
    if options.get("latency") is not None:
        options = dict(options, shifts=separator.LIVE_SHIFTS, **separator.live_options(options["latency"], rate))
    options = {k: v for k, v in options.items() if k != "latency"}
    if method == "irm":  # one oracle per shifted copy: each sees the recording delayed by its own amount
        low = [audio.resample(x, rate, dg.SAMPLE_RATE) for x in (references["vocals"], mixture)]
        hop = options.get("hop", separator.PATCH_HOP)
        mask_fn = [separator.oracle_mask_fn(*(separator.delayed(x, delay) for x in low), hop)
                   for delay in separator.shift_delays(options["shifts"])]
        options = dict(options, target="vocals")
    return dict(zip(audio.STEMS, separator.separate(mixture, rate, mask_fn, **options)))


def save_track_json(scores, path):
    """Per-frame scores as museval.TrackStore writes them (5 decimals, infinite as NaN), for museval's tools."""
    q = lambda x: round(x, 5) if np.isfinite(x) else float("nan")  # noqa: E731
    frames = lambda values: [{"time": float(i), "duration": 1.0, "metrics": {m: q(values[m][i]) for m in METRICS}}  # noqa: E731
                             for i in range(len(values["SDR"]))]
    targets = [{"name": stem, "frames": frames(values)} for stem, values in scores.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(
        json.dumps({"targets": targets, "museval_version": version("museval")}, indent=2)))


def summarise(per_track):
    """{method: {stem: {metric: median over tracks of the per-track frame medians, uSDR: mean over tracks}}}."""
    return {method: {stem: {**{m: float(np.nanmedian([t[stem][m] for t in tracks.values()])) for m in METRICS},
                            "uSDR": float(np.mean([t[stem]["uSDR"] for t in tracks.values()]))}
                     for stem in audio.STEMS}
            for method, tracks in per_track.items()}


def format_table(summary, columns=METRICS + ("uSDR",)):
    lines = [f"{'method':8s} {'target':14s} " + " ".join(f"{m:>7s}" for m in columns)]
    lines += [f"{method.upper():8s} {stem:14s} " + " ".join(f"{metrics[m]:7.2f}" for m in columns)
              for method, stems in summary.items() for stem, metrics in stems.items()]
    return "\n".join(lines)


def evaluate(tracks, methods, mask_fn, options, output_dir=None, progress=True):
    """Score every method on (name, mixture, references, rate) tracks; options as for estimate.
    Returns (per_track {method: {track: {stem: {metric: frame median, uSDR}}}}, summary)."""
    per_track = {m: {} for m in methods}
    for name, mixture, references, rate in tqdm(tracks, desc="tracks", unit="track", disable=not progress):
        for method in methods:
            estimates = estimate(method, mixture, references, rate, mask_fn, options)
            scores = bss_eval(references, estimates, rate)
            if output_dir is not None:
                save_track_json(scores, Path(output_dir) / method / f"{safe_name(name)}.json")
            per_track[method][name] = {stem: {**{m: frame_median(v) for m, v in values.items()},
                                              "uSDR": global_sdr(references[stem], estimates[stem])}
                                       for stem, values in scores.items()}
    return per_track, summarise(per_track)


def main():
    parser = Parser("Score separations of a MUSDB-style set with museval (BSSEval v4, 1 s windows) and uSDR.")
    separator.add_model_args(parser)
    datasets.add_data_args(parser)
    parser.add_argument("--subset", default="test", choices=["train", "test"], help="MUSDB18 subset")
    parser.add_argument("--split", default="valid", choices=["train", "valid"], help="split of the train subset")
    parser.add_argument("--folder", default=None, help="instead of --musdb-root: every track of a folder of track "
                        "folders (vocals.* with accompaniment.*, mixture.* or drums/bass/other.*)")
    parser.add_argument("--methods", default="model", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--tracks", type=int, default=None, help="score only the first N tracks")
    parser.add_argument("--output-dir", default="outputs/eval", help="per-track JSON per method, and summary.json")
    separator.add_separator_args(parser)
    parser.add_argument("--latency", type=float, default=None, metavar="SECONDS", help="score live.py's separation "
                        "at this latency instead (its single pass: --shifts does not apply)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise DataError(f"--methods takes {', '.join(METHODS)}; got {args.methods!r}")
    separator.check_separator_args(args)
    tracks = eval_tracks(args)
    museval_metrics()  # before anything is separated
    mask_fn, options = None, dict(shifts=args.shifts, latency=args.latency)
    if "model" in methods:
        mask_fn, checkpoint, line = separator.load_mask_fn(args.checkpoint, args.cpu)
        options["target"] = checkpoint.get("target", "vocals")
        print(line)
    started = time.time()
    per_track, summary = evaluate(tracks, methods, mask_fn, options, args.output_dir)
    print(f"\n{len(per_track[methods[0]])} tracks, {time.time() - started:.0f} s; median over tracks of median "
          f"over 1 s frames, uSDR: mean over tracks of the whole-track SDR (dB)"
          + (f"; live, latency {args.latency:g} s:" if args.latency is not None else ":"))
    print(format_table(summary))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(
        json.dumps(dict(args=vars(args), summary=summary, per_track=per_track), indent=1)))
    print(f"per-track JSON in {out}/<method>/, summary in {out / 'summary.json'}")


if __name__ == "__main__":
    run_cli(main)
