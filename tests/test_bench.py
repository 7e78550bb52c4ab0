"""bench.py: it names the machine, times train.py's own step and inference.py next to the floor, and a bad
checkpoint is one line. Speed is reported, never asserted."""
import os
import re

from conftest import assert_one_line_error, run_script


def test_training_benchmark_names_the_machine_and_prints_patches_per_second(tiny_checkpoint):
    result = run_script("bench.py", "--only", "training", "--checkpoint", tiny_checkpoint, "--repeats", "1", "--cpu")
    assert result.returncode == 0, result.stderr
    header = result.stdout.split("\n\n")[0]
    for word in ("machine:", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "torch", "threads", "kernels",
                 "CPU autocast:", "date:"):
        assert word in header, header
    rates = re.findall(r"\| training \| (.*?) \| ([\d.]+) patches/s \|", result.stdout)
    names = [what.split(",")[0].split(" (")[0] for what, _ in rates]
    assert names[0] == "step alone" and "float32" in rates[0][0] and "n_channels=4" in rates[0][0]
    assert names[-1] == "step and batches as train.py builds them" and len(rates) in (2, 3)
    assert all(float(rate) > 0 for _, rate in rates)


def test_inference_benchmark_times_inference_and_the_floor(tiny_checkpoint):
    result = run_script("bench.py", "--only", "inference", "--checkpoint", tiny_checkpoint, "--seconds", "2",
                        "--repeats", "1", "--cpu")
    assert result.returncode == 0, result.stderr
    floor = re.search(r"\| inference \| floor: .*? \| ([\d.]+) s \|", result.stdout)
    model = re.search(r"\| inference \| inference.py end to end .*? \| ([\d.]+) s \| ([\d.]+)x the floor",
                      result.stdout)
    assert floor and model, result.stdout
    assert abs(float(model[1]) / float(floor[1]) - float(model[2])) < 0.01 + 0.01 * float(model[2])


def test_kernels_capped_below_the_cpu_are_named(tiny_checkpoint):
    """On a CPU with AVX-512, oneDNN and ATen capped at AVX2 stand in for an AVX2 machine: the header says so,
    and the CPU then runs float32, as an AVX2 machine would."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    result = run_script("bench.py", "--only", "training", "--checkpoint", tiny_checkpoint, "--repeats", "1", "--cpu",
                        env=env)
    assert result.returncode == 0, result.stderr
    header = result.stdout.split("\n\n")[0]
    assert "kernels AVX2 (capped: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)" in header, header
    assert "CPU autocast: float32" in header, header


def test_a_bad_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("bench.py", "--only", "training", "--checkpoint", path), str(path),
                          "not a readable checkpoint")
