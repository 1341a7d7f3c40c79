"""Multi-tensor optimizer-step kernels: one launch updates every tensor of a (device, dtype) group.

The update rules are documented once, next to the torch reference path, in
``torchopt_lab/optim/{sgd,adagrad,rmsprop,adam}.py``; each ``*_update`` function here follows those
lines in the same order. One kernel skeleton, :func:`_optimizer_step_kernel`, runs every
algorithm, the built-in ones and every rule of :mod:`torchopt_lab.optim.rules` alike: it loads
the parameter, gradient, state and hyperparameter row, unscales and clips the gradient, calls the
update (a ``@triton.jit`` function passed as the ``UPDATE`` constexpr, so each compiled variant
inlines one), stores the new parameter and state and counts the block done. Each built-in
algorithm is one :class:`KernelUpdate` declaration (its update, hyperparameter fields, states and
options), from which the launchers and the optimizers read every order. These kernels are
private: call them through :mod:`triton_kernels.optim.launchers`, which checks the inputs and
builds the tables below.

**Tables.** A launch covers ``tensor_count`` tensors cut into blocks of ``BLOCK`` elements:

- ``tensor_table``: int64, shape ``[TABLE_ROWS, tensor_count]``. Rows: the addresses
  (``data_ptr()``) of the parameter, its gradient, up to three state tensors and the ``step``
  scalar, then the element count, the hyperparameter row (param group, or a rule's per-step
  scalars) and a per-tensor flag (SGD: "initialise the momentum buffer from this gradient").
- ``block_table``: int64, shape ``[2, block_count]``: for each program, its tensor and the offset
  of its first element in that tensor.
- ``hyperparameters``: float64, shape ``[group_count, FIELD_COUNT]``, read on the device, so a
  scheduler's new lr costs no recompilation and no host synchronisation.

**Full and partial blocks.** A block that lies inside its tensor loads and stores without a mask;
the last block of a tensor masks its tail. ``NUMEL_MULTIPLE`` (a power of two the launcher found
to divide every element count) tells the compiler that the tail's mask changes only every
``NUMEL_MULTIPLE`` elements, so the tails of aligned tensors also move 128 bits per access: with
thousands of small tensors most blocks are tails. The choice is per launch, not per tensor: a
per-tensor branch between aligned and odd tails (tried) raised float32 Adam from 60 to 77 registers
per thread and made float64 Adam spill.

**Per-tensor completion.** Each program increments ``block_counters[tensor]`` after its stores; the
last program of a tensor writes the incremented ``step`` (every program read the old one before
its increment), publishes the diagnostics of the tensor and resets the counter, so the next launch
finds it at zero. Hence one launch per step, with no separate ``step += 1`` kernel.

**Scalars in float64.** Bias corrections and the clip coefficient are per-program scalars computed
in float64 from float64 hyperparameters, as torch does on the host in Python floats; only the
element-wise arithmetic runs in ``COMPUTE_DTYPE`` (float32, or float64 for float64 parameters).
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

# Rows of ``tensor_table`` (constexpr so the kernels can name them).
PARAM_ROW = tl.constexpr(0)
GRAD_ROW = tl.constexpr(1)
STATE_ROW = tl.constexpr(2)  # up to three state tensors: rows 2, 3, 4
STEP_ROW = tl.constexpr(5)
NUMEL_ROW = tl.constexpr(6)
GROUP_ROW = tl.constexpr(7)
FLAG_ROW = tl.constexpr(8)
TABLE_ROWS = 9

# Columns of the per-tensor diagnostics buffer (``MultiTensorTable.diagnostics``, shape
# ``[tensor_count, 3]``) that ``RECORD_NORMS`` fills.
DIAGNOSTIC_FIELDS = ("grad_sq_norm", "update_sq_norm", "param_sq_norm")

# State rows of ``tensor_table`` (rows ``STATE_ROW`` to ``STATE_ROW + STATE_SLOTS - 1``).
STATE_SLOTS = 3


@triton.jit
def _address(
    tensor_table, row, tensor, tensor_count, DTYPE: tl.constexpr, ASSUME_ALIGNED: tl.constexpr
):
    """The address of ``tensor``'s data in table ``row`` as a pointer to ``DTYPE``."""
    pointer = tl.load(tensor_table + row * tensor_count + tensor).to(tl.pointer_type(DTYPE))
    if ASSUME_ALIGNED:
        # The launcher checked every address is 16-byte aligned: this lets float32 move 128 bits
        # per load and store.
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _locate_block(
    tensor_table,
    block_table,
    tensor_count,
    block_count,
    BLOCK: tl.constexpr,
    NUMEL_MULTIPLE: tl.constexpr,
):
    """This program's tensor, the offsets of its ``BLOCK`` elements in that tensor, whether they
    all lie inside it (a full block), and the tensor's element count."""
    program = tl.program_id(0)
    tensor = tl.load(block_table + program)
    start = tl.multiple_of(tl.load(block_table + block_count + program), BLOCK)
    numel = tl.load(tensor_table + NUMEL_ROW * tensor_count + tensor)
    if NUMEL_MULTIPLE > 1:
        numel = tl.multiple_of(numel, NUMEL_MULTIPLE)
    return tensor, start + tl.arange(0, BLOCK), start + BLOCK <= numel, numel


