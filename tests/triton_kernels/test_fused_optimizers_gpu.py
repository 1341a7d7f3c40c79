"""The fused optimizer kernels on a real GPU (skipped without CUDA): parity with torch's fused
Adam, and a step captured in a CUDA graph that still follows a device-tensor lr."""

from __future__ import annotations

import pytest
import torch

import torchopt_lab.optim as ours

pytestmark = pytest.mark.gpu


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1000, 37), (4096,), (), (3, 5), (129,)]
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator))
        param.grad = torch.randn(shape, device="cuda", generator=generator)
        params.append(param)
    return params


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
