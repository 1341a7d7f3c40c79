"""GPU optimizer-step benchmark: our fused Triton step against torch.optim foreach and fused.

For each parameter set (GPT-2-small shapes, 1.3B-parameter GPT shapes, 4096 small tensors) and
each case (Adam; Adam with clipping; RMSprop; Adagrad) it times one ``step()`` with CUDA events
and prints the step time, the achieved bandwidth (bytes the algorithm must move / time), the
bytes per parameter that count, and the device's copy bandwidth measured in the same run. Ratios
are against torch measured in the same run; nothing here asserts a speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchopt_lab.bench import table_header

# float32 bytes each algorithm must read + write per parameter in one step:
# Adam: read param, grad, exp_avg, exp_avg_sq (16), write param, exp_avg, exp_avg_sq (12).
# Clipping fused in: one more read of the gradient for the norm (4).
# clip_grad_norm_ then step: read the gradient for the norm (4), read+write it to scale (8).
# RMSprop / Adagrad: read param, grad, one state (12), write param, state (8).
BYTES_PER_PARAM = {
    "adam": 28,
    "adam+clip (fused)": 32,
    "adam+clip (clip_grad_norm_ + step)": 40,
    "rmsprop": 20,
    "adagrad": 20,
}


def gpt_shapes(layers: int, width: int, vocab: int = 50257, context: int = 1024) -> list[tuple]:
    """The parameter shapes of a GPT-2-style model: 12 tensors per layer, plus 4."""
    shapes: list[tuple] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]  # ln_1
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,)]  # attention
        shapes += [(width,), (width,)]  # ln_2
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # MLP
    return [*shapes, (width,), (width,)]  # ln_f


PARAMETER_SETS: dict[str, Callable[[], list[tuple]]] = {
    "gpt2-small (124M, 148 tensors)": lambda: gpt_shapes(12, 768),
    "gpt-1.3B (1.3B, 292 tensors)": lambda: gpt_shapes(24, 2048),
    "4096 small tensors": lambda: [(256 * (1 + index % 16),) for index in range(4096)],
}


@dataclass
class Timing:
    name: str
    milliseconds: float  # on the device, from the first launch's start to the last one's end
    bytes_moved: int
    host_milliseconds: float = float("nan")  # the host's time in step(), launches queued

    @property
    def gigabytes_per_second(self) -> float:
        return self.bytes_moved / (self.milliseconds * 1e-3) / 1e9


def time_cuda(
    function: Callable[[], object],
    warmup: int = 3,
    repeats: int = 10,
    untimed: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Median milliseconds of ``function`` over ``repeats`` runs: between CUDA events recorded
    before and after it (which include any time the device waits for the host), and on the host
    (the call alone, not waiting for the device). ``untimed`` runs before each run, outside both."""
    for _ in range(warmup):
        if untimed is not None:
            untimed()
        function()
    device_times, host_times = [], []
    for _ in range(repeats):
        if untimed is not None:
            untimed()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_start = time.perf_counter()
        function()
        host_times.append((time.perf_counter() - host_start) * 1e3)
        end.record()
        torch.cuda.synchronize()
        device_times.append(start.elapsed_time(end))
    return statistics.median(device_times), statistics.median(host_times)


