"""``fused=True`` on CPU tensors for the optimizers declared as rules: the rule's element-wise
``update`` compiled by Inductor (``torch.compile``) into one pass over each tensor's memory.

The compiled function updates a *chunk* of :data:`CHUNK` tensors per call, each flattened to
1-D: the rule's ``update`` out of place, then ``copy_`` into the parameter and state tensors,
which Inductor turns into the stores of one loop per tensor (each element of the parameter,
gradient and state read once, the parameter and state written once). A call has a fixed host
cost whatever its size, so chunks amortise it over many tensors, and the arithmetic runs at
memory bandwidth, like torch's fused CPU kernels. Once Dynamo has compiled a variant, calls skip
its frame evaluation (:class:`_ChunkStep`): the variant's guards are checked by Dynamo's own
guard manager (its guards on sizes compiled to C++) and its graph is called with the arguments
in order. Each optimizer keeps a :class:`_Plan` per list of parameters it steps: the flat views
of the parameters and state and the chunks' layout, checked each step (same tensors, addresses,
sizes, contiguity) and rebuilt when any changed, so a step flattens only the gradients. A chunk
called again with nothing its variant depends on changed (:class:`_Memo`, kept in the plan)
skips even the guard check and AOTAutograd's runtime wrapper: Inductor's compiled module is
called with the inputs it writes bumped, about 45 us less a call. The built-ins' float32 step
counts are incremented inside the compiled serial call. Host time per step, measured
(2026-12-03, 1 thread, Adam's update over 204 tensors of 360 elements): 5.3 ms through Dynamo,
about 1.1-1.5 ms called directly, torch's fused Adam 0.8 ms; Inductor's per-call size asserts
(off here: the guards have checked the sizes) took a third of a call. Over 2000 small tensors
(1 thread, same process) the plans took the built-in Adam's whole step from 59 to 33 ms and the
counts in the compiled call to about 2x torch's fused Adam. The generated C++ is one vectorised
loop per tensor (AVX-512 where the CPU has it) with a masked tail.

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
import math
import operator
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchopt_lab import backend as _backend
from torchopt_lab.optim._scalars import _PLAIN_SCALARS, as_number, increment, scalars_key

__all__ = [
    "CHUNK",
    "DTYPES",
    "MEMO",
    "PARALLEL_NUMEL",
    "TORCH_KERNELS",
    "builtin_step",
    "check_flags",
    "compile_count",
    "compiles_builtin",
    "fused_step",
    "fused_update",
]

#: Whether a chunk called again with nothing its compiled variant depends on changed skips
#: Dynamo's guard check and AOTAutograd's runtime wrapper (:class:`_Memo`).
MEMO = True
#: Tensors per compiled call. More amortises the host's call overhead over more tensors but
#: lengthens the one-time compile (Inductor writes one loop per tensor of the chunk).
CHUNK = 16
#: Parameter dtypes the compiled path updates (complex ones as real views).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The built-in optimizers whose torch counterpart has a fused CPU kernel (SGD and Momentum,
#: Adagrad, Adam, AdamW) run torch's kernel for ``fused=True`` on CPU tensors while this is True
#: (the default); False compiles their rule's ``update`` like every rule optimizer's. RMSprop
#: (``fused`` an attribute: torch's has none) always compiles its ``update``. Measured
#: (2026-12-03 20:08-20:20 UTC, 2 threads, a noisy machine; bench-cpu-fused "declared" rows and
#: paired runs, docs/benchmarks.md): the built-ins' compiled declaration / torch fused 1.08-1.28
#: in one bench run and paired medians of 1.06-1.22 on the transformer set, 1.6-2.3 on 2000 small
#: tensors (the engine's host work per parameter on top of the loops: a compiled Adam call over
#: 16 large tensors took 1.02-1.13x torch's fused Adam on the same memory, 1 and 2 threads).
TORCH_KERNELS = True
# The torch.optim functions (the built-ins' ``_reference`` names) with a fused CPU kernel.
_TORCH_FUSED_CPU = frozenset({"sgd", "adagrad", "adam", "adamw"})
#: Tensors of at least this many elements are updated by all threads (one OpenMP loop each);
#: smaller ones by one thread each, in chunks of their own, as torch's fused kernels do below
#: their grain size (a parallel loop's barrier costs more than a small tensor's update, and far
#: more when the machine's cores are busy).
PARALLEL_NUMEL = 32768
# Parameter types whose memory the compiled loops read, known without asking (wrapper subclasses,
# DTensor's kind, have none of their own; other subclasses do).
_PLAIN = frozenset({Tensor, torch.nn.Parameter})
# Plans (:class:`_Plan`) one optimizer keeps: one per (param group, dtype, update branch) it steps.
_PLANS = 32
# Recompilations allowed per rule (dtypes x maximize x branches on the scalars) before raising.
_RECOMPILE_LIMIT = 64

# (rule.update, parallel) -> its compiled chunk step; (rule.update, dtype) -> why compiling failed.
_compiled: dict[tuple[Callable[..., Any], bool], _ChunkStep] = {}
_failed: dict[tuple[Callable[..., Any], torch.dtype], str] = {}
# (dtype, tensors per parameter, CHUNK) -> scratch (param, grad, *state) to pad the last chunk.
_scratch: dict[tuple[torch.dtype, int, int], list[list[Tensor]]] = {}
# CHUNK -> scratch float32 step counts to pad the last chunk.
_scratch_counts: dict[int, list[Tensor]] = {}


def _chunk_step(
    update: Callable[..., tuple[Tensor, ...]],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor | None]],
    scalars: dict[str, Any],
    maximize: bool,
    steps: list[Tensor] | None,
) -> None:
    """What the compiled function runs: ``update`` over each tensor of a chunk, written back (a
    state absent from the parameter's group, ``State.when``, is None in and None out), and the
    parameters' step counts incremented where given (in the compiled loops: a foreach add on
    the host costs microseconds per count, as much as a small parameter's update)."""
    for i in range(len(params)):
        grad = -grads[i] if maximize else grads[i]
        results = update(params[i], grad, *(state[i] for state in states), **scalars)
        params[i].copy_(results[0])
        for state, result in zip(states, results[1:], strict=True):
            if state[i] is not None:
                state[i].copy_(result)
    if steps is not None:
        for step in steps:
            step.add_(1)


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
    """One compiled variant of a chunk step: Inductor's callable and how to build its arguments,
    and (:func:`_raw_call`) the compiled module under AOTAutograd's runtime wrapper with the
    names of the float scalars it takes as tensors, or None where it cannot be called so."""

    def __init__(
        self,
        compiled: Callable[..., Any],
        arguments: Callable[..., list] | None,
        raw: tuple[Callable[[list], Any], frozenset[str]] | None = None,
    ):
        self.compiled, self.arguments = compiled, arguments
        self.raw = raw


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
        sources = _graph_sources()
        record = _Graph(compiled, _argument_builder(sources), _raw_call(compiled, sources))

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

    def __call__(self, arguments: dict[str, Any], tensors: dict[str, Tensor]) -> _Graph | None:
        """Run the chunk step on ``arguments`` (its locals by name); ``tensors`` holds the float
        scalars as float64 tensors. Returns the variant whose guards passed on ``arguments`` and
        which ran, or None where the call went through Dynamo."""
        call = None
        try:
            for index, (guard, graph) in enumerate(self.direct):
                if guard.check(arguments):
                    call = graph, graph.arguments(arguments, tensors)
                    if index:
                        # The variant used last is tried first, as Dynamo orders its cache: a
                        # failed check costs as much as a passing one, and the chunks of one
                        # step (or param group) run one variant.
                        self.direct.insert(0, self.direct.pop(index))
                    break
        except Exception as error:  # the direct call's own machinery failed
            self._turn_off(f"{type(error).__name__}: {error}")
        if call is not None:
            graph, args = call
            graph.compiled(*args)
            return graph
        self.dynamo_calls += 1
        with _compile_settings():
            self.dynamo(**arguments)
        self._sync(arguments)
        return None


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


def _inductor_graph(compiled: Any) -> Any:
    """Inductor's compiled graph (``CompiledFxGraph``) inside AOTAutograd's wrappers of it (their
    closures and attributes), or None where this torch keeps it elsewhere."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:  # torch < 2.6
        try:
            from torch._inductor.codecache import CompiledFxGraph
        except ImportError:
            return None
    seen: set[int] = set()
    todo = [(compiled, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, CompiledFxGraph):
            return value
        if id(value) in seen or depth >= 8 or isinstance(value, (type, types.ModuleType)):
            continue
        seen.add(id(value))
        for cell in getattr(value, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                todo.append((cell.cell_contents, depth + 1))
        if not isinstance(value, types.FunctionType):
            todo += [(v, depth + 1) for v in getattr(value, "__dict__", {}).values() if callable(v)]
    return None


def _versions_bumped_by_list() -> bool:
    """Whether ``torch._C._increment_version`` takes a list of tensors (torch >= 2.6)."""
    probe = torch.zeros(1)
    before = probe._version
    try:
        torch._C._increment_version([probe])
    except TypeError:
        return False
    return probe._version == before + 1


_BUMPS_LISTS = _versions_bumped_by_list()


def _raw_call(
    compiled: Any, sources: list[tuple[str, bool]] | None
) -> tuple[Callable[[list], Any], frozenset[str]] | None:
    """A call of the compiled module itself (Inductor's ``call``, which reads each input's sizes
    and runs the C++ loops) with the version counters of the inputs it writes bumped as
    AOTAutograd's runtime wrapper does, and the names of the float scalars it takes as tensors;
    or None where that is not exactly what the wrapper would run: it must write exactly the
    parameters, state and step counts in place (Inductor's mutated inputs at their argument
    positions), so no input is moved, merged or copied back by the wrapper."""
    graph = _inductor_graph(compiled)
    if not _BUMPS_LISTS or sources is None or graph is None:
        return None
    module = getattr(graph, "current_callable", None)
    mutated = getattr(graph, "mutated_input_idxs", None)
    written = {
        index
        for index, (name, _) in enumerate(sources)
        if name.startswith(("L['params']", "L['states']", "L['steps']")) and "size" not in name
    }
    if module is None or mutated is None or set(mutated) != written:
        return None
    order = sorted(written)
    bump = torch._C._increment_version

    def call(args: list) -> None:
        bump([args[i] for i in order])
        module(args)  # Inductor's call empties the list

    floats = frozenset(
        m.group(1) for name, as_tensor in sources if as_tensor and (m := _SCALAR.fullmatch(name))
    )
    return call, floats


def _ambient() -> tuple[Any, ...]:
    """The global state Dynamo's guards check that can change between steps: grad and inference
    mode, torch function and dispatch modes, autocast, deterministic algorithms."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._is_torch_function_enabled(),
        torch._C._len_torch_function_stack(),
        torch._C._len_torch_dispatch_stack(),
        _autocast_cpu(),
        torch.are_deterministic_algorithms_enabled(),
    )


