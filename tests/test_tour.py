"""tour.ipynb, the guided tour: committed without outputs, and executed top to bottom as a student
runs it (with a shorter training run) on the shared MUSDB18 previews and on the synthetic set."""
import math
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

import datasets
from conftest import MUSDB7, REPO, SHARED, needs_ffmpeg, needs_shared

NOTEBOOK = REPO / "tour.ipynb"
TRAIN_STEPS = 6  # enough for the loss to fall clearly, short enough for a test
# a row of evaluate.format_table with the tour's columns: SDR SIR SAR uSDR
SCORE_ROW = re.compile(r"^(MIX|MODEL|IRM) +(vocals|accompaniment) +(\S+) +(\S+) +(\S+) +(\S+)$", re.M)


def read_notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_committed_without_outputs_and_with_its_parameters_first():
    nb = read_notebook()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert re.search(r"^MUSDB_ROOT = None\b", code[0].source, re.M), code[0].source
    assert re.search(r"^TRAIN_STEPS = \d+", code[0].source, re.M), code[0].source


def snapshot(root):
    """{path: (size, mtime)} of the files under root, leaving out what is allowed to change: git's
    and Python's caches and the decoded-audio cache the scripts share."""
    skip = {".git", ".venv", "cache", "__pycache__", ".pytest_cache"}
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return files


def execute(**parameters):
    """Run the notebook in a fresh python3 kernel with cwd = the repo, its parameter cell rewritten;
    returns (all printed text, the executed notebook). Checks that it wrote nothing outside cache/
    in the repo and nothing in ../shared."""
    nb = read_notebook()
    cell = next(c for c in nb.cells if c.cell_type == "code")
    for name, value in dict(TRAIN_STEPS=TRAIN_STEPS, TRAIN_MINUTES=30, **parameters).items():
        cell.source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", cell.source, flags=re.M)
        assert count == 1, f"parameter {name} not in the first code cell"
    before = [snapshot(REPO), snapshot(SHARED) if SHARED.is_dir() else {}]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert [snapshot(REPO), snapshot(SHARED) if SHARED.is_dir() else {}] == before
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for output in c.outputs
                   if "image/png" not in output.get("data", {}) and "text/html" not in output.get("data", {}))
    return text, nb


def check_story(text, nb):
    """What every run of the tour shows, whatever the data."""
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # spectrograms, patches, oracle, loss, masks
    players = sum("<audio" in o.get("data", {}).get("text/html", "") for o in outputs)
    assert players >= 7, players  # mixture, vocals, oracle x2, separated mixture, vocals, accompaniment
    assert re.search(r"^encoder 6 +-> \(1, 512, 8, 2\)", text, re.M), text  # the bottleneck
    assert re.search(r"^output +-> \(1, 1, 512, 128\)", text, re.M), text
    trained = re.search(r"trained (\d+) steps in \d+ s: loss (\d+\.\d+) \(steps 1-\d+\) -> (\d+\.\d+)", text)
    assert trained, text
    assert int(trained[1]) == TRAIN_STEPS
    assert float(trained[3]) < float(trained[2]) - 0.02, trained[0]  # the loss fell
    scores = {(m, stem): [float(x) for x in values] for m, stem, *values in SCORE_ROW.findall(text)}
    assert len(scores) == 6, text
    assert all(math.isfinite(x) for row in scores.values() for x in row), scores
    for column in (0, 3):  # SDR and uSDR of the vocals: the oracle mask is far above doing nothing
        assert scores["IRM", "vocals"][column] > scores["MIX", "vocals"][column] + 5, scores
    return scores


@pytest.mark.slow
@needs_shared
@needs_ffmpeg
def test_tour_on_the_musdb18_previews(tmp_path):
    text, nb = execute(MUSDB_ROOT=str(MUSDB7), CHECKPOINT=str(tmp_path / "no_checkpoint.pth"))
    assert f"dataset: MUSDB18 .stem.mp4 at {MUSDB7}" in text
    assert re.search(r"listening to '.+': vocals at \d+% of the mixture's RMS", text), text
    assert "separating with the tour's model of part 7 (6 training steps" in text
    assert re.search(r"separating '.+': 2 channels, 6\.\d s at 44100 Hz", text), text  # at the recording's rate
    check_story(text, nb)


def test_tour_on_the_synthetic_set(tiny_checkpoint):
    found = [root for root in (REPO / "MUSDB18" / "musdb18", REPO / "MUSDB18" / "musdb18hq", datasets.PREVIEW_DIR)
             if datasets.musdb_layout(root) is not None]
    if found:
        pytest.skip(f"{found[0]} holds MUSDB18, which the tour prefers to the synthetic set")
    text, nb = execute(CHECKPOINT=str(tiny_checkpoint))  # MUSDB_ROOT stays None
    assert "dataset: built-in SYNTHETIC multitrack set" in text
    assert "the tour runs on the built-in synthetic set" in text
    assert f"separating with the trained model: {tiny_checkpoint}" in text
    assert re.search(r"separating 'synthetic-valid-\d+': 2 channels, 20\.0 s at 8192 Hz", text), text
    check_story(text, nb)
