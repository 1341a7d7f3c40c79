"""Device tables that let one kernel launch update many tensors, cached while storage is unchanged.

A :class:`MultiTensorTable` describes every tensor of one (device, dtype) group to the kernels in
:mod:`triton_kernels.optim.kernels`: their addresses, sizes, hyperparameter rows and the block ->
tensor map. It is rebuilt only when an address, a size, a group or a flag changes. Addresses come
from ``data_ptr()``, so a new Python wrapper around the same storage (FSDP2's
``DTensor.to_local()`` hands out a fresh one each step) does not defeat the cache. Gradients,
which autograd may reallocate every step, live in their own row and are re-uploaded alone when
their addresses move.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from triton_kernels.optim.kernels import TABLE_ROWS

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEFAULT_BLOCK_SIZE = 2048
_ALIGNMENT = 16  # bytes: what a 128-bit vector load needs
_MAX_NUMEL_MULTIPLE = 16
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


def _signature(tensors: Sequence[Tensor]) -> tuple[list, ...]:
    """What decides the memory a launch touches through these tensors: their addresses, shapes,
    strides and dtypes (``p.data = p.data[:n]`` keeps the address but not the size). Read by C
    loops (``map``), cheap for thousands of tensors."""
    return (
        list(map(Tensor.data_ptr, tensors)),
        list(map(_SHAPE, tensors)),
        list(map(Tensor.stride, tensors)),
        list(map(_DTYPE, tensors)),
    )


def numel_multiple(numels: Sequence[int]) -> int:
    """The largest power of two up to 16 that divides every element count.

    The kernels tell the compiler so (``NUMEL_MULTIPLE``), which lets the masked tail of each
    tensor move 128 bits per access when the counts allow it.
    """
    multiple = _MAX_NUMEL_MULTIPLE
    while multiple > 1 and any(numel % multiple for numel in numels):
        multiple //= 2
    return multiple


def _is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements, in whatever order.

    Element-wise updates then need only the address of its first element, for any strides:
    contiguous, transposed and channels-last tensors all qualify; slices with gaps do not.
    """
    if tensor.is_contiguous():
        return True
    extent = 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    strides = sorted(
        (stride, size)
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
        if size != 1
    )
    expected = 1
    for stride, size in strides:
        if stride != expected:
            return False
        expected *= size
    return extent == tensor.numel()


def updatable_in_place(param: Tensor) -> tuple[bool, str]:
    """Whether the kernels can update ``param`` through a flat pointer, and if not, why not.

    Optimizers route a parameter that fails this to the torch path and record the reason.
    """
    if param.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {param.dtype} is not one of {SUPPORTED_DTYPES}"
    if not _is_dense(param):
        return False, (
            f"a parameter of shape {tuple(param.shape)} and strides {param.stride()} has gaps "
            "in memory, so it cannot be updated through a flat pointer"
        )
    return True, "dense"


def same_layout(tensor: Tensor, param: Tensor) -> bool:
    """Whether ``tensor`` (a gradient or state) can be read at ``param``'s element offsets: same
    dtype, device and shape, and the same element at the same offset from the first (strides of
    size-1 dimensions do not matter)."""
    if tensor.dtype != param.dtype or tensor.device != param.device:
        return False
    return _same_layout(tensor, param)


def _same_layout(tensor: Tensor, param: Tensor) -> bool:
    """Same shape, and the same element at the same offset from the first (strides of size-1
    dimensions do not matter)."""
    if tensor.shape != param.shape:
        return False
    if tensor.is_contiguous() and param.is_contiguous():
        return True
    return all(
        a == b
        for a, b, size in zip(tensor.stride(), param.stride(), param.shape, strict=True)
        if size > 1
    )


@dataclass(frozen=True)
class TableKey:
    """What a table depends on, apart from the gradient addresses."""

    addresses: tuple[int, ...]
    numels: tuple[int, ...]
    groups: tuple[int, ...]
    flags: tuple[int, ...]