# Whether this torch shows all of :func:`_ambient` (else no memo: every call checks the guards).
_AMBIENT_SHOWN = all(
    hasattr(torch._C, name)
    for name in (
        "_is_torch_function_enabled",
        "_len_torch_function_stack",
        "_len_torch_dispatch_stack",
    )
)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device
        return torch.is_autocast_cpu_enabled()


def _scalar_shape(scalars: Mapping[str, Any], floats: frozenset[str]) -> tuple[Any, ...] | None:
    """What of a step's scalars a compiled variant's guards can depend on: the scalars' key
    (:func:`scalars_key`: types and values, signed zeros apart), with each float the variant
    takes as a tensor input reduced to whether it is NaN, all its guards ask of it (Dynamo's
    guards on the floats it specialised on, and on ints and bools, are on values); None where a
    scalar is not a number, bool or None (a tensor's guards are on more than its value): such
    steps always check the guards."""
    if not all(type(value) in _PLAIN_SCALARS for value in scalars.values()):
        return None
    return scalars_key(
        {
            key: math.isnan(value) if key in floats and type(value) is float else value
            for key, value in scalars.items()
        }
    )


# What of a gradient the memo compares (with its type and size): dtype and device.
_meta = operator.attrgetter("dtype", "is_cpu")


class _Memo:
    """What one chunk's call passed Dynamo's guards with, so that the next step's call of the same
    chunk, with all of it unchanged, runs the same compiled variant without checking the guards
    again nor going through AOTAutograd's runtime wrapper (``_Graph.raw``): measured, 37 us and
    11 us of a call of 16 parameters with two states (the guard check covers some 80 tensors),
    against the memo's own 4 us.

    The guards check the tensors' types, dispatch keys, dtypes, devices, dimensions, strides and
    the relations of their sizes; the scalars the update branches on; the update itself and the
    globals it reads; and the global state. Here: the parameters and state are the plan's own
    flat views (unchanged while the plan fits) and the scratch pads; the step counts must be the
    same tensors; each gradient (a new tensor every step, made flat and contiguous, a negative
    bit resolved, by :func:`_flat_grads`) must be a plain tensor (no subclass) on the CPU with the
    same dtype and size, all that the compiled loops read of it (one whose memory cannot be read,
    a functorch wrapper's, fails the call, which then goes through the guards); the scalars the
    same by :func:`_scalar_shape`, the global state by :func:`_ambient`. The update must be one of
    this package's (:func:`_own`): its globals are modules and functions, while a rule of a
    user's own may read a global that changes, which only Dynamo's guards see."""

    __slots__ = ("ambient", "chunk", "graph", "metas", "numels", "shape", "steps")

    def __init__(
        self,
        graph: _Graph,
        chunk: list[int],
        grads: list[Tensor],
        steps: list[Tensor] | None,
        shape: tuple[Any, ...],
        ambient: tuple[Any, ...],
    ) -> None:
        self.graph, self.chunk, self.steps = graph, chunk, steps
        self.shape, self.ambient = shape, ambient
        self.numels = list(map(Tensor.numel, grads))
        self.metas = list(map(_meta, grads))

    def fits(
        self,
        chunk: list[int],
        grads: list[Tensor],
        steps: list[Tensor] | None,
        shape: tuple[Any, ...],
        ambient: tuple[Any, ...],
    ) -> bool:
        return (
            chunk == self.chunk
            and shape == self.shape
            and ambient == self.ambient
            and all(type(grad) is Tensor for grad in grads)
            and list(map(Tensor.numel, grads)) == self.numels
            and list(map(_meta, grads)) == self.metas
            and (
                self.steps is None
                if steps is None
                else self.steps is not None and all(map(operator.is_, steps, self.steps))
            )
        )