@triton.jit
def _load(pointer, offsets, numel, full, COMPUTE_DTYPE: tl.constexpr):
    """The block's elements in ``COMPUTE_DTYPE``; zero past the end of the tensor."""
    if full:
        values = tl.load(pointer + offsets)
    else:
        values = tl.load(pointer + offsets, mask=offsets < numel, other=0.0)
    return values.to(COMPUTE_DTYPE)


@triton.jit
def _round_to_bfloat16(values):
    """float32 -> bfloat16, rounding to nearest even as torch does.

    Written out with integer operations because the Triton interpreter's ``.to(tl.bfloat16)``
    truncates; on a GPU this costs a few integer instructions in a memory-bound kernel.
    """
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    result = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(values == values, result, float("nan"))


@triton.jit
def _store(pointer, offsets, numel, full, values):
    """Store the block's ``values`` in the pointer's dtype, none past the end of the tensor."""
    target = pointer.dtype.element_ty
    if target == tl.bfloat16 and values.dtype == tl.float32:
        values = _round_to_bfloat16(values)
    else:
        values = values.to(target)
    if full:
        tl.store(pointer + offsets, values)
    else:
        tl.store(pointer + offsets, values, mask=offsets < numel)


@triton.jit
def _grad_multiplier(
    grad_scale,
    found_inf,
    square_norms,
    max_grad_norm,
    skipped_steps,
    UNSCALE_GRADS: tl.constexpr,
    CHECK_FOUND_INF: tl.constexpr,
    CLIP_GRADS: tl.constexpr,
    NORM_SLOTS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    COUNT_SKIPPED: tl.constexpr,
):
    """Whether this step is skipped, and the factors each loaded gradient is multiplied by.

    ``inverse_scale = float32(1 / grad_scale)`` as ``GradScaler.unscale_`` computes it; the clip
    coefficient is ``clip_grad_norm_``'s ``min(1, max_grad_norm / (norm + 1e-6))`` of the unscaled
    gradients, NaN when the norm is NaN, as in torch.
    """
    skip = False
    inverse_scale = 1.0
    clip_coefficient = 1.0
    if UNSCALE_GRADS:
        inverse_scale = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    if CHECK_FOUND_INF:
        skip = tl.load(found_inf) != 0.0
    if CLIP_GRADS:
        slots = tl.arange(0, NORM_SLOTS)
        square_norm = tl.sum(tl.load(square_norms + slots), axis=0)
        norm = tl.sqrt(square_norm)
        if UNSCALE_GRADS:
            norm = norm * inverse_scale.to(tl.float64)
        clip_coefficient = tl.cast(max_grad_norm, tl.float64) / (norm + 1e-6)
        # Written so that a NaN coefficient stays NaN, as torch.clamp(nan, max=1.0) does.
        clip_coefficient = tl.where(clip_coefficient > 1.0, 1.0, clip_coefficient)
        if SKIP_NONFINITE:
            nonfinite = (norm != norm) | (norm == float("inf"))
            # One launch per step counts (the others of the step pass COUNT_SKIPPED=False); a
            # constexpr test, so it cannot share an `if` with the runtime one.
            if COUNT_SKIPPED:  # noqa: SIM102
                if nonfinite & (tl.program_id(0) == 0):
                    tl.store(skipped_steps, tl.load(skipped_steps) + 1)
            skip = skip | nonfinite
    return skip, inverse_scale, clip_coefficient


