"""
Score separations with museval (BSSEval v4, 1 s windows), as SiSEC 2018 did.

    python evaluate.py --musdb-root ../shared/data/MUSDB18-7 --subset train --split valid --methods model,mix,irm
    python evaluate.py --folder my_tracks/                   # folders holding mixture.wav and vocals.wav

Every track is separated at its own sample rate and channel count through the same separator
as inference.py, and scored for vocals and accompaniment. Methods:
- model: the U-Net checkpoint;
- mix:   the mixture itself as the estimate of both stems (the floor);
- irm:   the ideal ratio mask |vocals| / |mixture| at the model's own STFT, applied through the
         same full-band path (the ceiling of this design).
museval's per-track JSON goes to --output-dir/<method>/; the summary is the median over tracks
of the median over 1 s frames of SDR, SIR, SAR and ISR.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data_generator as dg
import inference
from unet_model import CheckpointError, load_model

METRICS = ("SDR", "SIR", "SAR", "ISR")
METHODS = ("model", "mix", "irm")


def musdb_eval_tracks(root, subset, split, limit=None):
    """Yield (name, mixture, references, rate) for the tracks of a MUSDB18 folder; audio is
    (channels, samples) float32, references {'vocals', 'accompaniment'}."""
    source = dg.find_data_source(root)
    tracks = dg.musdb_tracks(source, subset, split if subset == "train" else None)
    if not tracks:
        raise dg.DataError(f"{root}: no tracks in subset {subset!r}" + (f", split {split!r}" if subset == "train" else ""))
    for track in tracks[:limit]:
        stems = dg.musdb_stems(track)
        yield track.name, stems.pop("mixture"), stems, int(track.rate)


def folder_eval_tracks(folder, limit=None):
    """Yield (name, mixture, references, rate) for track folders holding mixture.wav and
    vocals.wav (accompaniment.wav, or mixture - vocals when absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise dg.DataError(f"--folder {folder}: no such folder")
    track_dirs = sorted(d for d in folder.iterdir() if (d / "mixture.wav").exists() and (d / "vocals.wav").exists())
    if not track_dirs:
        raise dg.DataError(f"--folder {folder}: no track folders with mixture.wav and vocals.wav")
    for d in track_dirs[:limit]:
        mixture, rate = dg.load_audio(d / "mixture.wav")
        vocals, vocals_rate = dg.load_audio(d / "vocals.wav")
        if vocals_rate != rate or vocals.shape != mixture.shape:
            raise dg.DataError(f"{d}: vocals.wav does not match mixture.wav in rate, channels or length")
        if (d / "accompaniment.wav").exists():
            accompaniment, _ = dg.load_audio(d / "accompaniment.wav")
        else:
            accompaniment = mixture - vocals
        yield d.name, mixture, {"vocals": vocals, "accompaniment": accompaniment}, rate


def estimate(method, mixture, references, rate, mask_fn, options):
    """{'vocals', 'accompaniment'} estimates of one track, each (channels, samples)."""
    if method == "mix":
        return {"vocals": mixture, "accompaniment": mixture}
    if method == "irm":  # one oracle per shifted copy: each sees the recording delayed by its own amount
        mask_fn = []
        for delay in inference.shift_delays(rate, options.get("shifts", inference.DEFAULT_SHIFTS)):
            low_mixture, low_vocals = (dg.resample(inference.delayed(x, delay), rate, dg.SAMPLE_RATE)
                                       for x in (mixture, references["vocals"]))
            mask_fn.append(inference.oracle_mask_fn(low_vocals, low_mixture, options.get("overlap", 0.5)))
        options = dict(options, target="vocals", mask_channels="each")  # the oracle knows every channel
    vocals, accompaniment = inference.separate(mixture, rate, mask_fn, **options)
    return {"vocals": vocals, "accompaniment": accompaniment}


def import_museval():
    """museval, or a DataError naming what is missing (it needs ffmpeg through musdb)."""
    dg.require_ffmpeg("by museval, which scores separations (it imports musdb)")
    import museval
    return museval


def bss_eval(references, estimates, rate):
    """museval's BSSEval v4 with 1 s windows and hops. Returns {stem: {metric: [per-frame]}}."""
    museval = import_museval()
    stems = ("vocals", "accompaniment")
    ref = np.stack([references[s].T for s in stems]).astype(np.float64)  # (sources, samples, channels)
    est = np.stack([estimates[s].T for s in stems]).astype(np.float64)
    sdr, isr, sir, sar = museval.evaluate(ref, est, win=rate, hop=rate, mode="v4")
    return {stem: {"SDR": sdr[i].tolist(), "SIR": sir[i].tolist(), "SAR": sar[i].tolist(), "ISR": isr[i].tolist()}
            for i, stem in enumerate(stems)}


def target_sdr(reference, estimate, rate):
    """BSSEval v4 SDR (dB) of one stem, median over 1 s frames. reference, estimate: (channels,
    samples). v4's SDR depends only on the projection onto the stem's own reference, so scoring
    the stem alone gives the SDR bss_eval gives it among all stems, about five times faster
    (what train.py validates with after every epoch)."""
    museval = import_museval()
    sdr, _, _, _ = museval.evaluate(np.asarray(reference, np.float64).T[None], np.asarray(estimate, np.float64).T[None],
                                    win=rate, hop=rate, mode="v4")
    return frame_median(sdr[0])


def save_track_json(scores, name, path):
    """museval's own per-track JSON format."""
    museval = import_museval()
    store = museval.TrackStore(win=1.0, hop=1.0, track_name=name)
    for stem, values in scores.items():
        store.add_target(target_name=stem, values=values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(store.json)


def frame_median(values):
    """Median over 1 s frames, ignoring frames where a metric is undefined (silent reference)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def summarise(per_track):
    """{method: {stem: {metric: median over tracks of the per-track frame medians}}}."""
    summary = {}
    for method, tracks in per_track.items():
        summary[method] = {}
        for stem in ("vocals", "accompaniment"):
            summary[method][stem] = {m: float(np.nanmedian([t[stem][m] for t in tracks.values()])) for m in METRICS}
    return summary


def format_table(summary):
    lines = [f"{'method':8s} {'target':14s} " + " ".join(f"{m:>7s}" for m in METRICS)]
    for method, stems in summary.items():
        for stem, metrics in stems.items():
            lines.append(f"{method.upper():8s} {stem:14s} " + " ".join(f"{metrics[m]:7.2f}" for m in METRICS))
    return "\n".join(lines)


def evaluate(tracks, methods, mask_fn, options, output_dir=None, progress=True):
    """Score every method on every track. tracks: iterable of (name, mixture, references, rate).
    Returns (per_track {method: {track: {stem: {metric: frame median}}}}, summary)."""
    per_track = {m: {} for m in methods}
    for name, mixture, references, rate in tqdm(list(tracks) if progress else tracks, desc="tracks", unit="track",
                                                disable=not progress):
        for method in methods:
            estimates = estimate(method, mixture, references, rate, mask_fn, options)
            scores = bss_eval(references, estimates, rate)
            if output_dir is not None:
                save_track_json(scores, name, Path(output_dir) / method / f"{dg.safe_name(name)}.json")
            per_track[method][name] = {s: {m: frame_median(v) for m, v in values.items()} for s, values in scores.items()}
    return per_track, summarise(per_track)


def main():
    parser = argparse.ArgumentParser(description="Score separations of a MUSDB-style set with museval "
                                     "(BSSEval v4, 1 s windows; median over tracks of median over frames).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=inference.DEFAULT_CHECKPOINT, help="model to score (method 'model')")
    parser.add_argument("--musdb-root", default=None, help="MUSDB18 folder (stems or HQ wav)")
    parser.add_argument("--subset", default="test", choices=["train", "test"], help="MUSDB18 subset")
    parser.add_argument("--split", default="valid", choices=["train", "valid"], help="split of the train subset")
    parser.add_argument("--folder", default=None, help="instead of --musdb-root: folders holding mixture.wav and "
                        "vocals.wav (and accompaniment.wav, else mixture - vocals)")
    parser.add_argument("--methods", default="model", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--tracks", type=int, default=None, help="score only the first N tracks")
    parser.add_argument("--output-dir", default="outputs/eval", help="museval JSON per method and track, and summary.json")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--no-amp", action="store_true", help="full float32 instead of bf16/fp16 autocast")
    parser.add_argument("--overlap", type=float, default=0.5, help="patch overlap")
    parser.add_argument("--shifts", type=int, default=inference.DEFAULT_SHIFTS,
                        help="separations on frame grids 1/shifts of a hop apart, averaged (as inference.py)")
    parser.add_argument("--wiener", action="store_true", help="multichannel Wiener post-processing")
    parser.add_argument("--accompaniment", default="residual", choices=["residual", "complement"],
                        help="accompaniment as mixture minus vocals, or by the complementary mask")
    parser.add_argument("--extension", default="mean", choices=inference.EXTENSIONS,
                        help="mask above 4096 Hz: mean of the 3-4 kHz mask, its top bin, or zero (band-limited)")
    parser.add_argument("--mask-channels", default="each", choices=inference.MASK_CHANNELS,
                        help="a mask per channel, or one from the channels' mean")
    parser.add_argument("--mask-exponent", type=float, default=None, help="raise the model's masks to this power "
                        "(default: the exponent stored in the checkpoint, as inference.py)")
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        sys.exit(f"error: --methods takes {', '.join(METHODS)}; got {args.methods!r}")
    if args.shifts < 1:
        sys.exit(f"error: --shifts must be at least 1, got {args.shifts}")
    if args.mask_exponent is not None and not args.mask_exponent > 0:
        sys.exit(f"error: --mask-exponent must be positive, got {args.mask_exponent}")
    if (args.musdb_root is None) == (args.folder is None):
        sys.exit("error: give exactly one of --musdb-root or --folder")
    try:
        import_museval()  # before anything is separated
        mask_fn = None
        options = dict(overlap=args.overlap, shifts=args.shifts, wiener=args.wiener,
                       accompaniment=args.accompaniment, extension=args.extension, mask_channels=args.mask_channels)
        if "model" in methods:
            device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
            model, checkpoint = load_model(args.checkpoint, device, expected_spec=dg.SPEC_CONFIG)
            exponent = inference.checkpoint_mask_exponent(checkpoint, args.mask_exponent)
            mask_fn = inference.model_mask_fn(model, device, amp=not args.no_amp, exponent=exponent)
            options["target"] = checkpoint.get("target", "vocals")
            print(f"model: {args.checkpoint} (n_channels={checkpoint['model_config']['n_channels']}, "
                  f"target={options['target']}, epoch {checkpoint.get('epoch', '?')}, mask exponent {exponent:g})")
        tracks = (folder_eval_tracks(args.folder, args.tracks) if args.folder
                  else musdb_eval_tracks(args.musdb_root, args.subset, args.split, args.tracks))
        started = time.time()
        per_track, summary = evaluate(tracks, methods, mask_fn, options, args.output_dir)
    except (dg.DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    n = len(next(iter(per_track.values())))
    print(f"\n{n} tracks, {time.time() - started:.0f} s; median over tracks of median over 1 s frames (dB):")
    print(format_table(summary))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(dict(args=vars(args), summary=summary, per_track=per_track), indent=1))
    print(f"per-track museval JSON in {out}/<method>/, summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
