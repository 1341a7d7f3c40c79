"""``torch.nn`` modules whose forward runs :mod:`torchopt_lab.nn.functional`.

Each class subclasses its ``torch.nn`` namesake and overrides only the forward, so constructor
arguments, parameter initialisation (same seed, same values), ``state_dict`` keys, ``repr`` and
``extra_repr`` are torch's: a ``torch.nn`` model's ``state_dict`` loads into the same model built
from these classes, and the two train identically.
"""

from __future__ import annotations

import torch
from torch import nn

from torchopt_lab.nn import functional as F

__all__ = [
    "GELU",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "RMSNorm",
    "ReLU",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
]


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` running :func:`torchopt_lab.nn.functional.linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` running :func:`torchopt_lab.nn.functional.conv2d`.

    A ``padding_mode`` other than ``"zeros"`` pads with :func:`torch.nn.functional.pad` (torch's
    own derivative) before the convolution, as torch does.
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ReLU(nn.ReLU):
    """:class:`torch.nn.ReLU` running :func:`torchopt_lab.nn.functional.relu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(nn.LeakyReLU):
    """:class:`torch.nn.LeakyReLU` running :func:`torchopt_lab.nn.functional.leaky_relu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(nn.Sigmoid):
    """:class:`torch.nn.Sigmoid` running :func:`torchopt_lab.nn.functional.sigmoid`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(input)


class Tanh(nn.Tanh):
    """:class:`torch.nn.Tanh` running :func:`torchopt_lab.nn.functional.tanh`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.tanh(input)


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` running :func:`torchopt_lab.nn.functional.gelu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate=self.approximate)


class Softmax(nn.Softmax):
    """:class:`torch.nn.Softmax` running :func:`torchopt_lab.nn.functional.softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` running :func:`torchopt_lab.nn.functional.log_softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class MSELoss(nn.MSELoss):
    """:class:`torch.nn.MSELoss` running :func:`torchopt_lab.nn.functional.mse_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running
    :func:`torchopt_lab.nn.functional.cross_entropy`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class LayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` running :func:`torchopt_lab.nn.functional.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _BatchNormForward:
    """The forward of torch's ``_BatchNorm``, calling our ``batch_norm``: ``momentum=None``
    means a cumulative moving average (factor ``1 / num_batches_tracked``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in evaluation when no running statistics are kept.
        use_batch_statistics = self.training or (
            self.running_mean is None and self.running_var is None
        )
        # The running statistics are passed only where they are used or updated.
        keep = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch_statistics,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` running :func:`torchopt_lab.nn.functional.batch_norm`."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` running :func:`torchopt_lab.nn.functional.batch_norm`."""


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` running :func:`torchopt_lab.nn.functional.dropout`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Sequential(nn.Sequential):
    """:class:`torch.nn.Sequential`, re-exported so a model is built from one namespace."""


class RMSNorm(nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` running :func:`torchopt_lab.nn.functional.rms_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class SiLU(nn.SiLU):
    """:class:`torch.nn.SiLU` running :func:`torchopt_lab.nn.functional.silu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace)


class Embedding(nn.Embedding):
    """:class:`torch.nn.Embedding` running :func:`torchopt_lab.nn.functional.embedding`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            input,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