@triton.jit
def _scaled_grad(
    grad, inverse_scale, clip_coefficient, UNSCALE_GRADS: tl.constexpr, CLIP_GRADS: tl.constexpr
):
    if UNSCALE_GRADS:
        grad = grad * inverse_scale.to(grad.dtype)
    if CLIP_GRADS:
        grad = grad * clip_coefficient.to(grad.dtype)
    return grad


@triton.jit
def _power(base, exponent):
    """``base ** exponent`` for a float64 ``base`` in [0, 1) and step count ``exponent`` >= 1, in
    float64 like torch's host-side Python floats."""
    result = tl.zeros_like(base)
    if base > 0.0:
        result = tl.exp(exponent * tl.log(base))
    return result


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``, with its two formulas, so that results match it bit for bit."""
    if weight < 0.5:
        result = start + weight * (end - start)
    else:
        result = end - (end - start) * (1.0 - weight)
    return result


@triton.jit
def _record_norms(diagnostic_sums, tensor, grad, update, param, offsets, numel):
    """Add this block's squared norms of grad, update and parameter to the tensor's accumulators."""
    inside = offsets < numel
    grad = tl.where(inside, grad, 0.0)
    update = tl.where(inside, update, 0.0)
    param = tl.where(inside, param, 0.0)
    tl.atomic_add(diagnostic_sums + tensor * 3 + 0, tl.sum(grad * grad, axis=0).to(tl.float32))
    tl.atomic_add(diagnostic_sums + tensor * 3 + 1, tl.sum(update * update, axis=0).to(tl.float32))
    tl.atomic_add(diagnostic_sums + tensor * 3 + 2, tl.sum(param * param, axis=0).to(tl.float32))


@triton.jit
def _finish_block(
    tensor_table,
    tensor,
    tensor_count,
    numel,
    step,
    block_counters,
    diagnostic_sums,
    diagnostics,
    BLOCK: tl.constexpr,
    WRITE_STEP: tl.constexpr,
    RECORD_NORMS: tl.constexpr,
):
    """Count this program done; the tensor's last program writes ``step`` and the diagnostics."""
    # Every thread of this program has read the old step and issued its atomics before the count.
    tl.debug_barrier()
    finished = tl.atomic_add(block_counters + tensor, 1)
    # Empty tensors get one block too (see MultiTensorTable), hence the maximum.
    if finished == tl.maximum(tl.cdiv(numel, BLOCK), 1) - 1:
        if WRITE_STEP:
            step_pointer = _address(tensor_table, STEP_ROW, tensor, tensor_count, tl.float32, False)
            tl.store(step_pointer, step.to(tl.float32))
        if RECORD_NORMS:
            for field in tl.static_range(3):
                total = tl.atomic_add(diagnostic_sums + tensor * 3 + field, 0.0)
                tl.store(diagnostics + tensor * 3 + field, total)
                tl.store(diagnostic_sums + tensor * 3 + field, 0.0)
        tl.store(block_counters + tensor, 0)


