"""
Separate the vocals of songs with a trained U-Net: files in, stems out, through the engine in separator.py.

    python inference.py --audio song.wav            # writes song_vocals.wav and song_accompaniment.wav
    python inference.py --audio a.mp3 b.flac albums/ --output-dir separated/
    python inference.py                             # the first test track of train.py's dataset

Each file streams through the separator in blocks, so memory stays flat for any duration; the stems keep the
input's rate, channels and length, and are renamed into place only once complete.
"""
import collections
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

import audio
import data_generator as dg
import datasets
import separator
from scores import global_sdr
from utils import DataError, Parser, atomic_write, partial_path, run_cli, safe_name, warn

READ_SECONDS = 30  # input block length; any value gives the same output
PLOT_SECONDS = 600  # --plot pictures the first 10 minutes


def separate_file(path, outputs, mask_fn, fmt="wav", plot=None, **options):
    """Stream one audio file through the separator into its two stem files, outputs {'vocals': path,
    'accompaniment': path}: each is written to a temporary file beside it and renamed only once complete, so a
    failure never leaves a half-written stem or destroys an earlier one. plot: a PNG path for a picture of the
    first minutes. options: shifts, target. Returns the input's (rate, channels, frames)."""
    info = audio.check_audio_file(path)
    temporary = {stem: partial_path(p) for stem, p in outputs.items()}
    try:
        stream = separator.make_separator(info.samplerate, info.channels, mask_fn, **options)
        with contextlib.ExitStack() as stack:
            writers = {stem: stack.enter_context(sf.SoundFile(
                str(tmp), "w", info.samplerate, info.channels, format=fmt.upper(),
                subtype="FLOAT" if fmt == "wav" else "PCM_24")) for stem, tmp in temporary.items()}
            frames = stream_file(path, info, stream, writers)
        if plot:
            save_separation_plot(plot, path, mask_fn)
        for stem, tmp in temporary.items():
            os.replace(tmp, outputs[stem])
        return info.samplerate, info.channels, frames
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def stream_file(path, info, stream, writers):
    """Read the file block by block through the separator into the writers -> frames read; DataError if damaged.
    The stems are written by a second thread while the separator works on the next blocks: encoding and the
    transposing copies release the GIL and mostly run while a core would otherwise wait. At most two blocks' stems
    wait for it, so memory stays bounded, and a block that only gathers samples (its patches are not ready yet)
    does not wait for the large write before it. (Reading stays here: the decoder silences the process's stderr
    while it runs, which must not hide this thread's messages.)"""
    def write(stems):
        for stem, part in zip(audio.STEMS, stems):
            writers[stem].write(part.T if writers[stem].subtype == "FLOAT" else np.clip(part.T, -1, 1))

    frames, queued = 0, collections.deque()
    with audio.open_audio(path) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        while (block := audio.read_block(reader, path, READ_SECONDS * info.samplerate)).shape[0]:
            audio.check_audio_samples(path, block)
            frames += block.shape[0]
            queued.append(writer.submit(write, stream.process(block.T)))
            while len(queued) > 2:  # bounded memory; a failed write stops the file here
                queued.popleft().result()
        audio.check_audio_length(path, info, frames)
        queued.append(writer.submit(write, stream.finish()))
        for job in queued:
            job.result()
    return frames


