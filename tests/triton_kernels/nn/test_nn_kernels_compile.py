"""Every layer kernel compiles for sm_80 and sm_90 (float32, float64 and bfloat16 variants,
every activation, every flag on and off), without register spills, and the streaming kernels issue
128-bit loads: a kernel the interpreter accepts but the compiler rejects cannot land."""

from __future__ import annotations

from typing import Any

import torch
from kernel_compilation import compile_kernels

from triton_kernels.nn._common import warps

F32, F64, BF16 = {"dtype": "fp32"}, {"dtype": "fp64"}, {"dtype": "bf16"}
# Kernel -> (module, signature with "T" for the tensor element type, constexprs, divisible ints).
KERNELS: dict[str, tuple[str, dict[str, str], dict[str, Any], tuple[str, ...]]] = {
    "_bias_activation_forward_kernel": (
        "triton_kernels.nn.activation",
        {
            "input_pointer": "*T",
            "bias_pointer": "*T",
            "output_pointer": "*T",
            "rows": "i32",
            "columns": "i32",
            "negative_slope": "fp64",
        },
        {
            "ACTIVATION": "gelu",
            "add_bias": True,
            "BLOCK_ROWS": 4,
            "BLOCK_COLUMNS": 1024,
        },
        ("columns",),
    ),
    "_bias_activation_backward_kernel": (
        "triton_kernels.nn.activation",
        {
            "grad_output_pointer": "*T",
            "saved_pointer": "*T",
            "bias_pointer": "*T",
            "grad_input_pointer": "*T",
            "grad_bias_partial_pointer": "*C",
            "rows": "i32",
            "columns": "i32",
            "negative_slope": "fp64",
        },
        {
            "ACTIVATION": "gelu",
            "add_bias": True,
            "reduce_bias": True,
            "BLOCK_ROWS": 4,
            "BLOCK_COLUMNS": 1024,
        },
        ("columns",),
    ),
    "_softmax_forward_kernel": (
        "triton_kernels.nn.softmax",
        {
            "input_pointer": "*T",
            "output_pointer": "*T",
            "log_sum_exp_pointer": "*C",
            "rows": "i32",
            "columns": "i32",
        },
        {"take_log": False, "whole_row": False, "BLOCK_ROWS": 1, "BLOCK": 4096},
        ("columns",),
    ),
    "_softmax_backward_kernel": (
        "triton_kernels.nn.softmax",
        {
            "grad_output_pointer": "*T",
            "output_pointer": "*T",
            "grad_input_pointer": "*T",
            "rows": "i32",
            "columns": "i32",
        },
        {"take_log": True, "whole_row": False, "BLOCK_ROWS": 1, "BLOCK": 4096},
        ("columns",),
    ),
    "_cross_entropy_forward_kernel": (
        "triton_kernels.nn.cross_entropy",
        {
            "input_pointer": "*T",
            "target_pointer": "*i64",
            "weight_pointer": "*T",
            "weight_total_pointer": "*C",
            "loss_pointer": "*C",
            "log_sum_exp_pointer": "*C",
            "classes": "i32",
            "ignore_index": "i32",
            "label_smoothing": "fp64",
        },
        {"SMOOTHING": True, "has_weight": True, "BLOCK": 4096},
        ("classes",),
    ),
    "_cross_entropy_backward_kernel": (
        "triton_kernels.nn.cross_entropy",
        {
            "grad_loss_pointer": "*C",
            "input_pointer": "*T",
            "target_pointer": "*i64",
            "weight_pointer": "*T",
            "weight_total_pointer": "*C",
            "log_sum_exp_pointer": "*C",
            "grad_input_pointer": "*T",
            "classes": "i32",
            "ignore_index": "i32",
            "label_smoothing": "fp64",
        },
        {"SMOOTHING": True, "has_weight": True, "BLOCK": 4096},
        ("classes",),
    ),
    "_cross_entropy_probabilities_forward_kernel": (
        "triton_kernels.nn.cross_entropy",
        {
            "input_pointer": "*T",
            "target_pointer": "*T",
            "weight_pointer": "*T",
            "loss_pointer": "*C",
            "log_sum_exp_pointer": "*C",
            "mass_pointer": "*C",
            "classes": "i32",
            "label_smoothing": "fp64",
        },
        {"has_weight": True, "BLOCK": 4096},
        ("classes",),
    ),
    "_cross_entropy_probabilities_backward_kernel": (
        "triton_kernels.nn.cross_entropy",
        {
            "grad_loss_pointer": "*C",
            "input_pointer": "*T",
            "target_pointer": "*T",
            "weight_pointer": "*T",
            "log_sum_exp_pointer": "*C",
            "mass_pointer": "*C",
            "grad_input_pointer": "*T",
            "classes": "i32",
            "label_smoothing": "fp64",
        },
        {"has_weight": True, "BLOCK": 4096},
        ("classes",),
    ),
    "_layer_norm_forward_kernel": (
        "triton_kernels.nn.layer_norm",
        {
            "input_pointer": "*T",
            "weight_pointer": "*T",
            "bias_pointer": "*T",
            "output_pointer": "*T",
            "mean_pointer": "*C",
            "rstd_pointer": "*C",
            "rows": "i32",
            "columns": "i32",
            "eps": "fp64",
        },
        {
            "CENTERED": True,
            "has_weight": True,
            "has_bias": True,
            "BLOCK_ROWS": 4,
            "BLOCK_COLUMNS": 1024,
        },
        ("columns",),
    ),
    "_layer_norm_backward_kernel": (
        "triton_kernels.nn.layer_norm",
        {
            "grad_output_pointer": "*T",
            "input_pointer": "*T",
            "weight_pointer": "*T",
            "mean_pointer": "*C",
            "rstd_pointer": "*C",
            "c1_pointer": "*C",
            "c2_pointer": "*C",
            "grad_input_pointer": "*T",
            "grad_weight_partial_pointer": "*C",
            "grad_bias_partial_pointer": "*C",
            "rows": "i32",
            "columns": "i32",
        },
        {
            "CENTERED": True,
            "has_weight": True,
            "reduce_parameters": True,
            "coefficients_given": False,
            "BLOCK_ROWS": 4,
            "BLOCK_COLUMNS": 1024,
        },
        ("columns",),
    ),
    "_layer_norm_wide_forward_kernel": (
        "triton_kernels.nn.layer_norm",
        {
            "input_pointer": "*T",
            "weight_pointer": "*T",
            "bias_pointer": "*T",
            "output_pointer": "*T",
            "mean_pointer": "*C",
            "rstd_pointer": "*C",
            "columns": "i32",
            "eps": "fp64",
        },
        {"CENTERED": True, "has_weight": True, "has_bias": True, "BLOCK": 2048},
        ("columns",),
    ),
    "_layer_norm_wide_coefficients_kernel": (
        "triton_kernels.nn.layer_norm",
        {
            "grad_output_pointer": "*T",
            "input_pointer": "*T",
            "weight_pointer": "*T",
            "mean_pointer": "*C",
            "rstd_pointer": "*C",
            "c1_pointer": "*C",
            "c2_pointer": "*C",
            "columns": "i32",
        },
        {"CENTERED": True, "has_weight": True, "BLOCK": 2048},
        ("columns",),
    ),
    "_dropout_kernel": (
        "triton_kernels.nn.dropout",
        {
            "input_pointer": "*T",
            "output_pointer": "*T",
            "numel": "i32",
            "seed": "i32",
            "p": "fp64",
        },
        {"BLOCK": 1024},
        ("numel",),
    ),
    "_batch_norm_statistics_kernel": (
        "triton_kernels.nn.batch_norm",
        {
            "input_pointer": "*T",
            "count_pointer": "*C",
            "mean_pointer": "*C",
            "m2_pointer": "*C",
            "batch": "i32",
            "channels": "i32",
            "spatial": "i32",
        },
        {"BLOCK": 1024},
        ("spatial",),
    ),
    "_batch_norm_gradient_sums_kernel": (
        "triton_kernels.nn.batch_norm",
        {
            "grad_output_pointer": "*T",
            "input_pointer": "*T",
            "mean_pointer": "*C",
            "sum_pointer": "*C",
            "dot_pointer": "*C",
            "batch": "i32",
            "channels": "i32",
            "spatial": "i32",
        },
        {"BLOCK": 1024},
        ("spatial",),
    ),
    "_channel_affine_kernel": (
        "triton_kernels.nn.batch_norm",
        {
            "input_pointer": "*T",
            "second_pointer": "*T",
            "output_pointer": "*T",
            "scale_pointer": "*C",
            "shift_pointer": "*C",
            "second_scale_pointer": "*C",
            "channels": "i32",
            "spatial": "i32",
        },
        {"add_second": True, "BLOCK": 1024},
        ("spatial",),
    ),
}
# Kernels that stream whole float32 rows or blocks: each must load 128 bits at a time.
VECTORISED = (
    "_softmax_forward_kernel",
    "_softmax_backward_kernel",
    "_bias_activation_forward_kernel",
    "_bias_activation_backward_kernel",
    "_layer_norm_forward_kernel",
    "_dropout_kernel",
    "_channel_affine_kernel",
)
# RMSNorm runs the layer-norm kernels uncentred (CENTERED=False: no mean, no bias).
RMS_NORM_KERNELS = (
    "_layer_norm_forward_kernel",
    "_layer_norm_backward_kernel",
    "_layer_norm_wide_forward_kernel",
    "_layer_norm_wide_coefficients_kernel",
)
RMS_NORM = {"CENTERED": False}
RMS_NORM_VECTORISED = ("_layer_norm_forward_kernel",)
ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
# (variant, element type, compute type)
VARIANTS = {"float32": ("fp32", "fp32"), "float64": ("fp64", "fp64"), "bfloat16": ("bf16", "fp32")}


