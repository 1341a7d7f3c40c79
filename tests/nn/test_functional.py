"""Every ``torchopt_lab.nn.functional`` function against ``torch.nn.functional`` through the
gradcheck harness: value and gradient in float32 and float64, gradcheck and gradgradcheck,
non-contiguous inputs, stride-0 grad_output, zero-size inputs, inputs unmodified, backward twice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import torchopt_lab.nn.functional as F
from torchopt_lab.testing import check_function


@dataclass(frozen=True)
class Case:
    """``F.<name>(*inputs(), **options)`` against ``torch.nn.functional.<name>``."""

    id: str
    name: str
    inputs: Callable[[], tuple[Any, ...]]
    options: dict[str, Any]
    zero_size: Callable[[], tuple[Any, ...]] | None = None
    modified: tuple[int, ...] = ()


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(shape, requires_grad=True)


def positive(*shape: int) -> torch.Tensor:
    return (torch.rand(*shape) + 0.5).requires_grad_()


def probabilities(*shape: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape), dim=1 if len(shape) > 1 else 0).requires_grad_(
        requires_grad
    )


def labels(classes: int, *shape: int, ignore: int | None = None) -> torch.Tensor:
    target = torch.randint(0, classes, shape)
    if ignore is not None and target.numel():
        target.view(-1)[0] = ignore
    return target


def class_weight(classes: int, weighted: bool) -> torch.Tensor | None:
    return positive(classes).detach() if weighted else None


def case(id: str, name: str, inputs, zero_size=None, modified=(), **options) -> Case:
    return Case(id, name, inputs, options, zero_size, modified)


CASES = [
    # linear: batch shapes, 1-D input, no bias, broadcast bias, 1-D weight, zero-size batch/features
    case(
        "2d",
        "linear",
        lambda: (leaf(4, 3), leaf(5, 3), leaf(5)),
        lambda: (leaf(0, 3), leaf(5, 3), leaf(5)),
    ),
    case("3d", "linear", lambda: (leaf(2, 3, 3), leaf(4, 3), leaf(4))),
    case("1d_input", "linear", lambda: (leaf(3), leaf(4, 3), leaf(4))),
    case(
        "no_bias",
        "linear",
        lambda: (leaf(2, 4, 3), leaf(5, 3)),
        lambda: (leaf(2, 0, 3), leaf(5, 3)),
    ),
    case("broadcast_bias", "linear", lambda: (leaf(4, 3), leaf(5, 3), leaf(4, 5))),
    case("1d_weight", "linear", lambda: (leaf(4, 3), leaf(3))),
    case(
        "zero_features",
        "linear",
        lambda: (leaf(4, 2), leaf(3, 2), leaf(3)),
        lambda: (leaf(4, 0), leaf(3, 0), leaf(3)),
    ),
    # conv2d: stride, padding (number, pair, "same", "valid"), dilation, groups, unbatched
    case(
        "basic",
        "conv2d",
        lambda: (leaf(2, 2, 4, 4), leaf(3, 2, 2, 2), leaf(3)),
        lambda: (leaf(0, 2, 4, 4), leaf(3, 2, 2, 2), leaf(3)),
    ),
    case(
        "stride_padding",
        "conv2d",
        lambda: (leaf(1, 2, 5, 4), leaf(2, 2, 3, 2), leaf(2)),
        stride=2,
        padding=1,
    ),
    case(
        "pairs",
        "conv2d",
        lambda: (leaf(1, 1, 5, 6), leaf(2, 1, 3, 2)),
        stride=(1, 2),
        padding=(2, 0),
        dilation=(2, 1),
    ),
    case("groups", "conv2d", lambda: (leaf(1, 4, 3, 3), leaf(4, 2, 2, 2), leaf(4)), groups=2),
    case("depthwise", "conv2d", lambda: (leaf(1, 3, 4, 4), leaf(3, 1, 3, 3)), groups=3, padding=1),
    case(
        "same_odd", "conv2d", lambda: (leaf(1, 2, 4, 4), leaf(2, 2, 3, 3), leaf(2)), padding="same"
    ),
    case(
        "same_even_dilated",
        "conv2d",
        lambda: (leaf(1, 1, 4, 5), leaf(2, 1, 2, 3), leaf(2)),
        padding="same",
        dilation=(1, 2),
    ),
    case("valid", "conv2d", lambda: (leaf(1, 2, 4, 4), leaf(2, 2, 2, 2)), padding="valid"),
    case("unbatched", "conv2d", lambda: (leaf(2, 4, 4), leaf(2, 2, 3, 3), leaf(2)), padding=1),
    # activations: matrices, 3-D, scalars, zero-size
    *[
        case(f"{shape}", name, (lambda s=shape: (leaf(*s),)), lambda: (leaf(0, 3),), **options)
        for name, options in [
            ("relu", {}),
            ("leaky_relu", {}),
            ("sigmoid", {}),
            ("tanh", {}),
            ("gelu", {}),
        ]
        for shape in [(3, 4), (2, 3, 4), ()]
    ],
    case("slope_0.2", "leaky_relu", lambda: (leaf(3, 4),), negative_slope=0.2),
    case("negative_slope", "leaky_relu", lambda: (leaf(3, 4),), negative_slope=-0.5),
    case(
        "tanh_approximation",
        "gelu",
        lambda: (leaf(2, 3, 4),),
        lambda: (
            leaf(
                0,
            ),
        ),
        approximate="tanh",
    ),
    case("wide_range", "gelu", lambda: (torch.linspace(-6, 6, 13, requires_grad=True),)),
    # softmax and log_softmax: every dimension, dtype, scalar, zero-size
    *[
        case(f"dim{dim}", name, lambda: (leaf(3, 4, 2),), lambda: (leaf(0, 4, 2),), dim=dim)
        for name in ("softmax", "log_softmax")
        for dim in (0, 1, -1)
    ],
    *[
        case("dtype_float64", name, lambda: (leaf(3, 5),), dim=1, dtype=torch.float64)
        for name in ("softmax", "log_softmax")
    ],
    *[case("scalar", name, lambda: (leaf(),), dim=0) for name in ("softmax", "log_softmax")],
    # mse_loss: every reduction, broadcasting, weight
    *[
        case(
            f"{reduction}",
            "mse_loss",
            lambda: (leaf(3, 4), leaf(3, 4)),
            lambda: (leaf(0, 4), leaf(0, 4)),
            reduction=reduction,
        )
        for reduction in ("mean", "sum", "none")
    ],
    case("broadcast", "mse_loss", lambda: (leaf(3, 4), leaf(4)), reduction="none"),
    *[
        case(
            f"weight_{reduction}",
            "mse_loss",
            lambda r=reduction: (leaf(3, 4), leaf(3, 4), None, None, r, positive(3, 4)),
        )
        for reduction in ("mean", "sum", "none")
    ],
    # cross_entropy, class indices: shapes, weight, ignore_index, label smoothing, reductions
    *[
        case(
            f"index_{reduction}_smoothing{smoothing}_weight{weighted}",
            "cross_entropy",
            lambda w=weighted: (leaf(5, 4), labels(4, 5, ignore=-100), class_weight(4, w)),
            lambda w=weighted: (leaf(0, 4), labels(4, 0), class_weight(4, w)),
            reduction=reduction,
            label_smoothing=smoothing,
        )
        for reduction in ("mean", "sum", "none")
        for smoothing in (0.0, 0.2)
        for weighted in (False, True)
    ],
    case("index_1d_input", "cross_entropy", lambda: (leaf(4), torch.tensor(2))),
    case(
        "index_spatial",
        "cross_entropy",
        lambda: (leaf(2, 3, 2, 2), labels(3, 2, 2, 2)),
        label_smoothing=0.1,
    ),
    case(
        "index_ignore_class",
        "cross_entropy",
        lambda: (leaf(6, 3), torch.tensor([0, 1, 2, 1, 1, 0]), positive(3).detach()),
        ignore_index=1,
    ),
    case(
        "index_full_smoothing",
        "cross_entropy",
        lambda: (leaf(4, 3), labels(3, 4)),
        label_smoothing=1.0,
    ),
    case("index_uint8", "cross_entropy", lambda: (leaf(4, 3), labels(3, 4).to(torch.uint8))),
    # cross_entropy, class probabilities (differentiable too)
    *[
        case(
            f"probabilities_{reduction}_smoothing{smoothing}_weight{weighted}",
            "cross_entropy",
            lambda w=weighted: (
                leaf(5, 4),
                probabilities(5, 4, requires_grad=True),
                class_weight(4, w),
            ),
            lambda w=weighted: (leaf(0, 4), probabilities(0, 4), class_weight(4, w)),
            reduction=reduction,
            label_smoothing=smoothing,
        )
        for reduction in ("mean", "sum", "none")
        for smoothing in (0.0, 0.3)
        for weighted in (False, True)
    ],
    case("probabilities_spatial", "cross_entropy", lambda: (leaf(2, 3, 2), probabilities(2, 3, 2))),
    # layer_norm: one and two normalised dimensions, with/without affine, zero-size batch
    case(
        "last_dim",
        "layer_norm",
        lambda: (leaf(3, 5), [5], leaf(5), leaf(5)),
        lambda: (leaf(0, 5), [5], leaf(5), leaf(5)),
    ),
    case("two_dims", "layer_norm", lambda: (leaf(2, 3, 4), [3, 4], leaf(3, 4), leaf(3, 4))),
    case("no_affine", "layer_norm", lambda: (leaf(4, 6), (6,)), eps=1e-3),
    case("weight_only", "layer_norm", lambda: (leaf(2, 2, 4), (4,), leaf(4))),
    # batch_norm: training (running statistics updated), evaluation, no affine, 4-D
    case(
        "training_2d",
        "batch_norm",
        lambda: (leaf(4, 3), torch.randn(3), positive(3).detach(), leaf(3), leaf(3), True, 0.3),
        lambda: (leaf(0, 3), torch.randn(3), positive(3).detach(), leaf(3), leaf(3), True, 0.3),
        modified=(1, 2),
    ),
    case(
        "training_4d",
        "batch_norm",
        lambda: (leaf(2, 3, 2, 3), torch.randn(3), positive(3).detach(), leaf(3), leaf(3), True),
        modified=(1, 2),
    ),
    case(
        "training_untracked",
        "batch_norm",
        lambda: (leaf(3, 2, 4), None, None, leaf(2), leaf(2), True),
    ),
    case(
        "training_no_affine",
        "batch_norm",
        lambda: (leaf(5, 2), torch.zeros(2), torch.ones(2), None, None, True),
        modified=(1, 2),
    ),
    case(
        "eval",
        "batch_norm",
        lambda: (leaf(3, 2, 4), torch.randn(2), positive(2).detach(), leaf(2), leaf(2), False),
    ),
    # dropout: the same mask as torch for the same seed
    case("p0.3", "dropout", lambda: (leaf(4, 5),), lambda: (leaf(0, 5),), p=0.3),
    case("p1", "dropout", lambda: (leaf(3, 4),), p=1.0),
    case("p0", "dropout", lambda: (leaf(3, 4),), p=0.0),
    case("eval", "dropout", lambda: (leaf(3, 4),), p=0.5, training=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{c.id}")
def test_functional_matches_torch_and_passes_gradcheck(case: Case) -> None:
    torch.manual_seed(0)
    inputs = case.inputs()
    zero_size = case.zero_size() if case.zero_size is not None else None
    report = check_function(
        partial(getattr(F, case.name), **case.options),
        *inputs,
        reference=partial(getattr(TF, case.name), **case.options),
        zero_size_inputs=zero_size,
        modified_inputs=case.modified,
    )
    expected_skips = {"zero_size"} if zero_size is None else set()
    assert {r.name for r in report.results if r.passed is None} == expected_skips
