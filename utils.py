"""Helpers every script shares, at the bottom of the import graph: the errors that end a run in one line, warnings,
atomic writes, the command line's parser and the choice of device."""
import argparse
import os
import sys
from pathlib import Path

import torch


class DataError(Exception):
    """A problem with the user's input (file, folder, dataset, stream) that deserves one clear line."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or does not match; one line for the user."""


def fail(message):
    """End the program with one `error:` line on stderr and exit status 1."""
    sys.exit(f"error: {message}")


def warn(message):
    """One line on stderr, so that warnings never mix with a script's results on stdout."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_cli(main):
    """A script's entry point: main()'s return value is the exit status; a DataError or CheckpointError raised
    anywhere ends the program in one line."""
    try:
        sys.exit(main())
    except (DataError, CheckpointError) as e:
        fail(e)


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help and a wrong flag reported in one line, as every error here."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message):
        fail(message)


def add_device_arg(parser):
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")


def choose_device(cpu=False):
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def partial_path(path, suffix=""):
    """Where a file is written before it is renamed into place: hidden, beside it, one per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")


def atomic_write(path, write, suffix=""):
    """write(tmp) to a file beside path, then rename it into place: readers see the old file or the new one whole,
    also when the run is killed. suffix: an ending the writer insists on."""
    tmp = partial_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_name(name):
    """A file-name-safe form of a track name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
