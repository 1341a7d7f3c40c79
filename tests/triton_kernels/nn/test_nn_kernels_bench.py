"""``torchopt-lab bench-nn-kernels --quick`` runs every kernel benchmark end to end: on the CPU in
the interpreter, saying it measured nothing; on a GPU with GB/s. A CPU run without ``--quick`` and
a CUDA run without a GPU are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchopt_lab import cli

KERNELS = [
    "bias+gelu forward",
    "bias+gelu backward",
    "silu forward",
    "silu backward",
    "softmax forward",
    "softmax backward",
    "layer_norm forward",
    "layer_norm backward",
    "rms_norm forward",
    "rms_norm backward",
    "dropout forward",
    "batch_norm statistics+apply",
    "cross_entropy forward",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; the gpu test runs CUDA")
def test_bench_nn_kernels_cpu_quick_runs_every_kernel_without_claiming_a_measurement(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench-nn-kernels", "--device", "cpu", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "NOT a GPU measurement" in lines[0]
    rows = {line[:28].strip(): line[28:].split() for line in lines[2 : 2 + len(KERNELS)]}
    assert list(rows) == KERNELS
    for ours, theirs, *figures in rows.values():
        assert float(ours) > 0 and float(theirs) > 0
        assert figures == ["-", "-", "-"]
    assert lines[-1] == "ours / torch: not measured (interpreter smoke run)"


@pytest.mark.gpu
def test_bench_nn_kernels_cuda_quick_reports_bandwidth_and_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench-nn-kernels", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(quick run: timings are not measurements, tiny shapes)")
    rows = {line[:28].strip(): line[28:].split() for line in lines[2 : 2 + len(KERNELS)]}
    assert list(rows) == KERNELS
    for values in rows.values():
        assert all(float(value) > 0 for value in values)
    assert lines[-1].startswith("ours / torch: time ratio")


def test_bench_nn_kernels_refuses_a_cpu_timing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench-nn-kernels", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchopt-lab bench-nn-kernels: error: --device cpu")
    assert "only with --quick" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_nn_kernels_refuses_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """cuda is the default device: without a GPU, one line and exit 2, not a traceback."""
    assert cli.main(["bench-nn-kernels"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchopt-lab bench-nn-kernels: error: invalid --device 'cuda'")
    assert "--device cpu --quick" in err and err.count("\n") == 1


def test_bench_nn_kernels_cpu_without_the_interpreter_in_the_environment_says_how_to_run() -> None:
    # Before: the CLI set TRITON_INTERPRET itself, after importing torchopt_lab had imported
    # triton, so the first kernel died in a traceback (tl.max "outside of the scope of a kernel").
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchopt_lab.cli",
            "bench-nn-kernels",
            "--device",
            "cpu",
            "--quick",
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=Path(__file__).resolve().parents[3],
        timeout=300,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.startswith("torchopt-lab bench-nn-kernels: error: --device cpu")
    assert "TRITON_INTERPRET=1" in completed.stderr and completed.stderr.count("\n") == 1
