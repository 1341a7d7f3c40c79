"""The fused optimizer kernels compiled on a real GPU (skipped without CUDA): every case of the
parity table, the vectorised tails of many small tensors, the per-tensor completion counter
(step and diagnostics) across hundreds of concurrent blocks, a deterministic gradient norm,
parity with torch's fused Adam, and a step captured in a CUDA graph that follows a device lr.

The CPU suite runs the same kernels under the Triton interpreter, which runs programs one by one:
only here do blocks race and tails take 128-bit masked accesses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torchopt_lab.optim as ours

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
from optim_cases import CASES, Case, clone_params, make_params, train, two_groups

pytestmark = pytest.mark.gpu
# As the interpreter's test (test_fused_optimizers.py): float32 1e-6 relative and 1e-5 absolute
# (a fused multiply-add moves an intermediate by one ulp), float64 1e-12.
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)}


def _sized(shapes: list, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of these shapes (or sizes) on the GPU, each with a random gradient."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator))
        param.grad = torch.randn(shape, device="cuda", generator=generator)
        params.append(param)
    return params


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    return _sized([(1000, 37), (4096,), (), (3, 5), (129,)], seed)


def test_fused_adam_matches_torch_fused_adam_on_cuda():
    params, reference = _params(), _params()
    mine = ours.AdamW(params, lr=0.01, backend="auto")
    theirs = torch.optim.AdamW(reference, lr=0.01, fused=True)
    for _ in range(5):
        mine.step()
        theirs.step()
    # float32 with fused multiply-adds on both sides, in different places: a few ulps.
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_captured_in_a_cuda_graph_replays_and_follows_a_device_lr():
    params, reference = _params(), _params()
    lr = torch.tensor(0.01, device="cuda")
    mine = ours.Adam(params, lr=lr, backend="triton", max_grad_norm=1.0)
    theirs = ours.Adam(reference, lr=0.01, backend="triton", max_grad_norm=1.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mine.step()  # warm-up: state, tables and compilation happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    theirs.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mine.step()
    for new_lr in (0.01, 0.005, 0.002):
        lr.fill_(new_lr)
        graph.replay()
        theirs.param_groups[0]["lr"] = new_lr
        theirs.step()
    torch.cuda.synchronize()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _cuda(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().cuda().requires_grad_() for p in params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_parity_case_compiled_matches_the_torch_path_on_cuda(case: Case, dtype) -> None:
    params = _cuda(make_params(dtype))
    reference = clone_params(params)
    for backend, tensors in (("triton", params), ("torch", reference)):
        train(
            lambda ps, backend=backend: case.ours(
                two_groups(ps, case.options), **case.options, backend=backend
            ),
            tensors,
        )
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


SIZE_SETS = {
    # Multiples of 256 (NUMEL_MULTIPLE = 16): most blocks are vectorised masked tails.
    "small tensors, aligned sizes": [256 * (1 + index % 16) for index in range(300)],
    # An odd size makes the whole launch take element-wise tails.
    "small tensors, odd sizes": [255 * (1 + index % 16) + index % 3 for index in range(300)],
    # Hundreds of blocks per tensor race to finish it.
    "large tensors": [2048 * 500 + 16, 2048 * 300],
}


@pytest.mark.parametrize("sizes", list(SIZE_SETS), ids=str)
@pytest.mark.parametrize(
    ("ours_class", "torch_class", "options"),
    [
        (ours.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
        (ours.AdamW, torch.optim.AdamW, {"lr": 0.01}),
        (ours.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1}),
        (ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_many_tensors_and_many_blocks_match_torch_optim_and_count_every_step(
    sizes, ours_class, torch_class, options
):
    params, reference = _sized(SIZE_SETS[sizes]), _sized(SIZE_SETS[sizes])
    grads = [p.grad for p in params]
    mine = ours_class(params, backend="triton", record_norms=True, **options)
    theirs = torch_class(reference, foreach=True, **options)
    for _ in range(5):
        # New gradient tensors each step, as backward makes them (torch's foreach SGD with
        # Nesterov momentum also adds to the gradients it is given).
        for tensors in (params, reference):
            for p, g in zip(tensors, grads, strict=True):
                p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        mine.step()
        theirs.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if "step" in mine.state[params[0]]:
        assert {float(mine.state[p]["step"]) for p in params} == {5.0}
    # The last block of each tensor publishes its diagnostics: every block's share is in them.
    norms = mine.norm_diagnostics()
    for p, b in zip(params, before, strict=True):
        expected = torch.stack(
            [p.grad.square().sum(), (p.detach() - b).square().sum(), b.square().sum()]
        )
        torch.testing.assert_close(norms[p], expected, rtol=1e-4, atol=1e-6)


def test_fused_clipping_norm_is_the_same_bits_every_step_and_matches_torch():
    params = _sized(SIZE_SETS["small tensors, aligned sizes"] + SIZE_SETS["large tensors"])
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])
    )
    optimizer = ours.SGD(params, lr=0.0, backend="triton", max_grad_norm=1.0)
    squares = []
    for _ in range(3):
        optimizer.step()
        (norms,) = optimizer._fused_state.square_norms.values()
        squares.append(norms.sum().item())
    assert squares[0] == squares[1] == squares[2]
    torch.testing.assert_close(
        torch.tensor(squares[0], dtype=torch.float64).sqrt(), expected.cpu(), rtol=1e-5, atol=0
    )
