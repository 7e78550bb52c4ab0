"""bench.py: it times train.py's own step, and a bad checkpoint is one line."""
import re

from conftest import assert_one_line_error, run_script


def test_training_benchmark_prints_patches_per_second(tiny_checkpoint):
    result = run_script("bench.py", "--only", "training", "--checkpoint", tiny_checkpoint, "--repeats", "1", "--cpu")
    assert result.returncode == 0, result.stderr
    rates = re.findall(r"\| training \| (.*?) \| ([\d.]+) patches/s \|", result.stdout)
    assert [what.split(",")[0] for what, _ in rates] == ["train step alone", "whole loop (data: synthetic"]
    assert "n_channels=4" in rates[0][0] and all(float(rate) > 0 for _, rate in rates)


def test_a_bad_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("bench.py", "--only", "training", "--checkpoint", path), str(path),
                          "not a readable checkpoint")
