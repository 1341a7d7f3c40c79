"""Edge cases behave as torch.optim does: empty and duplicate params, params without grads,
mixed dtypes, sparse gradients, complex params; and the flags we cannot honour are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_cases import CASES, Case, clone_params, loss_of, make_params, train

import torchopt_lab.optim as ours
from torchopt_lab import backend_info
from torchopt_lab.optim._base import _distinct_storages

ONE_CASE_PER_CLASS = list({case.ours: case for case in CASES}.values())
CLASSES = [(case.ours, case.theirs) for case in ONE_CASE_PER_CLASS]
CLASS_IDS = [case.ours.__name__ for case in ONE_CASE_PER_CLASS]


def outcome(make) -> tuple[type | None, str, list[str]]:
    """What constructing does: the exception type and message, and the warnings, if any."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make()
        except Exception as error:
            return type(error), str(error), [str(w.message) for w in caught]
    return None, "", [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda: [], id="empty list"),
        pytest.param(lambda: [{"params": []}], id="empty group"),
        pytest.param(lambda: [torch.zeros(2, requires_grad=True)] * 2, id="duplicate params"),
        pytest.param(
            lambda: (
                [{"params": [p]}, {"params": [p]}]
                if (p := torch.zeros(2, requires_grad=True)) is not None
                else []
            ),
            id="param in two groups",
        ),
    ],
)
@pytest.mark.parametrize(("mine", "theirs"), CLASSES, ids=CLASS_IDS)
def test_degenerate_param_lists_behave_like_torch(mine, theirs, params) -> None:
    assert outcome(lambda: mine(params())) == outcome(lambda: theirs(params()))


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_params_without_grads_are_left_alone_like_torch(case: Case) -> None:
    params = make_params(torch.float64)
    frozen = torch.ones(3, dtype=torch.float64, requires_grad=True)
    mine = case.ours([*params, frozen], **case.options)
    theirs = case.theirs([*clone_params(params), frozen.detach().clone()], **case.options)
    for optimizer in (mine, theirs):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()
    assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    assert (frozen in mine.state) == (len(theirs.state[theirs.param_groups[0]["params"][-1]]) > 0)


# bfloat16 and float16 keep state in their own dtype as torch does; both libraries round every
# elementwise op to 8 or 11 mantissa bits, and our reference path groups scalars differently, so
# they agree to a few units in the last place of those formats, not to float32 precision.
MIXED_TOLERANCES = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
}


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_mixed_dtypes_in_one_optimizer_match_torch(case: Case) -> None:
    generator = torch.Generator().manual_seed(3)
    params = [
        torch.randn(4, 3, generator=generator).to(dtype).requires_grad_()
        for dtype in MIXED_TOLERANCES
    ]
    reference = clone_params(params)
    for ps, cls in ((params, case.ours), (reference, case.theirs)):
        optimizer = cls(ps, **case.options)
        for _ in range(10):
            optimizer.zero_grad()
            sum((p.float() ** 2).sum() + torch.sin(3 * p.float()).sum() for p in ps).backward()
            optimizer.step()
    for a, b in zip(params, reference, strict=True):
        rtol, atol = MIXED_TOLERANCES[a.dtype]
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_complex_params_match_torch(case: Case) -> None:
    generator = torch.Generator().manual_seed(4)
    params = [torch.randn(3, 2, generator=generator, dtype=torch.complex128).requires_grad_()]
    params.append(torch.randn(4, generator=generator, dtype=torch.float64).requires_grad_())
    reference = clone_params(params)
    for ps, cls in ((params, case.ours), (reference, case.theirs)):
        optimizer = cls(ps, **case.options)
        for _ in range(15):
            optimizer.zero_grad()
            loss = (ps[0].abs() ** 2).sum() + torch.sin(ps[0].real).sum() + (ps[1] ** 2).sum()
            loss.backward()
            optimizer.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


SPARSE_SUPPORTED = [
    (ours.SGD, torch.optim.SGD, {"lr": 0.1}),
    (ours.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (ours.SGD, torch.optim.SGD, {"lr": 0.1, "maximize": True}),
    (ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1}),
    (ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1, "maximize": True}),
]


