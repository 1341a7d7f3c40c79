"""Values that vary per call (``eps``, ``label_smoothing``, ``negative_slope``, dropout's ``p``)
are runtime kernel arguments: a new value reuses the compiled kernel, and the results still match
torch for each value.

Compile once: under ``TRITON_INTERPRET=1`` nothing compiles, so this file runs itself in a fresh
process with the interpreter off, where ``JITFunction.run`` is replaced by what its first lines do
(bind the arguments, then :func:`triton.runtime.jit.compute_cache_key` for an sm_90 target): the
real launchers are called with CPU tensors and each launch's cache key is recorded, nothing
compiled or launched. Two values of a runtime argument give the same key, so one compile; a
``tl.constexpr`` value is part of the key, so each value would compile again.

Values: float64 against torch at rtol 1e-12 (the scalar reaches the kernel in float64; passed as
float32 it would round ``0.1`` by 1.5e-9 relative), float32 at rtol 1e-5 / atol 1e-6."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[3]
# launcher -> the values of its per-call argument, each launched once
VALUES: dict[str, tuple[float, ...]] = {
    "layer_norm_forward": (1e-5, 1e-3, 0.25),
    "layer_norm_forward wide": (1e-5, 1e-3, 0.25),
    "rms_norm_forward": (1e-6, 1e-3, 0.25),
    "rms_norm_forward wide": (1e-6, 1e-3, 0.25),
    "bias_activation_forward leaky_relu": (0.01, 0.2, -0.5),
    "bias_activation_backward leaky_relu": (0.01, 0.2, -0.5),
    "cross_entropy_forward": (0.05, 0.1, 1.0),
    "cross_entropy_backward": (0.05, 0.1, 1.0),
    "cross_entropy_probabilities_forward": (0.0, 0.1, 1.0),
    "cross_entropy_probabilities_backward": (0.0, 0.1, 1.0),
    "dropout_forward": (0.1, 0.5, 0.9),
}


def _launch(kernels: Any, launcher: str, value: float) -> None:
    """Launch ``launcher`` with ``value`` on small CPU tensors of fixed shapes."""
    x, g = torch.randn(4, 16), torch.randn(4, 16)
    wide = torch.randn(2, 9000)  # 36 KB float32 rows: the wide kernels
    weight, bias = torch.randn(16), torch.randn(16)
    target = torch.tensor([0, 3, -100, 15])
    lse, mass = torch.zeros(4), torch.ones(4)
    probabilities = torch.softmax(torch.randn(4, 16), 1)
    calls = {
        "layer_norm_forward": lambda: kernels.layer_norm_forward(x, weight, bias, value),
        "layer_norm_forward wide": lambda: kernels.layer_norm_forward(wide, None, None, value),
        "rms_norm_forward": lambda: kernels.rms_norm_forward(x, weight, value),
        "rms_norm_forward wide": lambda: kernels.rms_norm_forward(wide, None, value),
        "bias_activation_forward leaky_relu": lambda: kernels.bias_activation_forward(
            x, bias, "leaky_relu", value
        ),
        "bias_activation_backward leaky_relu": lambda: kernels.bias_activation_backward(
            g, x, bias, "leaky_relu", value, compute_grad_bias=True
        ),
        "cross_entropy_forward": lambda: kernels.cross_entropy_forward(
            x, target, weight, label_smoothing=value
        ),
        "cross_entropy_backward": lambda: kernels.cross_entropy_backward(
            torch.ones(4), x, target, lse, weight, label_smoothing=value
        ),
        "cross_entropy_probabilities_forward": lambda: kernels.cross_entropy_probabilities_forward(
            x, probabilities, weight, value
        ),
        "cross_entropy_probabilities_backward": lambda: (
            kernels.cross_entropy_probabilities_backward(
                torch.ones(4), x, probabilities, lse, mass, weight, value
            )
        ),
        "dropout_forward": lambda: kernels.dropout_forward(x, value, seed=7),
    }
    calls[launcher]()


def _record_cache_keys() -> dict[str, list[list[list[str]]]]:
    """Per launcher, per value: the ``[kernel, cache key]`` of each launch (interpreter off)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    import triton_kernels.nn as kernels

    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches: list[list[str]] = []

    def record(self: jit.JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        # JITFunction.run's own key: bind, specialise, key (then it would compile on a miss)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        _, specialization, options = binder(*args, **kwargs)
        launches.append([self.fn.__name__, jit.compute_cache_key({}, specialization, options)])

    jit.JITFunction.run = record
    keys = {}
    for launcher, values in VALUES.items():
        keys[launcher] = []
        for value in values:
            launches.clear()
            _launch(kernels, launcher, value)
            keys[launcher].append(list(launches))
    return keys


@pytest.fixture(scope="module")
def cache_keys() -> dict[str, list[list[list[str]]]]:
    completed = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        cwd=_ROOT,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.mark.parametrize("launcher", list(VALUES))
def test_a_new_per_call_value_reuses_the_compiled_kernel(
    cache_keys: dict[str, list[list[list[str]]]], launcher: str
) -> None:
    first, *others = cache_keys[launcher]
    assert first, f"{launcher} launched no kernel"
    for value, launches in zip(VALUES[launcher][1:], others, strict=True):
        assert launches == first, f"{launcher}: value {value} changes the cache key (recompiles)"


def _compiled_variants() -> int:
    """How many compiled kernels every layer kernel's JIT cache holds, over all devices."""
    from triton_kernels.nn import activation, cross_entropy, dropout, layer_norm

    total = 0
    for module in (activation, cross_entropy, dropout, layer_norm):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "device_caches"):
                total += sum(len(cache[0]) for cache in kernel.device_caches.values())
    return total


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", list(VALUES))
def test_on_a_gpu_a_new_per_call_value_compiles_nothing(launcher: str) -> None:
    # The real cache: launched on CUDA (the kernel tests' default device there), the first
    # value compiles, the others find the kernel compiled.
    import triton_kernels.nn as kernels

    first, *others = VALUES[launcher]
    _launch(kernels, launcher, first)
    torch.cuda.synchronize()
    compiled = _compiled_variants()
    assert compiled > 0
    for value in others:
        _launch(kernels, launcher, value)
    torch.cuda.synchronize()
    assert _compiled_variants() == compiled, f"{launcher}: a new value compiled again"