def _own(update: Callable[..., Any]) -> bool:
    """Whether ``update`` is one of this package's (see :class:`_Memo`)."""
    return getattr(update, "__module__", "").startswith("torchopt_lab.")


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


def _scratch_steps(count: int) -> list[Tensor]:
    """``count`` float32 step counts to pad a chunk (the compiled loops count float32 ones only),
    each a tensor of its own."""
    pads = _scratch_counts.get(CHUNK)
    if pads is None:
        pads = _scratch_counts[CHUNK] = [torch.zeros((), dtype=torch.float32) for _ in range(CHUNK)]
    return pads[:count]


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


class _Plan:
    """The flat views of one list of members' parameters and state, and which of those members
    the compiled path takes (contiguous) and how (all threads or one): kept across steps while
    the same tensors stay where they were, so that a step flattens its gradients only.

    Making a flat view costs 1-2 us a tensor and deciding a member's kind about as much: over
    hundreds of parameters, more than the optimizer's whole update of small ones. A plan holds
    the same tensors its caller's lists hold (the optimizer's parameters and state) and is
    rebuilt on the first step on which any differs: another object, or the same one at another
    address, with another number of elements or no longer contiguous (``p.data = ...``,
    ``set_``, ``resize_``), all that a flat view depends on."""

    __slots__ = ("columns", "flats", "kept", "left", "marks", "memos", "parallel", "serial")

    def __init__(self, kept: list[Tensor], count: int, absent: tuple[bool, ...]) -> None:
        self.kept = kept
        self.marks = _marks(kept)
        # A tensor with the negative bit set (a lazy negation) is left to the torch update, like
        # one with gaps: the compiled loops read and write its memory as it is.
        contiguous = [flat and not t.is_neg() for t, flat in zip(kept, self.marks[2], strict=True)]
        self.flats = [_flat(t) if flat else t for t, flat in zip(kept, contiguous, strict=True)]
        # The flat views of each state of the update (``kept`` holds the parameters, then each
        # state present), None for a state absent from the group.
        self.columns: list[list[Tensor] | None] = []
        start = count
        for gone in absent:
            self.columns.append(None if gone else self.flats[start : start + count])
            start += 0 if gone else count
        # Members with a tensor the compiled loops cannot read as flat memory.
        left = {index % count for index, flat in enumerate(contiguous) if not flat}
        self.left = sorted(left)
        # Elements of the flat view (a complex tensor's real view has twice its own).
        numels = [self.flats[i].numel() for i in range(count)]
        taken = [i for i in range(count) if i not in left]
        self.parallel = [i for i in taken if numels[i] >= PARALLEL_NUMEL]
        self.serial = [i for i in taken if numels[i] < PARALLEL_NUMEL]
        # (threading, first member) -> the :class:`_Memo` of that chunk's last call.
        self.memos: dict[tuple[bool, int], _Memo] = {}

    def fits(self, kept: list[Tensor]) -> bool:
        """Whether ``kept`` are this plan's tensors, where they were."""
        return (
            len(kept) == len(self.kept)
            and all(map(operator.is_, kept, self.kept))
            and _marks(kept) == self.marks
        )


