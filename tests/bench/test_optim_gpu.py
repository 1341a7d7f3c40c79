"""The GPU optimizer benchmark's parameter sets are the sizes issue 3 names, and its byte counts
are what each algorithm must move (the timings themselves need a GPU: marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from torchopt_lab.bench import optim_gpu


def _count(shapes) -> tuple[int, int]:
    return len(shapes), sum(torch.Size(shape).numel() for shape in shapes)


def test_gpt2_small_set_has_148_tensors_and_124m_params():
    tensors, params = _count(optim_gpu.gpt_shapes(12, 768))
    assert tensors == 148 and 124e6 < params < 125e6


def test_large_set_has_about_290_tensors_and_1_3b_params():
    tensors, params = _count(optim_gpu.gpt_shapes(24, 2048))
    assert tensors == 292 and 1.3e9 < params < 1.35e9


def test_small_tensor_set_has_4096_tensors():
    tensors, _ = _count(optim_gpu.PARAMETER_SETS["4096 small tensors"]())
    assert tensors == 4096


def test_adam_moves_28_bytes_per_float32_param_and_clipping_adds_a_gradient_read():
    # Read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq: 7 x 4 bytes.
    assert optim_gpu.BYTES_PER_PARAM["adam"] == 7 * 4
    assert optim_gpu.BYTES_PER_PARAM["adam+clip (fused)"] == 8 * 4
    assert optim_gpu.BYTES_PER_PARAM["adam+clip (clip_grad_norm_ + step)"] == 10 * 4


@pytest.mark.gpu
def test_gpu_report_runs_on_the_small_tensor_set():
    report = optim_gpu.report(torch.device("cuda"), ["4096 small tensors"])
    assert "copy bandwidth" in report and "torch fused" in report


def test_every_case_builds_and_steps_on_the_cpu_with_a_stand_in_timer(monkeypatch):
    # The timings need a GPU, but every case's optimizers, clipping and gradient swaps run here
    # (ours through the Triton interpreter), so a GPU session does not start with a broken script.
    calls = []

    def run_once(function, warmup=3, repeats=10, untimed=None):
        if untimed is not None:
            untimed()
        function()
        calls.append(untimed is not None)
        return 1.0, 0.5

    monkeypatch.setattr(optim_gpu, "time_cuda", run_once)
    params_seen = []
    original_params = optim_gpu._params

    def keeping_params(shapes, device):
        params_seen.append(original_params(shapes, device))
        return params_seen[-1]

    monkeypatch.setattr(optim_gpu, "_params", keeping_params)
    rows = optim_gpu.run_cases([(3, 5), (7,), ()], torch.device("cpu"))
    assert [case for case, _ in rows] == [
        "Adam",
        "Adam, new gradient tensors every step",
        "Adam, max_grad_norm=1",
        "RMSprop",
        "Adagrad",
    ]
    assert all(
        (timing.milliseconds, timing.host_milliseconds) == (1.0, 0.5)
        for _, timings in rows
        for timing in timings
    )
    assert calls.count(True) == 2  # the two new-gradient timings swapped gradients
    assert all(torch.isfinite(p).all() for p in params_seen[0])
