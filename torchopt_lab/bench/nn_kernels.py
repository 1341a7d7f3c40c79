"""``torchopt-lab bench-nn-kernels``: each layer kernel of ``triton_kernels.nn`` against torch's own
op in the same run, and cross-entropy's peak memory and time against torch at a language-model
size (``batch x sequence = 8192`` rows, a 50257-token vocabulary).

GB/s is the kernel's minimum traffic (every tensor it must read or write, once) over its median
time; the same byte count is used for torch's op, so the two GB/s columns compare like for like and
``ratio`` = ours / torch time (below 1: ours is faster). Cross-entropy runs forward + backward
through ``torchopt_lab.nn.functional.cross_entropy`` on the Triton path (``reduction="mean"``), and
its peak memory is what the step allocates beyond the logits and targets.

``--device cuda`` (the default) is the measurement. ``--device cpu --quick`` is a smoke run on tiny
shapes through the Triton interpreter: it checks that every benchmark runs end to end and prints
no GB/s, since interpreter times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as TF

from torchopt_lab import backend
from torchopt_lab._arguments import UsageError, check_device, refuse_overridden_by_quick

CROSS_ENTROPY_ROWS = 8192
CROSS_ENTROPY_VOCABULARY = 50257


@dataclass(frozen=True)
class Benchmark:
    """One kernel against torch: both callables take no arguments; ``bytes`` is the traffic."""

    name: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    bytes: int


def _kernels() -> ModuleType:
    """``triton_kernels.nn``, imported after the interpreter is switched on for a CPU run."""
    return importlib.import_module(f"{backend.kernels().__name__}.nn")


def benchmarks(device: torch.device, rows: int, columns: int) -> list[Benchmark]:
    """The kernel table on ``[rows, columns]`` float32 tensors (batch norm: ``[rows / 64, 64,
    columns]``)."""
    kernels = _kernels()
    element = 4
    size = rows * columns * element

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    h, bias, g = tensor(rows, columns), tensor(columns), tensor(rows, columns)
    weight = tensor(columns)
    y, _ = kernels.softmax_forward(h)
    _, mean, rstd = kernels.layer_norm_forward(h, weight, bias)
    _, torch_mean, torch_rstd = torch.native_layer_norm(h, [columns], weight, bias, 1e-5)
    _, rms_rstd = kernels.rms_norm_forward(h, weight)
    # torch's RMSNorm backward as a user gets it: autograd through F.rms_norm (on CUDA its
    # fused backward kernel; aten::_fused_rms_norm_backward has no CPU kernel to call directly)
    rms_input, rms_weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    rms_output = TF.rms_norm(rms_input, [columns], rms_weight)
    channels = 64
    images = tensor(max(rows // channels, 2), channels, columns)
    ones, zeros = torch.ones(channels, device=device), torch.zeros(channels, device=device)
    target = torch.randint(0, columns, (rows,), device=device)
    return [
        Benchmark(
            "bias+gelu forward",
            lambda: kernels.bias_activation_forward(h, bias, "gelu"),
            lambda: TF.gelu(h + bias),
            2 * size,
        ),
        Benchmark(
            "bias+gelu backward",
            lambda: kernels.bias_activation_backward(g, h, bias, "gelu", compute_grad_bias=True),
            lambda: torch.ops.aten.gelu_backward(g, h + bias).sum(0),
            3 * size,
        ),
        Benchmark(
            "silu forward",
            lambda: kernels.bias_activation_forward(h, None, "silu"),
            lambda: TF.silu(h),
            2 * size,
        ),
        Benchmark(
            "silu backward",
            lambda: kernels.bias_activation_backward(g, h, None, "silu"),
            lambda: torch.ops.aten.silu_backward(g, h),
            3 * size,
        ),
        Benchmark(
            "softmax forward",
            lambda: kernels.softmax_forward(h),
            lambda: torch.softmax(h, -1),
            2 * size,
        ),
        Benchmark(
            "softmax backward",
            lambda: kernels.softmax_backward(g, y),
            lambda: torch._softmax_backward_data(g, y, -1, y.dtype),
            3 * size,
        ),
        Benchmark(
            "layer_norm forward",
            lambda: kernels.layer_norm_forward(h, weight, bias),
            lambda: TF.layer_norm(h, [columns], weight, bias),
            2 * size,
        ),
        Benchmark(
            "layer_norm backward",
            lambda: kernels.layer_norm_backward(g, h, weight, mean, rstd),
            lambda: torch.ops.aten.native_layer_norm_backward(
                g, h, [columns], torch_mean, torch_rstd, weight, bias, [True, True, True]
            ),
            3 * size,
        ),
        Benchmark(
            "rms_norm forward",
            lambda: kernels.rms_norm_forward(h, weight),
            lambda: TF.rms_norm(h, [columns], weight),
            2 * size,
        ),
        Benchmark(
            "rms_norm backward",
            lambda: kernels.rms_norm_backward(g, h, weight, rms_rstd),
            lambda: torch.autograd.grad(rms_output, (rms_input, rms_weight), g, retain_graph=True),
            3 * size,
        ),
        Benchmark(
            "dropout forward",
            lambda: kernels.dropout_forward(h, 0.1, seed=1),
            lambda: TF.dropout(h, 0.1),
            2 * size,
        ),
        Benchmark(
            "batch_norm statistics+apply",
            lambda: kernels.channel_affine(images, *kernels.batch_norm_statistics(images)),
            lambda: torch.batch_norm(images, ones, zeros, None, None, True, 0.1, 1e-5, False),
            3 * images.numel() * element,
        ),
        Benchmark(
            "cross_entropy forward",
            lambda: kernels.cross_entropy_forward(h, target, check_target=False),
            lambda: TF.cross_entropy(h, target, reduction="none"),
            size,
        ),
    ]


def _median_seconds(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``function`` over ``repeats`` calls after two warm-up calls, with CUDA
    events on a GPU."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            function()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


@contextmanager
def _backend(name: str) -> Iterator[None]:
    """``TORCHOPT_LAB_BACKEND=name`` while the block runs (each functional call reads it)."""
    previous = os.environ.get(backend.ENV_VAR)
    os.environ[backend.ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[backend.ENV_VAR]
        else:
            os.environ[backend.ENV_VAR] = previous


def cross_entropy_step(
    device: torch.device, rows: int, vocabulary: int, use_triton: bool, repeats: int
) -> tuple[float, float]:
    """(median seconds, peak bytes beyond the inputs) of cross-entropy forward + backward:
    ``torchopt_lab.nn.functional.cross_entropy`` with ``TORCHOPT_LAB_BACKEND=triton`` (raising
    if it ran anything else), or torch's."""
    from torchopt_lab.nn import functional

    torch.manual_seed(0)
    logits = torch.randn(rows, vocabulary, device=device, requires_grad=True)
    target = torch.randint(0, vocabulary, (rows,), device=device)
    loss_function = functional.cross_entropy if use_triton else TF.cross_entropy

    def step() -> None:
        logits.grad = None
        loss_function(logits, target).backward()

    with _backend("triton"):
        seconds = _median_seconds(step, device, repeats)
        logits.grad = None
        if use_triton:
            decision = backend.backend_info()["decisions"].get("nn.cross_entropy", {})
            if decision.get("backend") != "triton":
                raise RuntimeError(f"cross_entropy did not run on the Triton path: {decision}")
        if device.type != "cuda":
            return seconds, 0
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return seconds, torch.cuda.max_memory_allocated(device) - baseline