def _request(kernel: str, capability: int, variant: str, **overrides: Any) -> dict[str, Any]:
    module, signature, defaults, divisible = KERNELS[kernel]
    element, compute = VARIANTS[variant]
    types = {"*T": f"*{element}", "*C": f"*{compute}"}
    constexprs = {**defaults, "COMPUTE_DTYPE": {"dtype": compute}, **overrides}
    if "BLOCK" in constexprs and element == "fp64":
        # The row kernels' launchers halve the block for 8-byte elements (16 KB per row slice).
        constexprs["BLOCK"] = min(constexprs["BLOCK"], 2048)
    elements = constexprs.get("BLOCK_ROWS", 1) * (
        constexprs.get("BLOCK") or constexprs["BLOCK_COLUMNS"]
    )
    return {
        "module": module,
        "kernel": kernel,
        "capability": capability,
        "variant": variant + "".join(f" {name}={value}" for name, value in overrides.items()),
        "signature": {name: types.get(kind, kind) for name, kind in signature.items()},
        "constexprs": constexprs,
        "divisible": list(divisible),
        "num_warps": warps(elements, torch.float64 if compute == "fp64" else torch.float32),
    }


def _requests() -> list[dict[str, Any]]:
    requests = []
    for capability in (80, 90):
        for kernel in KERNELS:
            requests.append(_request(kernel, capability, "float32"))
            requests.append(_request(kernel, capability, "float64"))
        for kernel in ("_bias_activation_forward_kernel", "_layer_norm_backward_kernel"):
            requests.append(_request(kernel, capability, "bfloat16"))
    for activation in ACTIVATIONS:
        for kernel in ("_bias_activation_forward_kernel", "_bias_activation_backward_kernel"):
            requests.append(_request(kernel, 90, "float32", ACTIVATION=activation))
            requests.append(_request(kernel, 90, "float64", ACTIVATION=activation))
    for kernel in ("_softmax_forward_kernel", "_softmax_backward_kernel"):
        for take_log in (False, True):
            requests.append(
                _request(
                    kernel,
                    90,
                    "float32",
                    take_log=take_log,
                    whole_row=True,
                    BLOCK_ROWS=16,
                    BLOCK=128,
                )
            )
    for kernel in ("_layer_norm_forward_kernel", "_layer_norm_backward_kernel"):
        # The widest rows the launchers hold whole in registers (32 KB of the compute dtype).
        requests.append(_request(kernel, 80, "float32", BLOCK_ROWS=1, BLOCK_COLUMNS=8192))
        requests.append(_request(kernel, 90, "float64", BLOCK_ROWS=1, BLOCK_COLUMNS=4096))
    for capability in (80, 90):
        for variant in ("float32", "float64"):
            # Wider rows: column slices, with c_1 and c_2 from the coefficients kernel.
            requests.append(
                _request(
                    "_layer_norm_backward_kernel",
                    capability,
                    variant,
                    coefficients_given=True,
                    BLOCK_COLUMNS=2048,
                )
            )
    for capability in (80, 90):
        for kernel in RMS_NORM_KERNELS:
            for variant in ("float32", "float64", "bfloat16"):
                rms = dict(RMS_NORM, has_bias=False) if "forward" in kernel else RMS_NORM
                requests.append(_request(kernel, capability, variant, **rms))
        for variant in ("float32", "float64"):
            requests.append(
                _request(
                    "_layer_norm_backward_kernel",
                    capability,
                    variant,
                    **RMS_NORM,
                    coefficients_given=True,
                    BLOCK_COLUMNS=2048,
                )
            )
    for kernel in ("_layer_norm_forward_kernel", "_layer_norm_backward_kernel"):
        # RMSNorm's widest whole rows
        requests.append(
            _request(kernel, 80, "float32", **RMS_NORM, BLOCK_ROWS=1, BLOCK_COLUMNS=8192)
        )
        requests.append(
            _request(kernel, 90, "float64", **RMS_NORM, BLOCK_ROWS=1, BLOCK_COLUMNS=4096)
        )
    for kernel, (_, _, defaults, _) in KERNELS.items():
        # Every flag off as well: a branch the interpreter never takes must still compile.
        flags = {name: False for name, value in defaults.items() if value is True}
        if flags:
            requests.append(_request(kernel, 80, "float32", **flags))
    return requests


