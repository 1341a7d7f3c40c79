"""Random shapes and hyperparameters: ours still matches torch.optim (float64, 1e-12)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_cases import clone_params

import torchopt_lab.optim as ours

shapes = st.lists(
    st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)
rates = st.floats(min_value=1e-4, max_value=0.5)
decays = st.sampled_from([0.0, 1e-3, 0.1])
betas = st.floats(min_value=0.0, max_value=0.999)

OPTIMIZERS = st.one_of(
    st.fixed_dictionaries(
        {
            "lr": rates,
            "momentum": st.sampled_from([0.0, 0.5, 0.9]),
            "weight_decay": decays,
            "maximize": st.booleans(),
        }
    ).map(lambda options: (ours.SGD, torch.optim.SGD, options)),
    st.fixed_dictionaries(
        {
            "lr": rates,
            "betas": st.tuples(betas, betas),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": decays,
            "amsgrad": st.booleans(),
            "maximize": st.booleans(),
        }
    ).flatmap(
        lambda options: st.sampled_from(
            [(ours.Adam, torch.optim.Adam, options), (ours.AdamW, torch.optim.AdamW, options)]
        )
    ),
    st.fixed_dictionaries(
        {
            "lr": rates,
            "lr_decay": decays,
            "weight_decay": decays,
            "initial_accumulator_value": st.sampled_from([0.0, 0.1]),
        }
    ).map(lambda options: (ours.Adagrad, torch.optim.Adagrad, options)),
    st.fixed_dictionaries(
        {
            "lr": rates,
            "alpha": st.floats(min_value=0.5, max_value=0.999),
            "momentum": st.sampled_from([0.0, 0.9]),
            "centered": st.booleans(),
            "weight_decay": decays,
        }
    ).map(lambda options: (ours.RMSprop, torch.optim.RMSprop, options)),
)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, optimizer=OPTIMIZERS, seed=st.integers(0, 2**16))
def test_random_shapes_and_hyperparameters_match_torch_optim(shapes, optimizer, seed) -> None:
    mine, theirs, options = optimizer
    generator = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
        for shape in shapes
    ]
    reference = clone_params(params)
    grads = [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]]
    grads += [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]]
    for ps, cls in ((params, mine), (reference, theirs)):
        optimizer = cls(ps, **options)
        for step in range(10):
            for p, g in zip(ps, grads[step % 2], strict=True):
                p.grad = g + torch.sin(p.detach())
            optimizer.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