def _marks(tensors: list[Tensor]) -> tuple[list[int], list[int], list[bool]]:
    """What a tensor's flat view depends on: its address, number of elements and contiguity
    (three passes of C calls: a quarter of a microsecond a tensor, a third of a tuple's)."""
    return (
        list(map(Tensor.data_ptr, tensors)),
        list(map(Tensor.numel, tensors)),
        list(map(Tensor.is_contiguous, tensors)),
    )


def _flat_grads(grads: list[Tensor]) -> list[Tensor | None]:
    """The gradients by :func:`_flat` (None for one that is not contiguous), made every step:
    gradients are usually new tensors each step. A gradient with the negative bit set (a lazy
    negation: its memory holds minus its value) is resolved first: the compiled loops read
    memory, and read it unnegated."""
    return [
        _flat(g.resolve_neg() if g.is_neg() else g) if g.is_contiguous() else None for g in grads
    ]


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
    if "enable_cpp_symbolic_shape_guards" in torch._dynamo.config._config:
        # The guards on sizes compiled to C++ rather than evaluated as a Python lambda: a third
        # of a direct call's host time, measured.
        stack.enter_context(torch._dynamo.config.patch(enable_cpp_symbolic_shape_guards=True))
    return stack


def fused_update(
    component: str,
    update: Callable[..., tuple[Tensor, ...]],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor] | None],
    scalars: dict[str, Any] | list[dict[str, Any]],
    maximize: bool,
    plans: dict[Any, _Plan] | None = None,
    steps: list[Tensor] | None = None,
) -> list[int]:
    """Update ``params`` (all of one dtype) with the compiled ``update``; return the indices of
    those it did not update (the caller runs the torch update for them), recording why.

    ``states`` holds one list per state of ``update`` (None for a state absent from the group,
    ``State.when``); ``scalars`` is the scalars of the step, or one dict per parameter (those on
    the same step share one dict). ``plans``, a dict the caller keeps across steps (one per
    optimizer), remembers the flat views of the parameters and state (:class:`_Plan`).
    ``steps``, the parameters' step counts (0-dim tensors), are incremented for those updated."""
    count = len(params)
    if not count:
        return []
    dtype = params[0].dtype
    # The dtype the compiled loops see (a complex parameter as its real view).
    real = dtype.to_real() if dtype.is_complex else dtype
    why = _unsupported_dtype(dtype)
    if why is None:
        why = _failed.get((update, real))
    if why is not None:
        _backend.record(component, "fused", "torch", params[0].device, why)
        return list(range(count))
    if not all(type(p) in _PLAIN or not is_traceable_wrapper_subclass(p) for p in params):
        # A wrapper subclass (DTensor, ...) holds no flat memory of its own to loop over.
        _backend.record(
            component,
            "fused",
            "torch",
            params[0].device,
            "the parameters are a tensor subclass, which the compiled loops cannot read",
        )
        return list(range(count))
    kept = [*params, *(t for column in states if column is not None for t in column)]
    absent = tuple(column is None for column in states)
    # A plan holds its first parameter, so no other tensor takes that id while the plan lives.
    key = (update, maximize, absent, id(params[0]))
    plan = None if plans is None else plans.get(key)
    if plan is None or not plan.fits(kept):
        plan = _Plan(kept, count, absent)
        if plans is not None:
            if key not in plans and len(plans) >= _PLANS:
                plans.clear()  # plans of lists no longer stepped (their tensors are held)
            plans[key] = plan
    flat_grads = _flat_grads(grads)
    left = sorted({*plan.left, *(i for i, g in enumerate(flat_grads) if g is None)})
    if left:
        _backend.record(
            component,
            "fused",
            "torch",
            params[0].device,
            "a parameter, gradient or state tensor is not contiguous",
        )
    # Members of each kind (threading, scalars) in chunks: a compiled call runs one kind.
    per_member = isinstance(scalars, list)
    kinds: dict[tuple[Any, ...], list[int]] = {}
    keys: dict[int, tuple[Any, ...]] = {}
    for parallel, indices in ((False, plan.serial), (True, plan.parallel)):
        if left:
            indices = [i for i in indices if flat_grads[i] is not None]
        if not per_member:
            if indices:
                kinds[(parallel, 0)] = indices
            continue
        for i in indices:
            # Members share a chunk only with the same scalars, signed zeros and types
            # included (0.0 == -0.0, but a member given -0.0 must not get +0.0).
            step_scalars = scalars[i]
            scalars_id = id(step_scalars)
            scalar_key = keys.get(scalars_id)
            if scalar_key is None:
                scalar_key = keys[scalars_id] = scalars_key(step_scalars)
            kinds.setdefault((parallel, scalar_key), []).append(i)
    if not kinds:
        return left
    flats, columns = plan.flats, plan.columns
    pads = _scratch_tensors(real, 2 + len(states))
    # The float scalars as the compiled graphs take them (float64 tensors), once per scalars dict.
    as_tensors: dict[int, dict[str, Tensor]] = {}
    calls = [
        (parallel, indices[start : start + CHUNK])
        for (parallel, _), indices in kinds.items()
        for start in range(0, len(indices), CHUNK)
    ]
    # The serial loops count their members' steps where those are float32, as torch.optim makes
    # them unless the default dtype is float64: Dynamo takes a float64 0-dim input for a Python
    # float, and its in-place add is dropped from the graph (torch 2.13, measured), so float64
    # counts are added on the host, as a parallel call's are.
    in_loops = steps is not None and all(step.dtype is torch.float32 for step in steps)
    # Chunks unchanged since their last call skip Dynamo's guards (:class:`_Memo`).
    memos = plan.memos if MEMO and _AMBIENT_SHOWN and plans is not None and _own(update) else None
    ambient = _ambient() if memos is not None else ()
    shapes: dict[tuple[int, int], tuple[Any, ...]] = {}
    for done, (parallel, chunk) in enumerate(calls):
        step = _compiled_step(update, parallel)
        pad = pads[: CHUNK - len(chunk)]
        step_scalars = scalars[chunk[0]] if per_member else scalars
        tensors = as_tensors.get(id(step_scalars))
        if tensors is None:
            tensors = as_tensors[id(step_scalars)] = _scalar_tensors(step_scalars)
        grads_in = [flat_grads[i] for i in chunk]
        steps_in = (
            None
            if parallel or not in_loops
            else [steps[i] for i in chunk] + _scratch_steps(len(pad))
        )
        arguments = (
            update,
            [flats[i] for i in chunk] + [p[0] for p in pad],
            grads_in + [p[1] for p in pad],
            [
                [None] * CHUNK
                if column is None
                else [column[i] for i in chunk] + [p[2 + k] for p in pad]
                for k, column in enumerate(columns)
            ],
            step_scalars,
            maximize,
            # The serial loops count their members' steps; a parallel call leaves its (few, large)
            # members' counts to one host add below: a count in a parallel region is an OpenMP
            # `single` with a barrier each.
            steps_in,
        )
        local = dict(zip(step.names, arguments, strict=True))
        try:
            memo = None if memos is None else memos.get((parallel, chunk[0]))
            if memo is not None:
                raw = memo.graph.raw
                key = (id(step_scalars), id(raw))
                shape = shapes.get(key)
                if shape is None:
                    shape = shapes[key] = _scalar_shape(step_scalars, raw[1])
                if shape is not None and memo.fits(chunk, grads_in, steps_in, shape, ambient):
                    try:
                        raw[0](memo.graph.arguments(local, tensors))
                        continue
                    except Exception:  # the raw call's own machinery: guarded calls from now
                        memo.graph.raw = None
                        memos.clear()
            graph = step(local, tensors)
            if memos is not None and graph is not None and graph.raw is not None:
                shape = _scalar_shape(step_scalars, graph.raw[1])
                if shape is not None:
                    memos[(parallel, chunk[0])] = _Memo(
                        graph, chunk, grads_in, steps_in, shape, ambient
                    )
        except Exception as error:  # Inductor failed: the torch update runs instead
            why = f"Inductor could not compile the rule's update: {type(error).__name__}: {error}"
            _failed[(update, real)] = why
            _backend.record(component, "fused", "torch", torch.device("cpu"), why)
            warnings.warn(
                f"{component}: fused=True runs the rule's torch update: {why}", stacklevel=4
            )
            _count(steps, calls[:done], in_loops)
            return sorted(left + [i for _, later in calls[done:] for i in later])
    _count(steps, calls, in_loops)
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
    return left