def _constexprs(kernel: Any) -> set[str]:
    """The ``tl.constexpr`` parameters of a ``@triton.jit`` kernel, interpreted or not."""
    parameters = inspect.signature(kernel.fn).parameters.values()
    return {param.name for param in parameters if "constexpr" in str(param.annotation)}


def test_smoothing_on_and_off_are_the_only_two_cross_entropy_variants() -> None:
    # SMOOTHING = ε > 0 stays a constexpr: without smoothing the kernels skip the weight loads
    # and the Σ_c w_c x_c reduction. The values are runtime (the test above); the flag is not.
    from triton_kernels.nn import cross_entropy

    for kernel in (
        cross_entropy._cross_entropy_forward_kernel,
        cross_entropy._cross_entropy_backward_kernel,
    ):
        constexprs = _constexprs(kernel)
        assert "SMOOTHING" in constexprs and "label_smoothing" not in constexprs


def test_no_per_call_value_is_a_constexpr_of_any_layer_kernel() -> None:
    import triton_kernels.nn as package
    from triton_kernels.nn import (
        activation,
        batch_norm,
        cross_entropy,
        dropout,
        layer_norm,
        rms_norm,
        softmax,
    )

    per_call = {"eps", "label_smoothing", "negative_slope", "p", "momentum"}
    seen = set()
    for module in (activation, batch_norm, cross_entropy, dropout, layer_norm, rms_norm, softmax):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "arg_names"):
                for argument in set(kernel.arg_names) & per_call:
                    seen.add(argument)
                    assert argument not in _constexprs(kernel), f"{name}: {argument} is a constexpr"
    assert seen == {"eps", "label_smoothing", "negative_slope", "p"}
    assert package.rms_norm_forward is rms_norm.rms_norm_forward


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_norm_matches_torch_for_several_eps(eps: float, dtype: torch.dtype) -> None:
    from triton_kernels.nn import layer_norm_forward

    torch.manual_seed(0)
    x = torch.randn(5, 37, dtype=dtype) * 0.1
    weight, bias = torch.randn(37, dtype=dtype), torch.randn(37, dtype=dtype)
    output, _, _ = layer_norm_forward(x, weight, bias, eps)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(output, F.layer_norm(x, [37], weight, bias, eps), **tolerance)