@triton.jit
def _record_skipped_norms(
    tensor_table,
    tensor,
    tensor_count,
    offsets,
    numel,
    full,
    inverse_scale,
    block_counters,
    diagnostic_sums,
    diagnostics,
    PARAM_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ASSUME_ALIGNED: tl.constexpr,
    UNSCALE_GRADS: tl.constexpr,
):
    """A skipped step's diagnostics: squared norms of the unscaled gradient, a zero update and
    the unchanged parameter (the step counter is left alone)."""
    param_pointer = _address(
        tensor_table, PARAM_ROW, tensor, tensor_count, PARAM_DTYPE, ASSUME_ALIGNED
    )
    grad_pointer = _address(
        tensor_table, GRAD_ROW, tensor, tensor_count, PARAM_DTYPE, ASSUME_ALIGNED
    )
    param = _load(param_pointer, offsets, numel, full, COMPUTE_DTYPE)
    grad = _load(grad_pointer, offsets, numel, full, COMPUTE_DTYPE)
    grad = _scaled_grad(grad, inverse_scale, 1.0, UNSCALE_GRADS, False)
    _record_norms(diagnostic_sums, tensor, grad, tl.zeros_like(param), param, offsets, numel)
    _finish_block(
        tensor_table,
        tensor,
        tensor_count,
        numel,
        0.0,
        block_counters,
        diagnostic_sums,
        diagnostics,
        BLOCK,
        False,
        True,
    )


@triton.jit
def _skipped_step_norms_kernel(
    tensor_table,
    block_table,
    tensor_count,
    block_count,
    grad_scale,
    found_inf,
    square_norms,
    max_grad_norm,
    block_counters,
    diagnostic_sums,
    diagnostics,
    PARAM_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUMEL_MULTIPLE: tl.constexpr,
    ASSUME_ALIGNED: tl.constexpr,
    NORM_SLOTS: tl.constexpr,
    UNSCALE_GRADS: tl.constexpr,
    CHECK_FOUND_INF: tl.constexpr,
    CLIP_GRADS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
):
    """After a step launch with ``RECORD_NORMS``: if that step was skipped (the same decision,
    from the same inputs), write its diagnostics, which the step kernel left alone. A separate
    launch, so that the step kernel keeps its registers; a step that ran returns at once."""
    skip, inverse_scale, _ = _grad_multiplier(
        grad_scale,
        found_inf,
        square_norms,
        max_grad_norm,
        block_counters,  # not written: COUNT_SKIPPED is off
        UNSCALE_GRADS,
        CHECK_FOUND_INF,
        CLIP_GRADS,
        NORM_SLOTS,
        SKIP_NONFINITE,
        False,
    )
    if skip:
        tensor, offsets, full, numel = _locate_block(
            tensor_table, block_table, tensor_count, block_count, BLOCK, NUMEL_MULTIPLE
        )
        _record_skipped_norms(
            tensor_table,
            tensor,
            tensor_count,
            offsets,
            numel,
            full,
            inverse_scale,
            block_counters,
            diagnostic_sums,
            diagnostics,
            PARAM_DTYPE,
            COMPUTE_DTYPE,
            BLOCK,
            ASSUME_ALIGNED,
            UNSCALE_GRADS,
        )


@triton.jit
def _grad_square_norm_kernel(
    tensor_table,
    block_table,
    tensor_count,
    block_count,
    partial_sums,
    done_counter,
    square_norms,
    slot,
    GRAD_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUMEL_MULTIPLE: tl.constexpr,
    ASSUME_ALIGNED: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
):
    """``square_norms[slot] = sum over all gradients g of sum(g * g)``, deterministically.

    Each program writes the sum of squares of its block to ``partial_sums[program]``; the last
    program to finish adds the partial sums in a fixed order (no float atomics), so the norm is
    the same bits on every run.
    """
    tensor, offsets, full, numel = _locate_block(
        tensor_table, block_table, tensor_count, block_count, BLOCK, NUMEL_MULTIPLE
    )
    grad_pointer = _address(
        tensor_table, GRAD_ROW, tensor, tensor_count, GRAD_DTYPE, ASSUME_ALIGNED
    )
    grad = _load(grad_pointer, offsets, numel, full, COMPUTE_DTYPE)
    tl.store(partial_sums + tl.program_id(0), tl.sum(grad * grad, axis=0).to(tl.float64))
    tl.debug_barrier()
    finished = tl.atomic_add(done_counter, 1)
    if finished == block_count - 1:
        total = tl.zeros([REDUCE_BLOCK], dtype=tl.float64)
        for first in range(0, block_count, REDUCE_BLOCK):
            index = first + tl.arange(0, REDUCE_BLOCK)
            total += tl.load(
                partial_sums + index, mask=index < block_count, other=0.0, cache_modifier=".cg"
            )
        tl.store(square_norms + slot, tl.sum(total, axis=0))
        tl.store(done_counter, 0)


