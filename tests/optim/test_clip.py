"""Gradient clipping matches torch.nn.utils, and an optimizer's max_grad_norm equals
clip_grad_norm_ followed by step()."""

from __future__ import annotations

import math

import pytest
import torch
from optim_cases import CASES, Case, clone_params, loss_of, make_params

from torchopt_lab.optim import clip_grad_norm_, clip_grad_value_

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]


def params_with_grads(dtypes: list[torch.dtype], scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    params = []
    for index, dtype in enumerate(dtypes):
        p = torch.randn(3 + index, 2, generator=generator, dtype=dtype).requires_grad_()
        p.grad = scale * torch.randn(p.shape, generator=generator, dtype=dtype)
        params.append(p)
    return params


def copy_with_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    copies = clone_params(params)
    for copy, p in zip(copies, params, strict=True):
        copy.grad = None if p.grad is None else p.grad.clone()
    return copies


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm: float, norm_type: float, foreach: bool) -> None:
    ours = params_with_grads([torch.float64, torch.float32, torch.float64])
    theirs = copy_with_grads(ours)
    our_norm = clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    their_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert isinstance(our_norm, torch.Tensor)
    torch.testing.assert_close(our_norm, their_norm, rtol=0, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_clip_grad_norm_scales_only_above_max_norm() -> None:
    params = params_with_grads([torch.float64] * 2)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, max_norm=1e6)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    clip_grad_norm_(params, max_norm=0.1)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert norm > 0.1 and clipped == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_error_if_nonfinite_raises_like_torch(bad: float) -> None:
    params = params_with_grads([torch.float32])
    params[0].grad[0, 0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(copy_with_grads(params), 1.0, error_if_nonfinite=True)
    norm = clip_grad_norm_(params, 1.0)
    assert not torch.isfinite(norm)


def test_clip_grad_norm_accepts_a_single_tensor_and_skips_params_without_grads() -> None:
    single = params_with_grads([torch.float32])[0]
    reference = copy_with_grads([single])[0]
    torch.testing.assert_close(
        clip_grad_norm_(single, 0.1), torch.nn.utils.clip_grad_norm_(reference, 0.1)
    )
    torch.testing.assert_close(single.grad, reference.grad)
    no_grad = torch.zeros(3, requires_grad=True)
    assert clip_grad_norm_([no_grad], 1.0).item() == 0.0
    assert no_grad.grad is None


def test_clip_grad_norm_warns_on_empty_generator_like_torch() -> None:
    with pytest.warns(UserWarning, match="empty generator"):
        clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("clip_value", [0.1, 2.0])
def test_clip_grad_value_matches_torch(clip_value: float, foreach: bool) -> None:
    ours = params_with_grads([torch.float32, torch.float64], scale=3.0)
    theirs = copy_with_grads(ours)
    assert clip_grad_value_(ours, clip_value, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value, foreach=foreach)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        assert a.grad.abs().max() <= clip_value


# One case per optimizer class is enough: the clip happens in the base class.
ONE_CASE_PER_CLASS = list({case.ours: case for case in CASES}.values())


@pytest.mark.parametrize("max_grad_norm", [0.3, 1e6])
@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_max_grad_norm_equals_clip_grad_norm_then_step(case: Case, max_grad_norm: float) -> None:
    params = make_params(torch.float64)
    reference = clone_params(params)
    ours = case.ours(params, **case.options, max_grad_norm=max_grad_norm)
    theirs = case.theirs(reference, **case.options)
    for _ in range(10):
        for optimizer, ps in ((ours, params), (theirs, reference)):
            optimizer.zero_grad()
            loss_of(ps).backward()
        ours.step()
        torch.nn.utils.clip_grad_norm_(reference, max_grad_norm)
        theirs.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