class MultiTensorTable:
    """The tables of one launch group: parameters of one device and dtype, their states and steps.

    Call :meth:`update` before every launch with the current tensors; it re-validates and
    re-uploads only what changed. ``block_size`` elements go to each kernel program.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        self.block_size = block_size
        self.key: TableKey | None = None
        self.grad_addresses: list[int] = []
        self.state_rows: list[list[Tensor | None]] = []
        self.step_row: list[Tensor | None] = []
        self.builds = 0
        self.grad_uploads = 0

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[Sequence[Tensor | None]],
        steps: Sequence[Tensor] | None,
        groups: Sequence[int],
        flags: Sequence[int] | None = None,
    ) -> MultiTensorTable:
        """Describe these tensors to the kernels, rebuilding only what changed since the last call.

        ``states[k][i]`` is state tensor ``k`` of parameter ``i`` (``None`` where an option leaves
        it out), ``steps[i]`` its float32 step counter on the device (``None`` for SGD),
        ``groups[i]`` its row in the hyperparameter tensor, ``flags[i]`` a per-tensor kernel flag.
        """
        count = len(params)
        if count == 0:
            raise ValueError("a multi-tensor launch needs at least one parameter, got none")
        if len(states) > 3:
            raise ValueError(f"at most 3 state tensors per parameter, got {len(states)}")
        for name, values in (("grads", grads), ("groups", groups), *(("state", s) for s in states)):
            if len(values) != count:
                raise ValueError(f"{count} params but {len(values)} {name}")
        flags = list(flags) if flags is not None else [0] * count
        state_rows = [list(row) for row in states] + [[None] * count] * (3 - len(states))
        step_row = list(steps) if steps is not None else [None] * count
        # Tracked by address, shape, strides and dtype (not by object), so new wrappers of the same
        # storage keep the table, and a tensor resized or replaced in place (``p.data = ...``,
        # which can keep the address) rebuilds it.
        param_signature = _signature(params)
        state_signature = _signature(_present(state_rows, step_row))
        if (
            self.key is None
            or param_signature != self.param_signature
            or state_signature != self.state_signature
            or list(groups) != self.groups
            or flags != self.flags
        ):
            param_addresses = param_signature[0]
            state_addresses = _addresses(state_rows, step_row)
            key = TableKey(
                addresses=tuple(param_addresses + state_addresses),
                numels=tuple(p.numel() for p in params),
                groups=tuple(groups),
                flags=tuple(flags),
            )
            self._build(params, grads, state_rows, step_row, key)
            self.param_signature, self.groups, self.flags = param_signature, list(groups), flags
            self.state_signature = state_signature
        # Keep the objects compared next time (and alive while the table points at them).
        self.state_rows, self.step_row = state_rows, step_row
        return self._refresh_grads(params, grads, list(map(Tensor.data_ptr, grads)))

    def refresh(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        grad_addresses: list[int] | None = None,
    ) -> bool:
        """:meth:`update` for a caller that knows the states, steps, groups and flags are those of
        the last :meth:`update` (the same tensor objects): only the gradients' addresses are
        uploaded again (``grad_addresses``, when given, are ``data_ptr()`` of ``grads``). Returns
        False, changing nothing, when a parameter or state tensor was moved, resized or
        re-typed in place (``p.data = ...``) or a gradient's layout differs from its parameter's:
        the caller then takes the full :meth:`update` path, which rebuilds or refuses."""
        if self.key is None:
            raise ValueError("the table describes no tensors yet: call update(...) first")
        if len(params) != self.tensor_count or len(grads) != self.tensor_count:
            raise ValueError(
                f"{self.tensor_count} tensors in the table, got {len(params)} params and "
                f"{len(grads)} grads"
            )
        if (
            _signature(params) != self.param_signature
            or _signature(_present(self.state_rows, self.step_row)) != self.state_signature
        ):
            return False
        if grad_addresses is None:
            grad_addresses = list(map(Tensor.data_ptr, grads))
        if grad_addresses != self.grad_addresses and not self._grads_match(grads):
            return False
        self._refresh_grads(params, grads, grad_addresses)
        return True

    def _refresh_grads(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], addresses: list[int]
    ) -> MultiTensorTable:
        if addresses != self.grad_addresses:
            self._upload_grads(params, grads, addresses)
        return self

    def _build(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state_rows: list[list[Tensor | None]],
        step_row: list[Tensor | None],
        key: TableKey,
    ) -> None:
        device, dtype = params[0].device, params[0].dtype
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter dtype {dtype} is not one of {SUPPORTED_DTYPES}")
        state_dtype = next((t.dtype for row in state_rows for t in row if t is not None), dtype)
        if state_dtype not in (dtype, torch.float32):
            raise TypeError(
                f"state dtype {state_dtype} must be the parameter's ({dtype}) or float32"
            )
        for index, param in enumerate(params):
            if param.device != device or param.dtype != dtype:
                raise ValueError(
                    f"params[{index}] is {param.dtype} on {param.device}; one launch takes one "
                    f"device and dtype ({dtype} on {device})"
                )
            dense, why = updatable_in_place(param)
            if not dense:
                raise ValueError(f"params[{index}]: {why}")
            for row in state_rows:
                state = row[index]
                if state is None:
                    continue
                if state.device != device or state.dtype != state_dtype:
                    raise ValueError(
                        f"state of params[{index}] is {state.dtype} on {state.device}, expected "
                        f"{state_dtype} on {device}"
                    )
                if not _same_layout(state, param):
                    # RuntimeError, as torch's update raises for a state of the wrong shape.
                    raise RuntimeError(
                        f"state of params[{index}] has shape {tuple(state.shape)} and strides "
                        f"{state.stride()}, the parameter {tuple(param.shape)} and {param.stride()}"
                    )
            step = step_row[index]
            if step is not None and (
                step.device != device or step.dtype != torch.float32 or step.numel() != 1
            ):
                raise ValueError(
                    f"step of params[{index}] must be a float32 scalar on {device}, got "
                    f"{step.dtype} of shape {tuple(step.shape)} on {step.device}"
                )
        block = self.block_size
        count = len(params)
        block_tensor: list[int] = []
        block_start: list[int] = []
        for index, numel in enumerate(key.numels):
            # An empty tensor still gets one (fully masked) block: its step counter must advance.
            for start in range(0, max(numel, 1), block):
                block_tensor.append(index)
                block_start.append(start)
        rows = [[0] * count for _ in range(TABLE_ROWS)]
        rows[0] = [p.data_ptr() for p in params]
        for k, row in enumerate(state_rows):
            rows[2 + k] = [0 if t is None else t.data_ptr() for t in row]
        rows[5] = [0 if t is None else t.data_ptr() for t in step_row]
        rows[6] = list(key.numels)
        rows[7] = list(key.groups)
        rows[8] = list(key.flags)
        self.device = device
        self.param_dtype = dtype
        self.state_dtype = state_dtype
        self.tensor_count = count
        self.block_count = len(block_tensor)
        self.tensor_table = _upload(rows, device)
        self.block_table = _upload([block_tensor, block_start], device)
        self.block_counters = torch.zeros(count, dtype=torch.int32, device=device)
        self.diagnostic_sums = torch.zeros(count, 3, dtype=torch.float32, device=device)
        self.diagnostics = torch.zeros(count, 3, dtype=torch.float32, device=device)
        self.partial_sums = torch.zeros(self.block_count, dtype=torch.float64, device=device)
        self.done_counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.numel_multiple = numel_multiple(key.numels)
        self.shapes = [param.shape for param in params]
        self.group_count = max(key.groups) + 1
        self.device_index = params[0].get_device()
        self.strided = {index for index, param in enumerate(params) if not param.is_contiguous()}
        self.static_aligned = all(address % _ALIGNMENT == 0 for row in rows[:5] for address in row)
        # The tables hold raw addresses: keep the tensors alive as long as the table points at
        # them. Gradients are not held (that would keep last step's gradients in memory); the
        # caller launches right after update(), while it still holds them.
        self.tensors = (list(params), state_rows, step_row)
        self.key = key
        self.grad_addresses = []
        self.builds += 1

    def _upload_grads(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], addresses: list[int]
    ) -> None:
        if not self._grads_match(grads):
            for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
                if grad.device != param.device or grad.dtype != param.dtype:
                    raise ValueError(
                        f"grad of params[{index}] is {grad.dtype} on {grad.device}, the parameter "
                        f"{param.dtype} on {param.device}"
                    )
                if not _same_layout(grad, param):
                    raise ValueError(
                        f"grad of params[{index}] has shape {tuple(grad.shape)} and strides "
                        f"{grad.stride()}, the parameter {tuple(param.shape)} and {param.stride()}"
                    )
        self.tensor_table[1].copy_(_host_tensor(addresses, self.device), non_blocking=True)
        self.grad_addresses = addresses
        self.grads_aligned = functools.reduce(operator.or_, addresses, 0) % _ALIGNMENT == 0
        self.grad_uploads += 1

    def _grads_match(self, grads: Sequence[Tensor]) -> bool:
        """Whether every gradient has its parameter's dtype, device, shape and layout, checked in
        C loops (``map``): with thousands of small tensors, per-tensor Python checks would cost
        more host time than the kernel takes on the device."""
        params, _, _ = self.tensors
        if not (
            all(map(operator.is_, map(_DTYPE, grads), itertools.repeat(self.param_dtype)))
            and set(map(Tensor.get_device, grads)) == {self.device_index}
            and list(map(_SHAPE, grads)) == self.shapes
        ):
            return False
        if not self.strided:
            return all(map(Tensor.is_contiguous, grads))
        return all(
            grad.is_contiguous() if index not in self.strided else _same_layout(grad, params[index])
            for index, grad in enumerate(grads)
        )

    @property
    def aligned(self) -> bool:
        """Whether every address is 16-byte aligned, so the kernels may use 128-bit accesses."""
        return self.static_aligned and self.grads_aligned


def _present(state_rows: list[list[Tensor | None]], step_row: list[Tensor | None]) -> list[Tensor]:
    return [t for row in [*state_rows, step_row] for t in row if t is not None]


def _addresses(state_rows: list[list[Tensor | None]], step_row: list[Tensor | None]) -> list[int]:
    return [0 if t is None else t.data_ptr() for row in [*state_rows, step_row] for t in row]


def _same_objects(values: list, previous: list) -> bool:
    return len(values) == len(previous) and all(map(operator.is_, values, previous))


def _host_tensor(values: list[int], device: torch.device) -> Tensor:
    # Pinned, so the copy to the device is asynchronous; torch's host allocator keeps the buffer
    # alive until that copy is done.
    return torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")


def _upload(rows: list[list[int]], device: torch.device) -> Tensor:
    host = _host_tensor([value for row in rows for value in row], device).view(len(rows), -1)
    return host.to(device, non_blocking=True)