@triton.jit
def load_state(state, dtype: tl.constexpr):
    """This block of a state tensor (an entry of an update's ``states``) in ``dtype``."""
    pointer, offsets, numel, full = state
    return _load(pointer, offsets, numel, full, dtype)


@triton.jit
def store_state(state, values):
    """Store ``values`` as this block of a state tensor, in the state's dtype."""
    pointer, offsets, numel, full = state
    _store(pointer, offsets, numel, full, values)


@triton.jit
def sgd_update(param, grad, states, hyperparameters, step, fresh, OPTIONS: tl.constexpr):
    """SGD; see torchopt_lab/optim/sgd.py. State: momentum_buffer, which starts as this step's
    gradient where the tensor's flag (``fresh``) is set (torch's first step)."""
    MOMENTUM, NESTEROV = OPTIONS
    lr, momentum, dampening, weight_decay = hyperparameters
    (momentum_buffer,) = states
    compute = param.dtype
    lr = lr.to(compute)
    one_minus_dampening = (1.0 - dampening).to(compute)
    momentum = momentum.to(compute)
    weight_decay = weight_decay.to(compute)
    if weight_decay != 0.0:
        grad = grad + param * weight_decay
    if MOMENTUM:
        if fresh != 0:
            buffer = grad
        else:
            buffer = load_state(momentum_buffer, compute)
            buffer = buffer * momentum + grad * one_minus_dampening
        store_state(momentum_buffer, buffer)
        grad = grad + buffer * momentum if NESTEROV else buffer
    return param + grad * -lr


@triton.jit
def adagrad_update(param, grad, states, hyperparameters, step, fresh, OPTIONS: tl.constexpr):
    """Adagrad; see torchopt_lab/optim/adagrad.py. State: sum (initialised with
    ``initial_accumulator_value`` by the optimizer)."""
    lr, lr_decay, weight_decay, eps = hyperparameters
    (sum,) = states  # the state's name, as the declaration checks
    compute = param.dtype
    weight_decay = weight_decay.to(compute)
    eps = eps.to(compute)
    clr = (lr / (1.0 + (step - 1.0) * lr_decay)).to(compute)
    if weight_decay != 0.0:
        grad = grad + param * weight_decay
    # torch's addcmul rounds once: fma.
    state_sum = tl.fma(grad, grad, load_state(sum, compute))
    store_state(sum, state_sum)
    std = tl.sqrt(state_sum) + eps
    return param + grad * -clr / std


