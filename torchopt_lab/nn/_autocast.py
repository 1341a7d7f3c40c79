"""torch's autocast policy for the layers: each functional casts its floating-point arguments as
autocast casts those of its ``torch.nn.functional`` namesake, before validating or dispatching
them, on the torch path and on Triton alike.

The casts are ordinary differentiable ops recorded outside the layer's Function, so the backward
computes in the dtype the forward did and autograd casts the gradients back to the arguments'
dtypes, as it does for torch's own ops. The op lists are torch's (``autocast_mode.cpp``):

- lower precision (the autocast dtype, e.g. bfloat16) on every device: ``linear``, ``conv2d``
  and the fused ``linear_activation``;
- float32: on CPU ``cross_entropy`` and ``mse_loss``; on CUDA also ``softmax``, ``log_softmax``
  and ``layer_norm``. Every other layer (activations, ``batch_norm``, ``dropout``, and on CPU the
  softmaxes and ``layer_norm``) runs in its input's dtype, as torch's does.
"""

from __future__ import annotations

import torch

_LOWER_PRECISION = frozenset({"linear", "conv2d", "linear_activation"})
_FLOAT32 = {
    "cpu": frozenset({"cross_entropy", "mse_loss"}),
    "cuda": frozenset({"cross_entropy", "mse_loss", "softmax", "log_softmax", "layer_norm"}),
}


def autocast_inputs(name: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast as torch's autocast casts the arguments of ``nn.functional.<name>`` (the
    first tensor's device decides; unchanged when autocast is off there). Like torch, only
    floating-point tensors other than float64 are cast."""
    device = next((t.device for t in tensors if t is not None), None)
    if device is None or not torch.is_autocast_enabled(device.type):
        return tensors
    if name in _LOWER_PRECISION:
        dtype = torch.get_autocast_dtype(device.type)
    elif name in _FLOAT32.get(device.type, ()):
        dtype = torch.float32
    else:
        return tensors
    return tuple(_cast(tensor, dtype, device) for tensor in tensors)


def _cast(
    tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    if (
        tensor is None
        or not tensor.is_floating_point()
        or tensor.dtype in (torch.float64, dtype)
        or tensor.device != device
    ):
        return tensor
    return tensor.to(dtype)
