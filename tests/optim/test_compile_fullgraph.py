"""A compiled step is one graph: ``torch.compile(step, fullgraph=True)`` traces every optimizer
with no graph break and no recompilation once its state exists, and matches the eager step.

The step count stays a tensor input of the graph (as in torch.optim's compiled optimizers): a
host read of it (``item``, ``tolist``) breaks the graph, and a count baked in as a constant
recompiles on every step. Tolerance against eager: float32 to rtol 1e-6, atol 2e-6 after 3 steps
(Inductor fuses the update and reorders its float32 arithmetic; the per-step scalars are float64
on both paths). Measured: at most 1.7e-6 absolute (SGD with nesterov and maximize: the same
difference torch.optim.SGD compiled shows against its own eager step), 6e-8 elsewhere.
"""

from __future__ import annotations

import operator
import subprocess
import sys

import pytest
import torch

import torchopt_lab
import torchopt_lab.optim as ours
from torchopt_lab.optim.rules import REGISTRY

BUILT_INS = [ours.SGD, ours.Momentum, ours.Adagrad, ours.RMSprop, ours.Adam, ours.AdamW]
EVERY = BUILT_INS + [cls for cls in REGISTRY.values() if cls not in BUILT_INS]

# Option combinations torch's compiled optimizers support on the CPU, and ours beside them.
CONFIGS = [
    (ours.SGD, {"lr": 0.1}),
    (ours.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (ours.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    (ours.Momentum, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    (ours.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (ours.Adagrad, {"lr": 0.1, "maximize": True, "initial_accumulator_value": 0.1}),
    (ours.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    (ours.RMSprop, {"lr": 0.01, "maximize": True}),
    (ours.Adam, {"lr": 0.01}),
    (ours.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    (ours.Adam, {"lr": torch.tensor(0.01)}),
    (ours.Adam, {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), torch.tensor(0.99))}),
    (ours.NAdam, {"lr": 0.01, "betas": (torch.tensor(0.9), torch.tensor(0.99))}),
    (ours.Adam, {"lr": 0.01, "max_grad_norm": 0.05}),
    (ours.Adam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    (ours.AdamW, {"lr": 0.01, "amsgrad": True, "maximize": True}),
    (ours.Adagrad, {"lr": torch.tensor(0.1)}),
    (ours.NAdam, {"lr": 0.01, "weight_decay": 0.1, "momentum_decay": 0.005}),
    (ours.NAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (ours.NAdam, {"lr": torch.tensor(0.01), "maximize": True}),
    (ours.RAdam, {"lr": 0.01, "weight_decay": 0.1}),
    (ours.RAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (ours.Adamax, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    (ours.Adadelta, {"lr": 0.5, "weight_decay": 0.1, "maximize": True}),
    (ours.Lion, {"lr": 0.01, "weight_decay": 0.1}),
]
# A tensor lr stays a tensor in the graph (torch.optim's compiled optimizers take one too).
CONFIGS += [
    (cls, {"lr": torch.tensor(0.01), **({"momentum": 0.9} if cls is ours.SGD else {})})
    for cls in EVERY
    if cls not in (ours.Adam, ours.Adagrad, ours.NAdam)
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_and_optimizer(cls, options, **extra):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    return model, cls(model.parameters(), **options, **extra)


def _backward(model, index):
    torch.manual_seed(index)
    model.zero_grad()
    model(torch.randn(4, 6)).pow(2).sum().backward()


def _train(cls, options, run_step, steps):
    model, optimizer = _model_and_optimizer(cls, options, backend="torch")
    run = run_step(optimizer)
    for index in range(steps):
        _backward(model, index)
        run()
    return model, optimizer


def _compiled(optimizer):
    def step():
        optimizer.step()

    return torch.compile(step, fullgraph=True)


def _eager(optimizer):
    return optimizer.step


@pytest.mark.parametrize("cls", EVERY, ids=[cls.__name__ for cls in EVERY])
def test_compiled_step_is_one_graph_without_breaks(cls):
    options = {"lr": 0.01, "momentum": 0.9} if cls is ours.SGD else {"lr": 0.01}
    model, optimizer = _model_and_optimizer(cls, options)
    _backward(model, 0)
    optimizer.step()  # the state exists: the explained step is a steady-state one

    def step():
        optimizer.step()

    explanation = torch._dynamo.explain(step)()
    reasons = [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons


@pytest.mark.parametrize(
    ("cls", "options"),
    CONFIGS,
    ids=[
        "-".join(
            [
                cls.__name__,
                *(f"tensor_{k}" if torch.is_tensor(v) else k for k, v in options.items()),
            ]
        )
        for cls, options in CONFIGS
    ],
)
def test_fullgraph_compiled_steps_match_eager(cls, options):
    eager, eager_optimizer = _train(cls, options, _eager, steps=3)
    compiled, compiled_optimizer = _train(cls, options, _compiled, steps=3)
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6)
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        for key, value in eager_optimizer.state[q].items():
            held = compiled_optimizer.state[p][key]
            # State is held relative to its scale: SGD's nesterov momentum buffer (|b| ~ 40 after
            # three maximize steps) differs by up to 8.6e-6, about 4 float32 ulps of its largest
            # entry, from Inductor's reordered float32 arithmetic.
            scale = value.abs().max().item() if value.is_floating_point() else 0.0
            atol = max(2e-6, 8 * torch.finfo(torch.float32).eps * scale)
            torch.testing.assert_close(held, value, rtol=1e-6, atol=atol, msg=key)


@pytest.mark.parametrize("cls", EVERY, ids=[cls.__name__ for cls in EVERY])
def test_a_compiled_step_creates_the_state_outside_the_graph_and_compiles_once(cls):
    model, optimizer = _model_and_optimizer(cls, {"lr": 0.01}, backend="torch")
    run = _compiled(optimizer)
    graphs = torch._dynamo.utils.counters["stats"]
    before, counts = graphs["unique_graphs"], []
    for index in range(5):
        _backward(model, index)
        run()
        counts.append(graphs["unique_graphs"] - before)
    # The state is created before the first trace (Dynamo runs _init_group eagerly), so that
    # trace is the steady state's and the step count, a graph input, keeps it for later steps.
    # Momentum's buffer is made by its update from the first gradient: the second step traces
    # again with it, as torch.optim.SGD's compiled step does (before, every rule did).
    first = 2 if cls is ours.Momentum else 1
    assert counts == [1] + [first] * 4, counts
    # SGD without momentum keeps no state (nor empty entries), as torch's.
    assert all(len(optimizer.state[p]) for p in model.parameters()) != (cls is ours.SGD)


def test_a_compiled_first_step_of_a_fresh_process_traces_the_rule(tmp_path):
    # Nothing of a rule may be computed on first use inside the trace: on Python < 3.12 a
    # functools.cached_property takes a lock there, which Dynamo cannot trace, and the first
    # compiled step of a process (no eager step had filled the cache) failed to compile.
    script = tmp_path / "first.py"
    script.write_text(
        "import torch, torchopt_lab.optim as ours\n"
        "for cls in (ours.NAdam, ours.Adam):\n"
        "    p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "    optimizer = cls([p], lr=0.1)\n"
        "    torch.compile(lambda: optimizer.step(), fullgraph=True, backend='eager')()\n"
        "    assert p.detach().lt(1).all(), p\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _traced_graph(cls, count):
    """The FX graph Dynamo traces for a steady-state step of ``cls`` over ``count`` tensors."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=generator).requires_grad_() for _ in range(count)]
    for param in params:
        param.grad = torch.randn(3, generator=generator)
    options = {"lr": 0.01, "momentum": 0.9} if cls is ours.SGD else {"lr": 0.01}
    optimizer = cls(params, **options, backend="torch")
    optimizer.step()
    graphs = []

    def keep_graph(module, example_inputs):
        graphs.append(module.graph)
        return module.forward

    def step():
        optimizer.step()

    torch.compile(step, fullgraph=True, backend=keep_graph)()
    (graph,) = graphs
    return graph


def _scalar_arithmetic(graph):
    """Nodes computing a 0-dim tensor other than by taking an entry out of a stacked one: the
    per-step scalars' arithmetic (bias corrections), were it traced per tensor."""
    return sum(
        node.op == "call_function"
        and node.target is not operator.getitem
        and isinstance(node.meta.get("example_value"), torch.Tensor)
        and node.meta["example_value"].dim() == 0
        for node in graph.nodes
    )


@pytest.mark.parametrize("cls", EVERY, ids=[cls.__name__ for cls in EVERY])
def test_compiled_graph_grows_linearly_and_traces_the_step_scalars_once(cls):
    # Compile time grows with the graph: the per-step scalars (bias corrections, NAdam's
    # momentum schedule) are computed once over the stacked step counts of a part, so only the
    # update itself, and each tensor's entries of the scalars, repeat per tensor. Measured per
    # tensor: 3 nodes (SGD) to 30 (NAdam, RAdam); before, NAdam 49 and RAdam 46, most of them scalar
    # arithmetic (23 and 19 nodes).
    graphs = {count: _traced_graph(cls, count) for count in (2, 4, 8)}
    sizes = {count: len(graph.nodes) for count, graph in graphs.items()}
    per_tensor = (sizes[4] - sizes[2]) / 2
    assert sizes[8] - sizes[4] == 4 * per_tensor, sizes
    assert per_tensor <= 32, sizes
    arithmetic = {count: _scalar_arithmetic(graph) for count, graph in graphs.items()}
    assert arithmetic[2] == arithmetic[8], arithmetic


@pytest.mark.parametrize("cls", BUILT_INS, ids=[cls.__name__ for cls in BUILT_INS])
def test_compiled_step_honours_grad_scalers_found_inf_and_grad_scale_in_the_graph(cls):
    # GradScaler.step hands the built-ins grad_scale and found_inf (_step_supports_amp_scaling):
    # a compiled step cannot read found_inf on the host, so it selects every updated tensor
    # back in the graph where found_inf is set, and unscales the gradients by grad_scale.
    assert cls._step_supports_amp_scaling
    options = {"lr": 0.01, "momentum": 0.9} if cls is ours.SGD else {"lr": 0.01}
    results = []
    for run_step in (_eager, _compiled):
        torch._dynamo.reset()
        model, optimizer = _model_and_optimizer(cls, options, backend="torch")
        run = run_step(optimizer)
        optimizer.grad_scale = torch.tensor(4.0)
        moved = []
        for index, found_inf in enumerate((1.0, 0.0, 1.0, 0.0)):  # the first step skipped too
            _backward(model, index)
            for p in model.parameters():
                p.grad.mul_(4.0)  # as GradScaler scales the loss
            optimizer.found_inf = torch.tensor(found_inf)
            before = [p.detach().clone() for p in model.parameters()]
            run()
            moved.append(
                [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
            )
        results.append((model, optimizer, moved))
    (eager, eager_optimizer, eager_moved), (compiled, compiled_optimizer, moved) = results
    assert moved == eager_moved == [[False] * 4, [True] * 4, [False] * 4, [True] * 4]
    # The same two steps without GradScaler (gradients unscaled, nothing to skip): scaling by 4
    # and unscaling by 1/4 are exact, so only Inductor's reordering separates the two.
    plain, plain_optimizer = _model_and_optimizer(cls, options, backend="torch")
    for index in (1, 3):
        _backward(plain, index)
        plain_optimizer.step()
    for p, q in zip(compiled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-6)
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-6)
        for key, value in eager_optimizer.state[q].items():
            # step counts included: two steps taken, the skipped ones not counted
            torch.testing.assert_close(
                compiled_optimizer.state[p][key], value, rtol=1e-6, atol=2e-6, msg=key
            )
        if "step" in eager_optimizer.state[q]:
            assert compiled_optimizer.state[p]["step"].item() == 2


def test_compiled_step_records_the_traced_backend():
    model, optimizer = _model_and_optimizer(ours.NAdam, {"lr": 0.01}, backend="auto")
    run = _compiled(optimizer)
    _backward(model, 0)
    run()
    decision = torchopt_lab.backend_info()["decisions"]["optim.NAdam"]
    assert decision["backend"] == "torch"
    assert "torch.compile" in decision["reason"]


@pytest.mark.parametrize("cls", EVERY, ids=[cls.__name__ for cls in EVERY])
def test_skip_nonfinite_is_decided_in_the_graph_and_matches_eager(cls):
    # skip_nonfinite needs the gradient norm: a host read (item) would break the graph, so the
    # compiled step selects every updated tensor back where the norm is not finite.
    options = {"lr": 0.01, "max_grad_norm": 0.5, "skip_nonfinite": True}
    if cls is ours.SGD:
        options["momentum"] = 0.9
    results = []
    for run_step in (_eager, _compiled):
        torch._dynamo.reset()
        model, optimizer = _model_and_optimizer(cls, options, backend="torch")
        run = run_step(optimizer)
        for index in range(4):
            _backward(model, index)
            if index in (0, 2):  # the first step (no state yet) and a later one
                next(model.parameters()).grad[0, 0] = float("inf")
            run()
        results.append((model, optimizer))
    (eager, eager_optimizer), (compiled, compiled_optimizer) = results
    assert compiled_optimizer.skipped_steps == eager_optimizer.skipped_steps == 2
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-6)
        for key, value in eager_optimizer.state[q].items():
            torch.testing.assert_close(
                compiled_optimizer.state[p][key], value, rtol=1e-6, atol=2e-6, msg=key
            )