@pytest.mark.parametrize("slope", [0.01, 0.2, -0.5, 3.0])
def test_leaky_relu_matches_torch_for_several_slopes(slope: float) -> None:
    from triton_kernels.nn import bias_activation_backward, bias_activation_forward

    torch.manual_seed(0)
    h = torch.randn(6, 11, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    z = (h + bias).requires_grad_()
    expected = F.leaky_relu(z, slope)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    output = bias_activation_forward(h, bias, "leaky_relu", slope)
    torch.testing.assert_close(output, expected.detach(), rtol=1e-12, atol=1e-12)
    grad_input, grad_bias = bias_activation_backward(
        grad, h, bias, "leaky_relu", slope, compute_grad_bias=True
    )
    torch.testing.assert_close(grad_input, z.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_bias, z.grad.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch_for_several_label_smoothings(
    smoothing: float, weighted: bool
) -> None:
    from triton_kernels.nn import cross_entropy_backward, cross_entropy_forward

    torch.manual_seed(0)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3, 5])
    weight = torch.rand(9, dtype=torch.float64) + 0.5 if weighted else None
    expected = F.cross_entropy(
        x, target, weight, reduction="none", label_smoothing=smoothing, ignore_index=-100
    )
    grad = torch.randn(6, dtype=torch.float64)
    expected.backward(grad)
    loss, lse = cross_entropy_forward(x.detach(), target, weight, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    grad_input = cross_entropy_backward(grad, x.detach(), target, lse, weight, -100, smoothing)
    torch.testing.assert_close(grad_input, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.37])
def test_cross_entropy_probabilities_match_torch_for_several_label_smoothings(
    smoothing: float,
) -> None:
    from triton_kernels.nn import (
        cross_entropy_probabilities_backward,
        cross_entropy_probabilities_forward,
    )

    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1)
    expected = F.cross_entropy(x, target, reduction="none", label_smoothing=smoothing)
    grad = torch.randn(5, dtype=torch.float64)
    expected.backward(grad)
    loss, lse, mass = cross_entropy_probabilities_forward(x.detach(), target, None, smoothing)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    grad_input = cross_entropy_probabilities_backward(
        grad, x.detach(), target, lse, mass, None, smoothing
    )
    torch.testing.assert_close(grad_input, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_scales_by_one_over_one_minus_p_for_several_p(p: float) -> None:
    from triton_kernels.nn import dropout_backward, dropout_forward

    x = torch.rand(64, 64, dtype=torch.float64) + 1.0
    output = dropout_forward(x, p, seed=3)
    kept = output != 0
    # x / (1 - p) where kept, exactly (the scale rounded once to float64)
    torch.testing.assert_close(output[kept], x[kept] * (1.0 / (1.0 - p)), rtol=0, atol=0)
    # about 1 - p kept: 4096 draws, 5 standard deviations
    spread = 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < spread
    # the backward regenerates the same mask
    assert torch.equal(dropout_backward(torch.ones_like(x), p, seed=3) != 0, kept)


if __name__ == "__main__":
    sys.path.insert(0, str(_ROOT))
    print(json.dumps(_record_cache_keys()))