def embedding_steps(cls, options, weight: torch.Tensor, dense: torch.Tensor) -> None:
    embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False, sparse=True)
    optimizer = cls([embedding.weight, dense], **options)
    for step in range(8):
        optimizer.zero_grad()
        indices = torch.tensor([step % 5, (3 * step) % 5, step % 5])
        loss = (embedding(indices) ** 2).sum() + torch.sin(embedding(indices)).sum()
        (loss + (dense**2).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        weight.copy_(embedding.weight)


# torch.optim.Adagrad builds sparse tensors without saying whether to check them; torch warns.
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize(
    ("mine", "theirs", "options"),
    SPARSE_SUPPORTED,
    ids=[f"{m.__name__}-{o}" for m, _, o in SPARSE_SUPPORTED],
)
def test_sparse_gradients_match_torch_where_torch_supports_them(mine, theirs, options) -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    dense = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    results = []
    for cls in (mine, theirs):
        w, d = weight.clone(), dense.detach().clone().requires_grad_()
        embedding_steps(cls, options, w, d)
        results.append((w, d))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("mine", "theirs", "options"),
    [
        (ours.Adam, torch.optim.Adam, {}),
        (ours.AdamW, torch.optim.AdamW, {}),
        (ours.RMSprop, torch.optim.RMSprop, {}),
        (ours.Adagrad, torch.optim.Adagrad, {"weight_decay": 0.1}),
    ],
    ids=["Adam", "AdamW", "RMSprop", "Adagrad-weight_decay"],
)
def test_sparse_gradients_raise_like_torch_where_torch_refuses(mine, theirs, options) -> None:
    messages = []
    for cls in (mine, theirs):
        p = torch.zeros(5, 3, requires_grad=True)
        p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3), check_invariants=True)
        with pytest.raises(RuntimeError) as error:
            cls([p], **options).step()
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_step_records_its_backend_decision() -> None:
    optimizer = ours.Adam(make_params(torch.float32), backend="torch")
    train(lambda _: optimizer, [p for g in optimizer.param_groups for p in g["params"]], steps=1)
    decision = backend_info()["decisions"]["optim.Adam"]
    assert decision["backend"] == "torch" and decision["device"] == "cpu"


def test_triton_backend_runs_the_fused_kernels_and_says_so() -> None:
    # conftest sets TRITON_INTERPRET=1 without CUDA, so resolve() picks Triton for CPU tensors.
    params = make_params(torch.float32)
    optimizer = ours.SGD(params, lr=0.1, backend="triton")
    loss_of(params).backward()
    optimizer.step()
    decision = backend_info()["decisions"]["optim.SGD"]
    assert decision["requested"] == "triton" and decision["backend"] == "triton"


def test_foreach_false_is_accepted_and_gives_torch_results() -> None:
    params = make_params(torch.float64)
    reference = clone_params(params)
    train(lambda ps: ours.Adam(ps, lr=0.01, foreach=False), params)
    train(lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False), reference)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_max_grad_norm_leaves_the_gradients_untouched() -> None:
    params = make_params(torch.float64)
    optimizer = ours.SGD(params, lr=0.1, max_grad_norm=1e-3)
    loss_of(params).backward()
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


def test_add_param_group_uses_the_defaults_like_torch() -> None:
    params = make_params(torch.float64)
    reference = clone_params(params)
    mine = ours.Adam(params[:2], lr=0.01, amsgrad=True)
    theirs = torch.optim.Adam(reference[:2], lr=0.01, amsgrad=True)
    mine.add_param_group({"params": params[2:], "lr": 0.002})
    theirs.add_param_group({"params": reference[2:], "lr": 0.002})
    assert mine.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_grad_scaler_steps_ours_like_torch(case: Case) -> None:
    params = make_params(torch.float32)
    reference = clone_params(params)
    for ps, cls in ((params, case.ours), (reference, case.theirs)):
        optimizer = cls(ps, **case.options)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(6):
            optimizer.zero_grad()
            loss = loss_of(ps) * (float("inf") if step == 2 else 1.0)  # step 2 is skipped
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_max_grad_norm_refuses_sparse_gradients_clearly() -> None:
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([0, 1, 1])).sum().backward()
    optimizer = ours.SGD(embedding.parameters(), lr=0.1, max_grad_norm=0.1)
    with pytest.raises(NotImplementedError, match="max_grad_norm cannot clip sparse gradients"):
        optimizer.step()


# The engine's one-pass check for the usual CPU step, against the general answer it stands in
# for.


def test_distinct_storages_is_true_only_when_no_two_parameters_can_overlap() -> None:
    a, b = torch.zeros(4), torch.zeros(4)
    assert _distinct_storages([a, b])
    assert not _distinct_storages([a, a])  # the same tensor twice
    assert not _distinct_storages([a[:2], a[2:]])  # views of one storage
    assert not _distinct_storages([torch.zeros(0), torch.zeros(0)])  # no memory: unsure


def test_a_sparse_gradient_is_refused_after_the_parameters_before_it_get_state_as_in_torch() -> (
    None
):
    # torch.optim's _init_group creates the state of the parameters before the first sparse
    # gradient, then raises: the same error type and the same state left behind.
    def run(cls: type) -> tuple[type[BaseException], list[bool]]:
        params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
        for p in params:
            p.grad = torch.ones(3)
        params[1].grad = torch.ones(3).to_sparse()
        optimizer = cls(params, lr=0.1)
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        return error.type, [len(optimizer.state[p]) > 0 for p in params]

    assert run(ours.Adam) == run(torch.optim.Adam) == (RuntimeError, [True, False, False])