@triton.jit
def rmsprop_update(param, grad, states, hyperparameters, step, fresh, OPTIONS: tl.constexpr):
    """RMSprop; see torchopt_lab/optim/rmsprop.py. State: square_avg, grad_avg (centered),
    momentum_buffer (momentum > 0)."""
    CENTERED, MOMENTUM = OPTIONS
    lr, alpha, eps, weight_decay, momentum = hyperparameters
    square_avg, grad_avg, momentum_buffer = states
    compute = param.dtype
    lr = lr.to(compute)
    one_minus_alpha = (1.0 - alpha).to(compute)
    alpha = alpha.to(compute)
    eps = eps.to(compute)
    weight_decay = weight_decay.to(compute)
    momentum = momentum.to(compute)
    if weight_decay != 0.0:
        grad = grad + param * weight_decay
    # torch's mul_ then addcmul_, whose multiply-add rounds once (fma), as on the CPU and GPU.
    average = tl.fma(one_minus_alpha * grad, grad, load_state(square_avg, compute) * alpha)
    store_state(square_avg, average)
    if CENTERED:
        mean = _lerp(load_state(grad_avg, compute), grad, one_minus_alpha)
        store_state(grad_avg, mean)
        # addcmul(v, m, m, value=-1) rounds once: alpha=0 can give sqrt(-ulp) = NaN, as in torch.
        avg = tl.sqrt(tl.fma(-mean, mean, average)) + eps
    else:
        avg = tl.sqrt(average) + eps
    if MOMENTUM:
        buffer = load_state(momentum_buffer, compute) * momentum + grad / avg
        store_state(momentum_buffer, buffer)
        new_param = param + buffer * -lr
    else:
        new_param = param + grad * -lr / avg
    return new_param


@triton.jit
def adam_update(param, grad, states, hyperparameters, step, fresh, OPTIONS: tl.constexpr):
    """Adam and AdamW; see torchopt_lab/optim/adam.py. State: exp_avg, exp_avg_sq,
    max_exp_avg_sq (amsgrad)."""
    AMSGRAD, DECOUPLED_WEIGHT_DECAY = OPTIONS
    lr, beta1, beta2, eps, weight_decay = hyperparameters
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    compute = param.dtype
    eps = eps.to(compute)
    step_size = (lr / (1.0 - _power(beta1, step))).to(compute)
    bias_correction2_sqrt = tl.sqrt(1.0 - _power(beta2, step)).to(compute)
    # A zero weight decay leaves param and grad untouched (inf * 0 would be NaN), as in torch.
    decayed = param
    if weight_decay != 0.0:
        if DECOUPLED_WEIGHT_DECAY:
            decayed = param * (1.0 - lr * weight_decay).to(compute)
        else:
            grad = grad + param * weight_decay.to(compute)
    first = _lerp(load_state(exp_avg, compute), grad, (1.0 - beta1).to(compute))
    store_state(exp_avg, first)
    second = load_state(exp_avg_sq, compute)
    second = tl.fma((1.0 - beta2).to(compute) * grad, grad, second * beta2.to(compute))
    store_state(exp_avg_sq, second)
    if AMSGRAD:
        second = tl.maximum(
            load_state(max_exp_avg_sq, compute), second, propagate_nan=tl.PropagateNan.ALL
        )
        store_state(max_exp_avg_sq, second)
    denom = tl.sqrt(second) / bias_correction2_sqrt + eps
    return decayed + first * -step_size / denom


@triton.jit
def rule_update(param, grad, states, hyperparameters, step, fresh, OPTIONS: tl.constexpr):
    """The adapter that runs a rule's ``triton_update`` (``OPTIONS``; see
    :mod:`torchopt_lab.optim.rules`) in the skeleton: it loads every state, hands the rule its
    per-step scalars (computed on the host in float64, held in the hyperparameter row) in the
    compute dtype (as torch rounds a Python-number scalar to its op's dtype), and stores the
    states the rule returns."""
    values = ()
    for k in tl.static_range(len(states)):
        values = values + (load_state(states[k], param.dtype),)  # noqa: RUF005
    scalars = ()
    for k in tl.static_range(len(hyperparameters)):
        scalars = scalars + (hyperparameters[k].to(param.dtype),)  # noqa: RUF005
    param, values = OPTIONS(param, grad, values, scalars)
    for k in tl.static_range(len(states)):
        store_state(states[k], values[k])
    return param