def test_every_nn_kernel_compiles_for_sm80_and_sm90_without_spills_and_vectorised() -> None:
    requests = _requests()
    results = compile_kernels(requests)
    assert len(results) == len(requests)
    described = [f"{r['kernel']} sm_{r['capability']} {r['variant']}" for r in results]
    failed = [
        f"{name}: {r['error']}" for name, r in zip(described, results, strict=True) if not r["ok"]
    ]
    assert not failed, "\n".join(failed)
    spilled = [
        f"{name}: {r['spill_bytes']} B"
        for name, r in zip(described, results, strict=True)
        if r["spill_bytes"]
    ]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    streaming = [r for r in results if r["kernel"] in VECTORISED and r["variant"] == "float32"]
    assert len(streaming) == 2 * len(VECTORISED)
    scalar = [
        name
        for name, r in zip(described, results, strict=True)
        if r["kernel"] in VECTORISED and r["variant"] == "float32" and r["ptx_v4_loads"] == 0
    ]
    assert not scalar, "no 128-bit (ld.global.v4) loads:\n" + "\n".join(scalar)
    assert {r["kernel"] for r in results} == set(KERNELS)
    rms_streaming = [
        name
        for name, r in zip(described, results, strict=True)
        if r["kernel"] in RMS_NORM_VECTORISED and r["variant"].startswith("float32 CENTERED=False")
    ]
    assert len(rms_streaming) >= 2 * len(RMS_NORM_VECTORISED)
    rms_scalar = [
        name
        for name, r in zip(described, results, strict=True)
        if name in rms_streaming and r["ptx_v4_loads"] == 0
    ]
    assert not rms_scalar, "RMSNorm: no 128-bit (ld.global.v4) loads:\n" + "\n".join(rms_scalar)
