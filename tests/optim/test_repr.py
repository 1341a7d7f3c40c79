"""An optimizer's repr is torch.optim's (every param group, key by key) followed by the options
ours keeps outside the groups: backend, max_grad_norm and the fused-kernel options."""

from __future__ import annotations

import pytest
import torch

import torchopt_lab.optim as ours

PAIRS = [
    (ours.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (ours.Momentum, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (ours.Adam, torch.optim.Adam, {}),
    (ours.AdamW, torch.optim.AdamW, {}),
    (ours.Adagrad, torch.optim.Adagrad, {}),
    (ours.RMSprop, torch.optim.RMSprop, {}),
]


@pytest.mark.parametrize(
    ("mine", "theirs", "options"), PAIRS, ids=lambda x: getattr(x, "__name__", "")
)
def test_repr_shows_torchs_groups_then_backend_max_grad_norm_and_the_fused_options(
    mine, theirs, options
) -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.5}]
    optimizer = mine(
        groups,
        **options,
        backend="torch",
        max_grad_norm=2.5,
        skip_nonfinite=True,
        float32_state=True,
        record_norms=True,
    )
    # torch's lines come first, unchanged; the class name is ours (Momentum, not SGD).
    torch_lines = repr(theirs(groups, **options)).splitlines()
    lines = repr(optimizer).splitlines()
    assert lines[0] == f"{mine.__name__} ("
    assert lines[1 : len(torch_lines) - 1] == torch_lines[1:-1]
    assert lines[len(torch_lines) - 1 :] == [
        "",
        "Optimizer options",
        "    backend: torch",
        "    max_grad_norm: 2.5",
        "    skip_nonfinite: True",
        "    float32_state: True",
        "    record_norms: True",
        ")",
    ]


def test_repr_shows_the_defaults_of_the_options() -> None:
    text = repr(ours.Adam([torch.nn.Parameter(torch.zeros(1))]))
    assert "    backend: auto\n    max_grad_norm: None\n    skip_nonfinite: False\n" in text