@dataclass(frozen=True)
class KernelUpdate:
    """One algorithm of :func:`_optimizer_step_kernel`, declared once: its ``@triton.jit``
    update, the names of its hyperparameter row (``fields``, in row order), of its state rows
    (``states``) and of its launch-level options (``options``, lowercase, in the order of the
    ``OPTIONS`` tuple), and whether the kernel counts its ``step``.

    The update unpacks ``hyperparameters``, ``states`` and ``OPTIONS`` by position; the
    declaration checks (at import) that those unpackings name exactly ``fields``, ``states`` and
    ``options`` in this order, so the launcher, the optimizer (which writes the row from
    ``fields``) and the kernel cannot disagree about an order.
    """

    name: str
    update: Any
    fields: tuple[str, ...]
    states: tuple[str, ...]
    options: tuple[str, ...] = ()
    has_step: bool = True

    def __post_init__(self) -> None:
        if len(self.states) > STATE_SLOTS:
            raise ValueError(f"{self.name}: at most {STATE_SLOTS} states, got {self.states}")
        unpacked = _unpackings(self.update)
        for argument, declared in (
            ("hyperparameters", self.fields),
            ("states", self.states),
            ("OPTIONS", self.options),
        ):
            names = unpacked.get(argument, ())
            if not declared and argument == "OPTIONS" and not names:
                continue
            if [name.lower() for name in names] != [name.lower() for name in declared]:
                raise ValueError(
                    f"{self.name}: the update unpacks {argument} as {list(names)}, but the "
                    f"declaration lists {list(declared)}; they must name the same entries in the "
                    "same order"
                )


def _unpackings(function: Any) -> dict[str, tuple[str, ...]]:
    """``{argument: names}`` for each ``a, b, ... = argument`` in ``function``'s source (the
    first such line per argument); a jit function or its interpreter wrapper."""
    source = textwrap.dedent(inspect.getsource(getattr(function, "fn", function)))
    found: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Name)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Tuple)
            and all(isinstance(element, ast.Name) for element in node.targets[0].elts)
        ):
            found.setdefault(node.value.id, tuple(e.id for e in node.targets[0].elts))
    return found


SGD = KernelUpdate(
    "sgd",
    sgd_update,
    fields=("lr", "momentum", "dampening", "weight_decay"),
    states=("momentum_buffer",),
    options=("momentum", "nesterov"),
    has_step=False,
)
ADAGRAD = KernelUpdate(
    "adagrad", adagrad_update, fields=("lr", "lr_decay", "weight_decay", "eps"), states=("sum",)
)
RMSPROP = KernelUpdate(
    "rmsprop",
    rmsprop_update,
    fields=("lr", "alpha", "eps", "weight_decay", "momentum"),
    states=("square_avg", "grad_avg", "momentum_buffer"),
    options=("centered", "momentum"),
)
ADAM = KernelUpdate(
    "adam",
    adam_update,
    fields=("lr", "beta1", "beta2", "eps", "weight_decay"),
    states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    options=("amsgrad", "decoupled_weight_decay"),
)
#: The built-in algorithms of :func:`_optimizer_step_kernel`, by name.
UPDATES: dict[str, KernelUpdate] = {kind.name: kind for kind in (SGD, ADAGRAD, RMSPROP, ADAM)}
ALGORITHMS = tuple(UPDATES)