# The sizing options' defaults: the parser's, and what --quick refuses to see overridden; and
# the tiny sizes --quick runs instead.
_SIZES = {"rows": 8192, "columns": 4096, "repeats": 20}
_QUICK_SIZES = {"rows": 8, "columns": 96, "repeats": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: the measurement; cpu: only with --quick, a smoke run (default: %(default)s)",
    )
    parser.add_argument(
        "--rows", type=int, default=_SIZES["rows"], help="rows per tensor (default: %(default)s)"
    )
    parser.add_argument(
        "--columns",
        type=int,
        default=_SIZES["columns"],
        help="columns per tensor (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=_SIZES["repeats"], help="timed calls (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 2 repeats: a smoke test of every benchmark, not a measurement",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.rows, args.columns, args.repeats) < 1:
        raise UsageError(
            f"--rows, --columns and --repeats must be >= 1, got {args.rows}, {args.columns}, "
            f"{args.repeats}"
        )
    if args.device == "cpu" and not args.quick:
        raise UsageError(
            "--device cpu runs the kernels in the Triton interpreter, which measures nothing "
            "about a GPU: use it only with --quick (a smoke run)"
        )
    if args.device == "cuda":
        try:
            check_device(args.device)
        except UsageError as error:
            raise UsageError(
                f"{error}; for a smoke run without a GPU use --device cpu --quick"
            ) from None
    if args.device == "cpu":
        # Read when triton.language is imported (its own @triton.jit helpers, tl.max among them,
        # are built then): too late once triton is loaded, as importing torchopt_lab does.
        if "TRITON_INTERPRET" not in os.environ and "triton.language" in sys.modules:
            raise UsageError(
                "--device cpu runs the kernels in the Triton interpreter, which must be on before "
                "triton is imported: run with TRITON_INTERPRET=1 in the environment, e.g. "
                "TRITON_INTERPRET=1 torchopt-lab bench-nn-kernels --device cpu --quick"
            )
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not backend.interpreter_enabled():
            raise UsageError(
                "--device cpu needs the Triton interpreter, but TRITON_INTERPRET="
                f"{os.environ['TRITON_INTERPRET']!r} turns it off"
            )
    device = torch.device(args.device)
    refuse_overridden_by_quick(args, _SIZES)
    sizes = _QUICK_SIZES if args.quick else {name: getattr(args, name) for name in _SIZES}
    rows, columns, repeats = sizes["rows"], sizes["columns"], sizes["repeats"]
    vocabulary_rows, vocabulary = (
        (4, 1000) if args.quick else (CROSS_ENTROPY_ROWS, CROSS_ENTROPY_VOCABULARY)
    )
    measured = device.type == "cuda"
    title = (
        torch.cuda.get_device_name(device)
        if measured
        else "CPU smoke run in the Triton interpreter: NOT a GPU measurement, no GB/s"
    )
    if measured and args.quick:
        title += " (quick run: timings are not measurements, tiny shapes)"
    print(f"layer kernels, float32 [{rows}, {columns}], median of {repeats}; {title}")
    print(
        f"{'kernel':<28} {'ours ms':>9} {'torch ms':>9} {'ours GB/s':>10} {'torch GB/s':>10} "
        f"{'ratio':>6}"
    )
    for benchmark in benchmarks(device, rows, columns):
        ours = _median_seconds(benchmark.ours, device, repeats)
        theirs = _median_seconds(benchmark.torch, device, repeats)
        if measured:
            figures = (
                f"{benchmark.bytes / ours / 1e9:>10.1f} {benchmark.bytes / theirs / 1e9:>10.1f} "
                f"{ours / theirs:>6.2f}"
            )
        else:
            figures = f"{'-':>10} {'-':>10} {'-':>6}"
        print(f"{benchmark.name:<28} {ours * 1e3:>9.3f} {theirs * 1e3:>9.3f} {figures}")
    print(
        f"cross_entropy forward+backward, float32 logits [{vocabulary_rows}, {vocabulary}], "
        "reduction mean"
    )
    print(f"{'path':<28} {'ms':>9} {'peak MB':>9}")
    results = {}
    for name, use_triton in (("torchopt_lab (Triton, LSE)", True), ("torch", False)):
        seconds, peak = cross_entropy_step(device, vocabulary_rows, vocabulary, use_triton, repeats)
        results[name] = (seconds, peak)
        peak_text = f"{peak / 2**20:>9.1f}" if measured else f"{'-':>9}"
        print(f"{name:<28} {seconds * 1e3:>9.3f} {peak_text}")
    (ours_seconds, ours_peak), (torch_seconds, torch_peak) = results.values()
    if measured:
        print(
            f"ours / torch: time ratio {ours_seconds / torch_seconds:.2f}, peak memory ratio "
            f"{ours_peak / torch_peak:.2f}"
        )
    else:
        print("ours / torch: not measured (interpreter smoke run)")
    return 0