def _count(steps: list[Tensor] | None, calls: list[tuple[bool, list[int]]], in_loops: bool) -> None:
    """Increment the step counts of the members of the ``calls`` that ran which the compiled
    loops did not count (the parallel calls', or every call's without ``in_loops``)."""
    if steps is not None:
        counts = [steps[i] for parallel, chunk in calls if parallel or not in_loops for i in chunk]
        increment(counts)


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
    rest = fused_update(
        component,
        rule.update,
        [p for p, _, _ in members],
        [p.grad for p, _, _ in members],
        [None if key is None else [state[key] for _, state, _ in members] for key in kept],
        [scalars for _, _, scalars in members],
        maximize,
        _plans(optimizer),
    )
    return left + [members[i] for i in rest]


def _plans(optimizer: Any) -> dict[Any, _Plan]:
    """The optimizer's plans (:class:`_Plan`), kept in its ``__dict__``, which torch.optim's
    ``__getstate__`` leaves out of pickles and copies; :func:`forget_plans` drops them."""
    return optimizer.__dict__.setdefault("_cpu_fused_plans", {})


def forget_plans(optimizer: Any) -> None:
    """Drop the optimizer's plans and the tensors they hold (``load_state_dict`` replaces its
    state: the old tensors must not stay alive until the next step)."""
    optimizer.__dict__.pop("_cpu_fused_plans", None)


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
    first = sorted({i for column in created for i, value in enumerate(column) if value is None})
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
    # One host read for all step counts (a read each costs a microsecond per parameter).
    counts = torch.stack(steps).tolist() if steps else [None]
    by_step: dict[Any, dict[str, Any]] = {}
    for value in set(counts):
        step = None if value is None else value + 1
        by_step[value] = rule.scalars(hyperparameters, step, {})
    indices = [i for i in range(count) if i not in skipped] if skipped else list(range(count))
    if skipped:
        params, grads = [params[i] for i in indices], [grads[i] for i in indices]
        columns = [None if c is None else [c[i] for i in indices] for c in columns]
    scalars: dict[str, Any] | list[dict[str, Any]] = by_step[counts[0]]
    if len(by_step) > 1:
        scalars = [by_step[counts[i]] for i in indices]
    rest = fused_update(
        component,
        rule.update,
        params,
        grads,
        columns,
        scalars,
        bool(group.get("maximize", False)),
        _plans(optimizer),
        None if steps is None else [steps[i] for i in indices] if skipped else steps,
    )
    left = sorted(skipped | {indices[i] for i in rest})
    sub = {
        key: [values[i] for i in left] if len(values) == count else values
        for key, values in tensors.items()
    }
    return left, sub
