"""``fused=True`` on CPU tensors for the optimizers declared as rules: the rule's element-wise
``update`` compiled by Inductor (``torch.compile``) into one pass over each tensor's memory.

The compiled function updates a *chunk* of :data:`CHUNK` tensors per call, each flattened to
1-D: the rule's ``update`` out of place, then ``copy_`` into the parameter and state tensors,
which Inductor turns into the stores of one loop per tensor (each element of the parameter,
gradient and state read once, the parameter and state written once). A call has a fixed host
cost whatever its size, so chunks amortise it over many tensors, and the arithmetic runs at
memory bandwidth, like torch's fused CPU kernels. Once Dynamo has compiled a variant, calls skip
its frame evaluation (:class:`_ChunkStep`): the variant's guards are checked by Dynamo's own
guard manager and its graph is called with the arguments in order, and the flat views of
parameters and state are remembered across steps. Host time per step, measured (2026-12-03,
1 thread, Adam's update over 204 tensors of 360 elements): 5.3 ms through Dynamo, about 1.1-1.5
ms called directly, torch's fused Adam 0.8 ms; Inductor's per-call size asserts (off here: the
guards have checked the sizes) took a third of a call. The generated C++ is one
vectorised loop per tensor (AVX-512 where the CPU has it) with a masked tail.

A state absent from a parameter's group (``State.when``: Adam's ``max_exp_avg_sq`` without
amsgrad) is None in the compiled call and stays None; a state the update creates
(``State.init=None``: SGD's momentum buffer) is created by the torch update on that parameter's
first step, and compiled from the next. The built-in optimizers take this path as well, by
:func:`builtin_step`, when :data:`TORCH_KERNELS` is False.

Tensors of :data:`PARALLEL_NUMEL` elements or more are updated by all threads (an OpenMP loop
each, in one parallel region per call), smaller ones by one thread, in chunks of their own.

Compilations stay few and bounded: sizes are dynamic and never specialised (no duck sizing, no
0/1 specialisation), and the last chunk of a step is padded with tiny scratch tensors, so a rule
compiles once per (threading, dtype, ``maximize``, branch its update takes on the scalars, e.g.
``weight_decay != 0``), never per tensor count or size. Each rule's compiled function has its own
Dynamo cache (own code object) with its own recompile limit; hitting it raises instead of
silently running eagerly.

Results match the rule's torch path (``fused=None``) to rounding: Inductor may reorder and fuse
float operations (and, for float16 and bfloat16, computes in float32 with one rounding at the end,
as torch's fused kernels do), so equality is not bitwise; ``tests/optim/test_cpu_fused.py`` states
and holds the bounds. Where Inductor cannot compile (no C++ compiler, an update it cannot trace),
the rule's torch update runs instead, recorded in :func:`torchopt_lab.backend_info` with the
error and warned about once.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchopt_lab import backend as _backend
from torchopt_lab.optim._scalars import as_number, scalars_key

__all__ = [
    "CHUNK",
    "DTYPES",
    "PARALLEL_NUMEL",
    "TORCH_KERNELS",
    "builtin_step",
    "check_flags",
    "compile_count",
    "compiles_builtin",
    "fused_step",
    "fused_update",
]

#: Tensors per compiled call. More amortises the host's call overhead over more tensors but
#: lengthens the one-time compile (Inductor writes one loop per tensor of the chunk).
CHUNK = 16
#: Parameter dtypes the compiled path updates (complex ones as real views).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The built-in optimizers whose torch counterpart has a fused CPU kernel (SGD and Momentum,
#: Adagrad, Adam, AdamW) run torch's kernel for ``fused=True`` on CPU tensors while this is True
#: (the default); False compiles their rule's ``update`` like every rule optimizer's. RMSprop
#: (``fused`` an attribute: torch's has none) always compiles its ``update``. Measured in one run
#: (2026-12-03 16:06 UTC, quiet, 2 threads; bench-cpu-fused "declared" rows, docs/benchmarks.md):
#: the built-ins' compiled declaration / torch fused 1.30-1.47 on the transformer set, 2.1-3.4 on
#: 2000 small tensors (the optimizer's per-parameter host work on top of the compiled calls').
TORCH_KERNELS = True
# The torch.optim functions (the built-ins' ``_reference`` names) with a fused CPU kernel.
_TORCH_FUSED_CPU = frozenset({"sgd", "adagrad", "adam", "adamw"})
#: Tensors of at least this many elements are updated by all threads (one OpenMP loop each);
#: smaller ones by one thread each, in chunks of their own, as torch's fused kernels do below
#: their grain size (a parallel loop's barrier costs more than a small tensor's update, and far
#: more when the machine's cores are busy).
PARALLEL_NUMEL = 32768
# Recompilations allowed per rule (dtypes x maximize x branches on the scalars) before raising.
_RECOMPILE_LIMIT = 64

# (rule.update, parallel) -> its compiled chunk step; (rule.update, dtype) -> why compiling failed.
_compiled: dict[tuple[Callable[..., Any], bool], _ChunkStep] = {}
_failed: dict[tuple[Callable[..., Any], torch.dtype], str] = {}
# (dtype, tensors per parameter, CHUNK) -> scratch (param, grad, *state) to pad the last chunk.
_scratch: dict[tuple[torch.dtype, int, int], list[list[Tensor]]] = {}


def _chunk_step(
    update: Callable[..., tuple[Tensor, ...]],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor | None]],
    scalars: dict[str, Any],
    maximize: bool,
) -> None:
    """What the compiled function runs: ``update`` over each tensor of a chunk, written back (a
    state absent from the parameter's group, ``State.when``, is None in and None out)."""
    for i in range(len(params)):
        grad = -grads[i] if maximize else grads[i]
        results = update(params[i], grad, *(state[i] for state in states), **scalars)
        params[i].copy_(results[0])
        for state, result in zip(states, results[1:], strict=True):
            if state[i] is not None:
                state[i].copy_(result)


# A source of a compiled graph's argument that the direct call can read: a local of the chunk
# step, indexed by list positions and dict keys, or the first size of such a tensor.
_SOURCE = re.compile(r"L\['\w+'\](\[(\d+|'\w+')\])*(\.size\(\)\[0\])?")
# A scalar the graph takes as a float64 tensor (Dynamo's calling convention for float inputs).
_SCALAR = re.compile(r"L\['scalars'\]\['(\w+)'\]")


def _graph_sources() -> list[tuple[str, bool]] | None:
    """Where each argument of the graph Dynamo is compiling comes from (a Python expression over
    the frame's locals ``L``, and whether Dynamo passes it as a tensor), read from Dynamo's
    ``OutputGraph``, the backend's caller; None where this torch does not show them."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "OutputGraph":
            try:
                args = owner.graphargs
                names = [arg.source.name for arg in args]
                names = [name() if callable(name) else name for name in names]
                return [
                    (n, bool(arg.pass_arg_as_tensor)) for n, arg in zip(names, args, strict=True)
                ]
            except AttributeError:
                return None
        frame = frame.f_back
    return None


def _argument_builder(sources: list[tuple[str, bool]] | None) -> Callable[..., list] | None:
    """A function of the chunk step's locals ``L`` and its scalars as float64 tensors ``T``
    giving a graph's arguments in order, as Dynamo's prologue would; None for a source it does
    not know."""
    if sources is None:
        return None
    items = []
    for name, as_tensor in sources:
        if not _SOURCE.fullmatch(name):
            return None
        scalar = _SCALAR.fullmatch(name)
        if as_tensor and scalar is None:
            return None
        items.append(f"T[{scalar.group(1)!r}]" if as_tensor else name)
    # The names are checked above to be subscripts of L (and a size): nothing else evaluates.
    return eval(f"lambda L, T: [{', '.join(items)}]", {"__builtins__": {}})


class _Graph:
    """One compiled variant of a chunk step: Inductor's callable and how to build its arguments."""

    def __init__(self, compiled: Callable[..., Any], arguments: Callable[..., list] | None):
        self.compiled, self.arguments = compiled, arguments


class _ChunkStep:
    """A rule's chunk step compiled by Dynamo and Inductor, called directly once compiled.

    Dynamo's frame evaluation costs several microseconds per tensor on every call (its prologue
    reads each argument, converts each float to a tensor, and wraps the call in context
    managers), more than the arithmetic of a small tensor. So after Dynamo has compiled a variant,
    a call checks the variant's own guards (Dynamo's guard manager: the same check Dynamo makes,
    on tensors, sizes and the scalars the update branches on) and calls its compiled graph with
    the arguments in the graph's order; the scalars are converted to tensors once per step, not
    once per call. Where no variant's guards pass (a new dtype or branch), or where this torch
    does not expose what the direct call needs, the call goes through Dynamo, which compiles
    the variant or runs it; :attr:`why_not_direct` says why a call could not be direct."""

    def __init__(self, update: Callable[..., Any], parallel: bool) -> None:
        # A code object of its own per rule and threading: Dynamo keeps its cache and recompile
        # count per code object, so rules do not crowd each other out of one shared limit.
        kind = "parallel" if parallel else "serial"
        name = f"_fused_{kind}_{getattr(update, '__module__', 'rule').replace('.', '_')}"
        self.code = _chunk_step.__code__.replace(co_name=name)
        self.names = self.code.co_varnames[: self.code.co_argcount]
        function = types.FunctionType(self.code, _chunk_step.__globals__, name)
        # Inductor decides each loop's threading from the sizes of the first call; these options
        # make it fixed: every loop parallel (OpenMP splits it at run time), or none.
        options: dict[str, Any] = {"cpp.dynamic_threads": True} if parallel else {"cpp.threads": 1}
        # Inductor's wrapper re-checks every input's sizes and strides on each call (a debugging
        # aid: the guards have checked them): a third of a call's host time, measured.
        options["size_asserts"] = False
        self.options = options
        self.direct: list[tuple[Any, _Graph]] = []
        self.synced: tuple[int, ...] = ()
        self.off = False  # the direct call failed once: every call goes through Dynamo
        self.why_not_direct: str | None = None
        # Calls that went through Dynamo (compiling a variant, or one not callable directly).
        self.dynamo_calls = 0
        self.dynamo = torch.compile(function, fullgraph=True, dynamic=True, backend=self._compile)

    def _compile(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """The backend: Inductor, and the record the direct call needs."""
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(graph, example_inputs, config_patches=self.options)
        record = _Graph(compiled, _argument_builder(_graph_sources()))

        def call(*args: Any) -> Any:
            return compiled(*args)

        call._torchopt_graph = record  # type: ignore[attr-defined]
        return call

    def _entries(self) -> list[Any]:
        return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(self.code)

    def _sync(self, arguments: dict[str, Any]) -> None:
        """Pair Dynamo's cache entries (in its lookup order) with the graphs compiled for them,
        after Dynamo ran on ``arguments``."""
        entries = self._entries()
        # Each compile gives an entry a code object of its own: they tell the entries apart.
        synced = tuple(id(getattr(entry, "code", entry)) for entry in entries)
        if synced == self.synced or self.off:
            return
        self.synced, self.direct, why = synced, [], None
        for entry in entries:
            check = getattr(getattr(entry, "guard_manager", None), "check", None)
            graph = _entry_graph(entry, self.code, _chunk_step.__globals__)
            if check is None or graph is None:
                why = "this torch does not expose a compiled variant's guards and graph"
            elif graph.arguments is None:
                why = "a compiled variant takes an argument the direct call does not read"
            else:
                self.direct.append((entry.guard_manager, graph))
        self.why_not_direct = why
        if self.direct and why is None:
            # Every variant is direct, so one of them is what Dynamo just ran: its guards must
            # pass on these locals, or this torch's guard manager reads them otherwise.
            try:
                passed = any(guard.check(arguments) for guard, _ in self.direct)
            except Exception as error:  # any failure turns the direct call off
                passed, why = False, f"{type(error).__name__}: {error}"
            if not passed:
                self._turn_off(why or "Dynamo's guards do not read the chunk's locals as given")

    def _turn_off(self, why: str) -> None:
        self.direct, self.off, self.why_not_direct = [], True, f"the direct call is off: {why}"

    def __call__(self, arguments: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Run the chunk step on ``arguments`` (its locals by name); ``tensors`` holds the float
        scalars as float64 tensors."""
        call = None
        try:
            for guard, graph in self.direct:
                if guard.check(arguments):
                    call = graph.compiled, graph.arguments(arguments, tensors)
                    break
        except Exception as error:  # the direct call's own machinery failed
            self._turn_off(f"{type(error).__name__}: {error}")
        if call is not None:
            compiled, args = call
            compiled(*args)
            return
        self.dynamo_calls += 1
        with _compile_settings():
            self.dynamo(**arguments)
        self._sync(arguments)


def _entry_graph(entry: Any, code: types.CodeType, scope: dict[str, Any]) -> _Graph | None:
    """The graph our backend compiled for a Dynamo cache entry: the entry's code calls it by a
    global name, under Dynamo's wrappers."""
    names = [name for name in getattr(entry, "code", code).co_names if "compiled_fn" in name]
    if len(names) != 1:
        return None
    function = scope.get(names[0])
    for _ in range(16):
        record = getattr(function, "_torchopt_graph", None)
        if record is not None:
            return record
        function = getattr(function, "__wrapped__", None) or getattr(
            function, "_torchdynamo_orig_callable", None
        )
        if function is None:
            return None
    return None


def _compiled_step(update: Callable[..., Any], parallel: bool) -> _ChunkStep:
    step = _compiled.get((update, parallel))
    if step is None:
        step = _compiled[(update, parallel)] = _ChunkStep(update, parallel)
    return step


def compile_count(update: Callable[..., Any]) -> int:
    """How many variants of the rule's compiled step exist (one per threading, dtype,
    ``maximize`` and branch of its update on the scalars): Dynamo's cache entries."""
    return sum(
        len(step._entries())
        for parallel in (False, True)
        if (step := _compiled.get((update, parallel))) is not None
    )


def _scratch_tensors(dtype: torch.dtype, count: int) -> list[list[Tensor]]:
    """Two-element (parameter, gradient, *state) to pad a chunk: updating them is harmless, and
    each pad has tensors of its own (aliased inputs would change the compiled graph)."""
    pads = _scratch.get((dtype, count, CHUNK))
    if pads is None:
        pads = [[torch.zeros(2, dtype=dtype) for _ in range(count)] for _ in range(CHUNK)]
        _scratch[(dtype, count, CHUNK)] = pads
    return pads


def _flat(tensor: Tensor) -> Tensor:
    """``tensor`` as 1-D, without a ``_base`` and without ``requires_grad``: Dynamo guards on the
    shape of a view's base, so views of differently shaped tensors would recompile. A tensor that
    is all three already (gradients, vector state) is taken as it is: about a microsecond saved
    per tensor, which adds up over hundreds of tensors a step."""
    if (
        tensor.ndim == 1
        and not tensor.requires_grad
        and tensor._base is None
        and not tensor.is_complex()
    ):
        return tensor
    tensor = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return tensor.view(-1).detach()


def _unsupported_dtype(dtype: torch.dtype) -> str | None:
    """Why the compiled path cannot update parameters of ``dtype``, or None."""
    if dtype not in DTYPES and (not dtype.is_complex or dtype.to_real() not in DTYPES):
        return f"the fused CPU path updates {list(DTYPES)}, not {dtype}"
    return None


# id(tensor) -> (a weak reference to it, its flat view): the flat views of parameters and state,
# which live across steps, so that a step does not make them again (a view and a detach cost
# 1-2 us a tensor, a third of the host time per parameter). An entry leaves with its tensor.
_views: dict[int, tuple[weakref.ref, Tensor]] = {}


def _stable_flat(tensor: Tensor) -> Tensor:
    """:func:`_flat` of a tensor that outlives the step (a parameter, a state), remembered. The
    view is reused only while it still covers the tensor's memory: the same first address and
    number of elements (``p.data = ...``, ``set_`` or ``resize_`` give it another)."""
    key = id(tensor)
    entry = _views.get(key)
    if entry is not None:
        ref, flat = entry
        if (
            ref() is tensor
            and flat.data_ptr() == tensor.data_ptr()
            and flat.numel() == tensor.numel() * (2 if tensor.is_complex() else 1)
        ):
            return flat
    flat = _flat(tensor)
    if flat is not tensor:
        _views[key] = (weakref.ref(tensor, lambda _, key=key: _views.pop(key, None)), flat)
    return flat


def _flat_member(tensors: Sequence[Tensor | None]) -> list[Tensor | None] | None:
    """A parameter's tensors (None for an absent state) flattened by :func:`_flat`, the
    parameter's and state's views remembered across steps (the gradient, often a new tensor each
    step, is not); None if one is not contiguous (the compiled loops read them as flat memory)."""
    flat: list[Tensor | None] = []
    for index, tensor in enumerate(tensors):
        if tensor is None:
            flat.append(None)
        elif not tensor.is_contiguous():
            return None
        elif index == 1:
            flat.append(_flat(tensor))
        else:
            flat.append(_stable_flat(tensor))
    return flat


def _scalar_tensors(scalars: Mapping[str, Any]) -> dict[str, Tensor]:
    """The float and int scalars as Dynamo passes them to a compiled graph (its calling
    convention keeps them at full precision: float64 and int64 CPU tensors)."""
    return {
        key: torch.as_tensor(value, dtype=torch.float64 if type(value) is float else torch.int64)
        for key, value in scalars.items()
        if type(value) in (float, int)
    }


def _compile_settings() -> Any:
    """What the compiled steps need of Dynamo when they compile: sizes neither duck-sized nor
    0/1-specialised, and a recompile limit that raises. Entered around calls that go through
    Dynamo (a config patch costs about a millisecond), not around direct calls."""
    stack = contextlib.ExitStack()
    stack.enter_context(
        torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True)
    )
    stack.enter_context(
        torch._dynamo.config.patch(
            recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        )
    )
    return stack


def fused_update(
    component: str,
    update: Callable[..., tuple[Tensor, ...]],
    members: list[tuple[list[Tensor | None], dict[str, Any]]],
    maximize: bool,
) -> list[int]:
    """Update ``members`` (each: [param, grad, *state] of one parameter, all of one dtype, and the
    scalars of its step; a state absent from its group is None) with the compiled ``update``;
    return the indices of the members it did not update (the caller runs the torch update for
    them), recording why."""
    if not members:
        return []
    dtype = members[0][0][0].dtype
    why = _unsupported_dtype(dtype)
    if why is not None:
        _backend.record(component, "fused", "torch", members[0][0][0].device, why)
        return list(range(len(members)))
    dtype = dtype.to_real() if dtype.is_complex else dtype
    rest: list[int] = []
    # (parallel, absent states, scalars) -> the flattened members of that kind, and their indices.
    chunks: dict[tuple[Any, ...], tuple[list[list[Tensor | None]], list[int]]] = {}
    # Members on the same step share their scalars dict (the optimizers compute it once per step
    # value): its key is built once per dict, not once per member.
    keys: dict[int, tuple[Any, ...]] = {}
    for index, (tensors, scalars) in enumerate(members):
        flat = _flat_member(tensors)
        if flat is None:
            _backend.record(
                component,
                "fused",
                "torch",
                tensors[0].device,
                "a parameter, gradient or state tensor is not contiguous",
            )
            rest.append(index)
            continue
        key = keys.get(id(scalars))
        if key is None:
            key = keys[id(scalars)] = scalars_key(scalars)
        # Which states are absent (None) is part of the compiled graph: chunks never mix them.
        absent = tuple([tensor is None for tensor in flat])
        kind = (flat[0].numel() >= PARALLEL_NUMEL, absent, key)
        chunk = chunks.get(kind)
        if chunk is None:
            chunk = chunks[kind] = ([], [])
        chunk[0].append(flat)
        chunk[1].append(index)
    if not chunks:
        return rest
    failure = _failed.get((update, dtype))
    if failure is not None:
        _backend.record(component, "fused", "torch", torch.device("cpu"), failure)
        return sorted(rest + [i for _, indices in chunks.values() for i in indices])
    scratch = _scratch_tensors(dtype, len(members[0][0]))
    calls = [
        (
            parallel,
            absent,
            members[indices[0]][1],
            flats[start : start + CHUNK],
            indices[start : start + CHUNK],
        )
        for (parallel, absent, _), (flats, indices) in chunks.items()
        for start in range(0, len(indices), CHUNK)
    ]
    # The float scalars as the compiled graphs take them (float64 tensors), once per scalars dict.
    as_tensors: dict[int, dict[str, Tensor]] = {}
    for done, (parallel, absent, scalars, chunk, _) in enumerate(calls):
        step = _compiled_step(update, parallel)
        if len(chunk) < CHUNK:
            chunk = chunk + [
                [None if gone else pad for gone, pad in zip(absent, pads, strict=True)]
                for pads in scratch[: CHUNK - len(chunk)]
            ]
        columns = list(zip(*chunk, strict=True))
        tensors = as_tensors.get(id(scalars))
        if tensors is None:
            tensors = as_tensors[id(scalars)] = _scalar_tensors(scalars)
        arguments = (
            update,
            list(columns[0]),
            list(columns[1]),
            [list(column) for column in columns[2:]],
            scalars,
            maximize,
        )
        try:
            step(dict(zip(step.names, arguments, strict=True)), tensors)
        except Exception as error:  # Inductor failed: the torch update runs instead
            why = f"Inductor could not compile the rule's update: {type(error).__name__}: {error}"
            _failed[(update, dtype)] = why
            _backend.record(component, "fused", "torch", torch.device("cpu"), why)
            warnings.warn(
                f"{component}: fused=True runs the rule's torch update: {why}", stacklevel=4
            )
            left = [i for *_, later in calls[done:] for i in later]
            return sorted(rest + left)
    why = "; ".join(
        sorted(
            {
                step.why_not_direct
                for (compiled, _), step in _compiled.items()
                if compiled is update and step.why_not_direct
            }
        )
    )
    _backend.record(
        component,
        "fused",
        "inductor",
        torch.device("cpu"),
        f"fused=True on CPU: the rule's update compiled by Inductor, {CHUNK} tensors per call, "
        + (f"called through Dynamo ({why})" if why else "called directly once compiled"),
    )
    return rest


def check_flags(fused: bool | None, hyperparameters: dict[str, Any]) -> None:
    """torch.optim's refusals of ``fused=True`` with flags it cannot honour, in torch's words."""
    if not fused:
        return
    if hyperparameters.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if hyperparameters.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def fused_step(
    optimizer: Any,
    device: torch.device,
    members: list[tuple[Tensor, dict[str, Any], dict[str, Any]]],
    maximize: bool,
    group: Mapping[str, Any],
) -> list[tuple[Tensor, dict[str, Any], dict[str, Any]]]:
    """The ``fused=True`` step of a rule optimizer's ``members`` (``(param, state, scalars)`` of
    one device and dtype, of ``group``) that the Triton rule kernel did not take; returns those
    left to the rule's torch update (each recorded with its reason)."""
    name = type(optimizer).__name__
    if torch.compiler.is_compiling():
        # Inside a compiled step (``torch.compile(optimizer.step)``) the compiler fuses the traced
        # torch update itself.
        return members
    if device.type != "cpu":
        # On CUDA the fused path is the Triton rule kernel; backend='torch' asks for none.
        raise RuntimeError(
            f"{name}: fused=True on {device.type} tensors runs the fused Triton rule kernel, "
            f"which backend={optimizer.backend!r} did not run (see torchopt_lab.backend_info()); "
            "pass backend='auto' or 'triton', or fused=None"
        )
    rule = optimizer.rule
    component = f"optim.{name} (fused)"
    left: list[tuple[Tensor, dict[str, Any], dict[str, Any]]] = []
    if rule.complex_as_real is False and any(p.is_complex() for p, _, _ in members):
        # The compiled update takes real tensors; this rule's update reads complex ones.
        left += [m for m in members if m[0].is_complex()]
        _backend.record(
            component,
            "fused",
            "torch",
            device,
            "the rule updates complex tensors as complex, which the fused CPU path does not",
        )
        members = [m for m in members if not m[0].is_complex()]
    entries = [entry for entry in rule.state if not entry.scalar]
    # State the update creates (State.init=None, SGD's first momentum buffer) is not there yet on
    # a parameter's first step: the torch update runs that step (the compiled one writes in place).
    created = [e.name for e in entries if e.init is None and e.exists(group)]
    if created:
        first = [m for m in members if any(m[1].get(key) is None for key in created)]
        if first:
            _backend.record(
                component,
                "fused",
                "torch",
                device,
                f"first step: the update creates {created}, so the torch update ran (later "
                "steps are compiled)",
            )
            left += first
            members = [m for m in members if all(m[1].get(key) is not None for key in created)]
    kept = [e.name if e.exists(group) else None for e in entries]
    updated = [
        ([p, p.grad, *(None if key is None else state[key] for key in kept)], scalars)
        for p, state, scalars in members
    ]
    rest = fused_update(component, rule.update, updated, maximize)
    return left + [members[i] for i in rest]


def compiles_builtin(optimizer: Any) -> bool:
    """Whether a built-in optimizer's ``fused=True`` CPU step is the compiled rule update (see
    :data:`TORCH_KERNELS`): it needs a rule with a per-tensor ``update`` and no scalar state."""
    cls = type(optimizer)
    rule = getattr(cls, "rule", None)
    if rule is None or rule.update is None or rule.scalar_state:
        return False
    return not (TORCH_KERNELS and cls._reference.__name__ in _TORCH_FUSED_CPU)


def builtin_step(
    optimizer: Any, group: Mapping[str, Any], tensors: dict[str, list[Any]]
) -> tuple[list[int], dict[str, list[Any]]]:
    """The compiled ``fused=True`` CPU step of a built-in optimizer's tensor lists (one part, in
    ``_reference``'s argument order; gradients already unscaled and clipped): increments the
    step of each parameter it updates and returns the indices of the others with their lists,
    left to the torch update (a parameter's first step where the update creates its state, a
    non-contiguous tensor, Inductor failing), each recorded."""
    rule = type(optimizer).rule
    component = f"optim.{type(optimizer).__name__} (fused)"
    params, grads = tensors["params"], tensors["grads"]
    count = len(params)
    steps = tensors["state_steps"] if rule.step_state else None
    hyperparameters = {key: as_number(value) for key, value in group.items() if key != "params"}
    by_name = {entry.name: name for entry, name in optimizer._state_entries}
    columns = [
        tensors[by_name[e.name]] if e.exists(group) else None for e in rule.state if not e.scalar
    ]
    created = [
        c
        for e, c in zip([e for e in rule.state if not e.scalar], columns, strict=True)
        if e.init is None and c is not None
    ]
    first = [i for i in range(count) if any(column[i] is None for column in created)]
    if first:
        _backend.record(
            component,
            "fused",
            "torch",
            params[0].device,
            "first step: the update creates its state, so the torch update ran (later steps are "
            "compiled)",
        )
    skipped = set(first)
    by_step: dict[Any, dict[str, Any]] = {}
    members: list[tuple[list[Tensor | None], dict[str, Any]]] = []
    indices: list[int] = []
    # One host read for all step counts (a read each costs a microsecond per parameter).
    counts = torch.stack(steps).tolist() if steps else [None] * count
    for i in range(count):
        if i in skipped:
            continue
        step = None if counts[i] is None else counts[i] + 1
        scalars = by_step.get(step)
        if scalars is None:
            scalars = by_step[step] = rule.scalars(hyperparameters, step, {})
        state = [None if column is None else column[i] for column in columns]
        members.append(([params[i], grads[i], *state], scalars))
        indices.append(i)
    rest = fused_update(component, rule.update, members, bool(group.get("maximize", False)))
    left = sorted(skipped | {indices[i] for i in rest})
    if steps is not None:
        done = set(left)
        torch._foreach_add_([steps[i] for i in range(count) if i not in done], 1)
    sub = {
        key: [values[i] for i in left] if len(values) == count else values
        for key, values in tensors.items()
    }
    return left, sub