@triton.jit
def _optimizer_step_kernel(
    tensor_table,
    block_table,
    tensor_count,
    block_count,
    hyperparameters,
    grad_scale,
    found_inf,
    square_norms,
    max_grad_norm,
    skipped_steps,
    block_counters,
    diagnostic_sums,
    diagnostics,
    UPDATE: tl.constexpr,
    OPTIONS: tl.constexpr,
    FIELD_COUNT: tl.constexpr,
    STATE_COUNT: tl.constexpr,
    HAS_STEP: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUMEL_MULTIPLE: tl.constexpr,
    ASSUME_ALIGNED: tl.constexpr,
    NORM_SLOTS: tl.constexpr,
    UNSCALE_GRADS: tl.constexpr,
    CHECK_FOUND_INF: tl.constexpr,
    CLIP_GRADS: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    COUNT_SKIPPED: tl.constexpr,
    RECORD_NORMS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):
    """One step of the update ``UPDATE`` on one block of one tensor: the skeleton every
    algorithm shares (table walking, loads and stores, unscaling, clipping, skipping, the step
    counter, diagnostics), with the update inlined.

    ``UPDATE(param, grad, states, hyperparameters, step, fresh, OPTIONS) -> param``: ``param``
    and ``grad`` blocks in ``COMPUTE_DTYPE`` (the gradient unscaled, clipped and negated for
    ``MAXIMIZE``); ``states`` a tuple of ``STATE_COUNT`` handles of the block in state rows 0, 1,
    2, which the update reads with :func:`load_state` and writes with :func:`store_state` where
    it uses them (a row an option leaves out is never touched; storing each state as soon as it
    is computed keeps register pressure where the compile checks want it); ``hyperparameters``
    the tensor's row of ``FIELD_COUNT`` float64 values; ``step`` the float64 step count
    including this step (``HAS_STEP``, else 0); ``fresh`` the tensor's flag; ``OPTIONS`` the
    update's constexpr (a tuple of flags; a rule's ``triton_update`` for :func:`rule_update`).
    """
    skip, inverse_scale, clip_coefficient = _grad_multiplier(
        grad_scale,
        found_inf,
        square_norms,
        max_grad_norm,
        skipped_steps,
        UNSCALE_GRADS,
        CHECK_FOUND_INF,
        CLIP_GRADS,
        NORM_SLOTS,
        SKIP_NONFINITE,
        COUNT_SKIPPED,
    )
    if skip:
        return
    tensor, offsets, full, numel = _locate_block(
        tensor_table, block_table, tensor_count, block_count, BLOCK, NUMEL_MULTIPLE
    )
    group = tl.load(tensor_table + GROUP_ROW * tensor_count + tensor)
    row = hyperparameters + group * FIELD_COUNT
    step = 0.0
    if HAS_STEP:
        step_pointer = _address(tensor_table, STEP_ROW, tensor, tensor_count, tl.float32, False)
        step = tl.load(step_pointer).to(tl.float64) + 1.0
    fresh = tl.load(tensor_table + FLAG_ROW * tensor_count + tensor)
    param_pointer = _address(
        tensor_table, PARAM_ROW, tensor, tensor_count, PARAM_DTYPE, ASSUME_ALIGNED
    )
    grad_pointer = _address(
        tensor_table, GRAD_ROW, tensor, tensor_count, PARAM_DTYPE, ASSUME_ALIGNED
    )
    param = _load(param_pointer, offsets, numel, full, COMPUTE_DTYPE)
    grad = _load(grad_pointer, offsets, numel, full, COMPUTE_DTYPE)
    grad = _scaled_grad(grad, inverse_scale, clip_coefficient, UNSCALE_GRADS, CLIP_GRADS)
    used_grad = grad
    if MAXIMIZE:
        grad = -grad
    # Tuples grow by concatenation: Triton's frontend has no starred unpacking in a tuple display.
    states = ()
    for k in tl.static_range(STATE_COUNT):
        pointer = _address(
            tensor_table, STATE_ROW + k, tensor, tensor_count, STATE_DTYPE, ASSUME_ALIGNED
        )
        states = states + ((pointer, offsets, numel, full),)  # noqa: RUF005
    fields = ()
    for k in tl.static_range(FIELD_COUNT):
        fields = fields + (tl.load(row + k),)  # noqa: RUF005

    new_param = UPDATE(param, grad, states, fields, step, fresh, OPTIONS)

    _store(param_pointer, offsets, numel, full, new_param)
    if RECORD_NORMS:
        _record_norms(diagnostic_sums, tensor, used_grad, new_param - param, param, offsets, numel)
    if HAS_STEP or RECORD_NORMS:
        _finish_block(
            tensor_table,
            tensor,
            tensor_count,
            numel,
            step,
            block_counters,
            diagnostic_sums,
            diagnostics,
            BLOCK,
            HAS_STEP,
            RECORD_NORMS,
        )
