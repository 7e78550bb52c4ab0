"""utils.py and the shape of the house: one-line errors, atomic writes, and modules that import each other
without a cycle (low-level helpers at the bottom, the scripts on top)."""
import ast

import pytest

import utils
from conftest import REPO


def imports_of_the_modules():
    """{module: the top-level modules it imports, anywhere in its file} for every script of the repo."""
    modules = {p.stem: p for p in REPO.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = found & set(modules) - {name}
    return graph


def test_no_import_cycles_and_the_helpers_at_the_bottom():
    graph = imports_of_the_modules()
    order, done = [], set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        if module not in done:
            for other in sorted(graph[module]):
                visit(other, path + [module])
            done.add(module)
            order.append(module)
    for module in sorted(graph):
        visit(module, [])
    assert graph["utils"] == set() and graph["audio"] == {"utils"}
    assert "data_generator" not in graph["unet_model"] and graph["separator"] <= {"data_generator", "unet_model",
                                                                                  "utils", "audio"}
    assert not any(script in graph[m] for m in graph for script in ("train", "inference", "evaluate", "live", "bench"))


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "model.pth"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        utils.atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    utils.atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_a_wrong_flag_or_a_bad_input_ends_in_one_error_line():
    parser = utils.Parser("x")
    parser.add_argument("--n", type=int, default=1)
    with pytest.raises(SystemExit, match="^error: argument --n: invalid int value: 'two'$"):
        parser.parse_args(["--n", "two"])

    def main():
        raise utils.DataError("song.wav: no such file")
    with pytest.raises(SystemExit, match="^error: song.wav: no such file$"):
        utils.run_cli(main)
