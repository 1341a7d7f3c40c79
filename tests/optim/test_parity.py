"""Every optimizer and option matches torch.optim step for step."""

from __future__ import annotations

import pytest
import torch
from optim_cases import (
    CASES,
    Case,
    assert_params_close,
    clone_params,
    make_params,
    train,
    two_groups,
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_optimizer_matches_torch_optim(case: Case, dtype: torch.dtype) -> None:
    params = make_params(dtype)
    reference = clone_params(params)
    ours = train(lambda ps: case.ours(two_groups(ps, case.options), **case.options), params)
    theirs = train(lambda ps: case.theirs(two_groups(ps, case.options), **case.options), reference)
    assert_params_close(params, reference, dtype)
    for our_state, their_state in zip(
        ours.state_dict()["state"].values(), theirs.state_dict()["state"].values(), strict=True
    ):
        assert our_state.keys() == their_state.keys()
        for key, value in their_state.items():
            rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
            torch.testing.assert_close(our_state[key], value, rtol=rtol, atol=atol)
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