def copy_bandwidth(device: torch.device, gigabytes: float = 1.0) -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    source = torch.empty(int(gigabytes * 1e9) // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    milliseconds, _ = time_cuda(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (milliseconds * 1e-3) / 1e9


def _params(shapes: list[tuple], device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        param.grad = torch.randn(shape, device=device, generator=generator) * 1e-2
        params.append(param)
    return params


def run_cases(shapes: list[tuple], device: torch.device) -> list[tuple[str, list[Timing]]]:
    """Time every case on one parameter set; returns (case, [ours, torch...]) rows.

    The gradients stay the same tensors from step to step, except in the case that swaps in new
    gradient tensors before each step (untimed), as training does. Each optimizer is built, timed
    and dropped before the next, so only one set of optimizer state is alive at a time (1.3B
    parameters of Adam state take 10.4 GB; the second gradient set takes 5.2 GB more).
    """
    from torchopt_lab import optim as ours

    numel = sum(torch.Size(shape).numel() for shape in shapes)
    params = _params(shapes, device)
    # A second set of gradients: training makes new gradient tensors every step
    # (zero_grad(set_to_none=True), then backward), which a step must then find anew.
    gradient_sets = [[p.grad for p in params], [p.grad.clone() for p in params]]
    swaps = [0]

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)

    def new_gradients() -> None:
        swaps[0] += 1
        for param, grad in zip(params, gradient_sets[swaps[0] % 2], strict=True):
            param.grad = grad

    def timing(
        name: str, case: str, make: Callable[[], torch.optim.Optimizer], before=None, untimed=None
    ):
        optimizers = [make()]

        def step() -> None:
            if before is not None:
                before()
            optimizers[0].step()

        milliseconds, host_milliseconds = time_cuda(step, untimed=untimed)
        optimizers.clear()  # free its state before the next optimizer allocates its own
        torch.cuda.empty_cache()
        return Timing(name, milliseconds, BYTES_PER_PARAM[case] * numel, host_milliseconds)

    rows = [
        (
            "Adam",
            [
                timing("ours", "adam", lambda: ours.Adam(params, backend="triton")),
                timing("torch foreach", "adam", lambda: torch.optim.Adam(params, foreach=True)),
                timing("torch fused", "adam", lambda: torch.optim.Adam(params, fused=True)),
            ],
        ),
        (
            "Adam, new gradient tensors every step",
            [
                timing(
                    "ours",
                    "adam",
                    lambda: ours.Adam(params, backend="triton"),
                    untimed=new_gradients,
                ),
                timing(
                    "torch fused",
                    "adam",
                    lambda: torch.optim.Adam(params, fused=True),
                    untimed=new_gradients,
                ),
            ],
        ),
        (
            "Adam, max_grad_norm=1",
            [
                timing(
                    "ours",
                    "adam+clip (fused)",
                    lambda: ours.Adam(params, backend="triton", max_grad_norm=1.0),
                ),
                timing(
                    "clip_grad_norm_ + torch fused",
                    "adam+clip (clip_grad_norm_ + step)",
                    lambda: torch.optim.Adam(params, fused=True),
                    before=clip,
                ),
            ],
        ),
    ]
    for case, ours_class, torch_class in (
        ("rmsprop", ours.RMSprop, torch.optim.RMSprop),
        ("adagrad", ours.Adagrad, torch.optim.Adagrad),
    ):
        rows.append(
            (
                torch_class.__name__,
                [
                    timing("ours", case, lambda cls=ours_class: cls(params, backend="triton")),
                    timing(
                        "torch foreach",
                        case,
                        lambda cls=torch_class: cls(params, foreach=True),
                    ),
                ],
            )
        )
    return rows


def report(device: torch.device, set_names: list[str] | None = None) -> str:
    """Run every case on every parameter set; the results as a markdown table."""
    bandwidth = copy_bandwidth(device)
    lines = [
        f"# device {torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth:.0f} GB/s "
        "(1 GB device-to-device copy, bytes read + written)",
        "# float32 bytes each algorithm must move per parameter: "
        + ", ".join(f"{case} {size}" for case, size in BYTES_PER_PARAM.items()),
        "# ms: on the device, between events around step() (includes waiting for the host); "
        "host ms: the host's time in step()",
        table_header(
            [
                "set",
                "case",
                "implementation",
                "ms",
                "host ms",
                "GB/s",
                "of copy bandwidth",
                "ours faster by",
            ]
        ),
    ]
    for set_name, make_shapes in PARAMETER_SETS.items():
        if set_names and set_name not in set_names:
            continue
        for case, timings in run_cases(make_shapes(), device):
            ours_ms = timings[0].milliseconds
            for timing in timings:
                lines.append(
                    f"| {set_name} | {case} | {timing.name} | {timing.milliseconds:.3f} "
                    f"| {timing.host_milliseconds:.3f} | {timing.gigabytes_per_second:.0f} "
                    f"| {timing.gigabytes_per_second / bandwidth:.0%} "
                    f"| {timing.milliseconds / ours_ms:.2f}x |"
                )
        torch.cuda.empty_cache()
    return "\n".join(lines)