def save_separation_plot(path, audio_path, mask_fn):
    """separator.separation_figure of the first minutes of an audio file as a PNG, written atomically."""
    import matplotlib.pyplot as plt
    with audio.open_audio(audio_path) as reader:
        low = audio.resample(audio.read_block(reader, audio_path, PLOT_SECONDS * reader.samplerate).T,
                             reader.samplerate, dg.SAMPLE_RATE)
    fig = separator.separation_figure(low, separator.predicted_mask(low, mask_fn), Path(audio_path).name)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def expand_inputs(paths):
    """Files and folders (their audio files, sorted) -> list of Paths; folders must hold audio."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.suffix.lower() in audio.AUDIO_EXTENSIONS and not f.name.startswith("."))
            if not found:
                raise DataError(f"{p}: folder holds no audio files ({', '.join(audio.AUDIO_EXTENSIONS)})")
            files.extend(found)
        else:
            files.append(p)
    return files


def output_paths(path, output_dir, template, fmt):
    """{'vocals': Path, 'accompaniment': Path} of one input; fields: {track} (name without suffix), {stem}, {ext}."""
    folder = Path(output_dir) if output_dir else Path(path).parent
    return {stem: folder / template.format(track=Path(path).stem, stem=stem, ext=fmt) for stem in audio.STEMS}


def check_outputs(outputs, inputs):
    """Refuse outputs that would overwrite an input or each other, or whose folder cannot be written."""
    paths = [Path(p) for p in outputs.values()]
    if len({p.resolve() for p in paths}) < len(paths):
        raise DataError(f"--filename gives the same name to both stems ({paths[0]}); include {{stem}}")
    for p in paths:
        if p.resolve() in {Path(i).resolve() for i in inputs}:
            raise DataError(f"{p}: output would overwrite an input file; change --output-dir or --filename")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{p.parent}: cannot create output folder ({e.strerror})") from None
        if not os.access(p.parent, os.W_OK):
            raise DataError(f"{p.parent}: output folder is not writable")


def main():
    parser = Parser("Separate vocals and accompaniment with a trained U-Net. Writes <track>_vocals.wav and <track>_"
                    "accompaniment.wav beside each input (or in --output-dir) at its rate, channels and length.")
    parser.add_argument("--audio", nargs="+", default=None, metavar="PATH", help="audio files (wav, flac, ogg, "
                        "mp3, aiff) or folders of them; without it, the first test track of train.py's dataset")
    separator.add_model_args(parser)
    parser.add_argument("--output-dir", default=None, help="where the stems go (default: beside each input; "
                        "outputs/ for a dataset track)")
    parser.add_argument("--filename", default="{track}_{stem}.{ext}", help="output name; fields {track} {stem} {ext}")
    parser.add_argument("--format", default="wav", choices=["wav", "flac"], help="wav: 32-bit float; flac: 24-bit")
    parser.add_argument("--n-channels", type=int, default=None, help="accepted for compatibility with the "
                        "original scripts; the checkpoint already knows its width")
    separator.add_separator_args(parser)
    parser.add_argument("--plot", action="store_true", help="also save <track>_mask.png: mixture spectrogram, "
                        "predicted mask and vocal spectrogram of the first 10 minutes")
    datasets.add_data_args(parser)
    args = parser.parse_args()
    separator.check_separator_args(args)
    if "{track}" not in args.filename or "{stem}" not in args.filename:
        raise DataError(f"--filename must contain {{track}} and {{stem}} (got {args.filename!r})")
    mask_fn, checkpoint, line = separator.load_mask_fn(args.checkpoint, args.cpu)
    if args.n_channels not in (None, checkpoint["model_config"]["n_channels"]):
        warn(f"--n-channels {args.n_channels} ignored; the checkpoint knows its width")
    print(line)
    options = dict(target=checkpoint.get("target", "vocals"), shifts=args.shifts)
    if args.audio is None:
        return separate_dataset_track(args, mask_fn, options)
    return separate_files(expand_inputs(args.audio), args, mask_fn, options)


def separate_files(inputs, args, mask_fn, options):
    """Separate each input; a bad file gets its error line on stderr and is skipped -> exit status, 1 if any failed."""
    from tqdm import tqdm
    failed, started = 0, time.time()
    for path in tqdm(inputs, desc="files", unit="file", disable=len(inputs) < 2):
        try:
            info = audio.check_audio_file(path)  # first, so that a bad input creates nothing
            outputs = output_paths(path, args.output_dir, args.filename, args.format)
            check_outputs(outputs, inputs)
            plot = outputs["vocals"].with_name(f"{Path(path).stem}_mask.png") if args.plot else None
            t0 = time.time()
            separate_file(path, outputs, mask_fn, args.format, plot=plot, **options)
            seconds, elapsed = info.frames / info.samplerate, time.time() - t0
            tqdm.write(f"{path}: {seconds:.1f} s, {info.samplerate} Hz, {info.channels} ch -> "
                       + ", ".join(map(str, [*outputs.values()] + ([plot] if plot else [])))
                       + f" ({elapsed:.1f} s, {seconds / elapsed:.0f}x real time)")
        except (DataError, OSError) as e:
            failed += 1
            reason = e if isinstance(e, DataError) else f"{path}: cannot write the stems ({e.strerror or e})"
            tqdm.write(f"error: {reason}", file=sys.stderr)
    if len(inputs) > 1:
        print(f"{len(inputs) - failed} of {len(inputs)} files separated in {time.time() - started:.1f} s"
              + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def separate_dataset_track(args, mask_fn, options):
    """The original behaviour: separate the first test track of train.py's dataset (the first validation track if
    there is none, as in the shared previews and stems folders), write its mixture and stems to outputs/, score
    them against the truth."""
    source = datasets.find_data_source(args.musdb_root, synthetic=args.synthetic, stems=args.stems)
    if source.kind == "musdb":
        tracks = datasets.musdb_tracks(source, "test") or datasets.musdb_tracks(source, "train", "valid")
        if not tracks:
            raise DataError(f"{source.root}: no test or validation tracks")
        name, rate, stems = tracks[0].name, int(tracks[0].rate), datasets.musdb_stems(tracks[0])
    else:
        track = datasets.load_tracks(source, "test" if source.kind == "synthetic" else "valid", 1, progress=False)[0]
        stems = dict(mixture=track.mixture, vocals=track.vocals, accompaniment=track.accompaniment)
        name, rate = track.name, dg.SAMPLE_RATE
    print(f"no --audio given: separating {name} from the {source.describe()}")
    estimates = separator.separate(stems["mixture"], rate, mask_fn, **options)
    estimates = dict(zip(audio.STEMS, estimates), mixture=stems["mixture"])
    for stem, samples in estimates.items():
        path = Path(args.output_dir or "outputs") / safe_name(f"{name}_{stem}.wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, x=samples: sf.write(str(tmp), x.T, rate, subtype="FLOAT", format="WAV"))
        print(f"  wrote {path}")
    for stem in audio.STEMS:
        print(f"  {stem}: SDR {global_sdr(stems[stem], estimates[stem]):.2f} dB over the whole track "
              f"(the mixture itself scores {global_sdr(stems[stem], stems['mixture']):.2f} dB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
