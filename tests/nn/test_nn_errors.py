"""Bad input gets the exception type torch raises for the same mistake, never a wrong answer."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import torchopt_lab.nn.functional as F

x = torch.randn(3, 4)
image = torch.randn(1, 2, 5, 5)
kernel = torch.randn(3, 2, 3, 3)
labels = torch.tensor([0, 1, 2])

# id -> a call written once against a functional module (ours or torch's)
BAD_CALLS: dict[str, Callable[[ModuleType], Any]] = {
    "linear_shape_mismatch": lambda f: f.linear(x, torch.randn(5, 3)),
    "linear_dtype_mismatch": lambda f: f.linear(x, torch.randn(5, 4, dtype=torch.float64)),
    "linear_bias_shape": lambda f: f.linear(x, torch.randn(5, 4), torch.randn(3)),
    "linear_3d_weight": lambda f: f.linear(x, torch.randn(2, 5, 4)),
    "linear_0d_input": lambda f: f.linear(torch.randn(()), torch.randn(5, 4)),
    "linear_1d_weight_with_bias": lambda f: f.linear(x, torch.randn(4), torch.randn(())),
    "conv2d_channels": lambda f: f.conv2d(image, torch.randn(3, 3, 3, 3)),
    "conv2d_5d_input": lambda f: f.conv2d(torch.randn(1, 2, 2, 5, 5), kernel),
    "conv2d_groups": lambda f: f.conv2d(torch.randn(1, 4, 5, 5), kernel, groups=2),
    "conv2d_kernel_too_big": lambda f: f.conv2d(torch.randn(1, 2, 2, 2), kernel),
    "conv2d_same_strided": lambda f: f.conv2d(image, kernel, stride=2, padding="same"),
    "conv2d_bad_padding_string": lambda f: f.conv2d(image, kernel, padding="full"),
    "conv2d_zero_stride": lambda f: f.conv2d(image, kernel, stride=0),
    "conv2d_negative_padding": lambda f: f.conv2d(image, kernel, padding=-1),
    "conv2d_dtype_mismatch": lambda f: f.conv2d(image, kernel.double()),
    "gelu_bad_approximate": lambda f: f.gelu(x, approximate="fast"),
    "gelu_integer": lambda f: f.gelu(labels),
    "softmax_dim_out_of_range": lambda f: f.softmax(x, dim=2),
    "log_softmax_integer": lambda f: f.log_softmax(labels, dim=0),
    "mse_bad_reduction": lambda f: f.mse_loss(x, x, reduction="avg"),
    "mse_shape_mismatch": lambda f: f.mse_loss(x, torch.randn(4, 4)),
    "mse_integer": lambda f: f.mse_loss(labels, labels),
    "mse_weight_shape": lambda f: f.mse_loss(x, x, weight=torch.ones(4)),
    "cross_entropy_target_too_big": lambda f: f.cross_entropy(x, torch.tensor([0, 1, 7])),
    "cross_entropy_target_negative": lambda f: f.cross_entropy(x, torch.tensor([0, -2, 1])),
    "cross_entropy_target_int32": lambda f: f.cross_entropy(x, labels.int()),
    "cross_entropy_batch_mismatch": lambda f: f.cross_entropy(x, torch.tensor([0, 1])),
    "cross_entropy_spatial_mismatch": lambda f: f.cross_entropy(
        torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)
    ),
    "cross_entropy_weight_dtype": lambda f: f.cross_entropy(
        x, labels, weight=torch.ones(4, dtype=torch.float64)
    ),
    "cross_entropy_weight_requires_grad": lambda f: f.cross_entropy(
        x, labels, weight=torch.ones(4, requires_grad=True)
    ),
    "cross_entropy_float_target_other_shape": lambda f: f.cross_entropy(x, torch.rand(3, 5)),
    "layer_norm_weight_dtype": lambda f: f.layer_norm(x, [4], torch.ones(4, dtype=torch.float64)),
    "batch_norm_weight_dtype": lambda f: f.batch_norm(
        x, None, None, torch.ones(4, dtype=torch.float64), training=True
    ),
    "batch_norm_running_mean_dtype": lambda f: f.batch_norm(
        x, torch.zeros(4, dtype=torch.float64), torch.ones(4), training=True
    ),
    "cross_entropy_bad_reduction": lambda f: f.cross_entropy(x, labels, reduction="avg"),
    "cross_entropy_weight_size": lambda f: f.cross_entropy(x, labels, weight=torch.ones(3)),
    "cross_entropy_smoothing": lambda f: f.cross_entropy(x, labels, label_smoothing=1.5),
    "cross_entropy_integer_input": lambda f: f.cross_entropy(labels.view(3, 1), labels[:3] * 0),
    "cross_entropy_probabilities_integer": lambda f: f.cross_entropy(x, torch.ones(3, 4).long()),
    "cross_entropy_probabilities_ignore_index": lambda f: f.cross_entropy(
        x, torch.rand(3, 4), ignore_index=1
    ),
    "layer_norm_shape": lambda f: f.layer_norm(x, [3]),
    "layer_norm_weight_shape": lambda f: f.layer_norm(x, [4], torch.ones(3)),
    "layer_norm_int_shape": lambda f: f.layer_norm(x, 4),
    "batch_norm_one_value_per_channel": lambda f: f.batch_norm(
        torch.randn(1, 3), None, None, training=True
    ),
    "batch_norm_eval_without_statistics": lambda f: f.batch_norm(torch.randn(2, 3), None, None),
    "batch_norm_running_mean_size": lambda f: f.batch_norm(
        torch.randn(2, 3), torch.zeros(4), torch.ones(4), training=True
    ),
    "batch_norm_weight_size": lambda f: f.batch_norm(
        torch.randn(2, 3), torch.zeros(3), torch.ones(3), torch.ones(4), training=True
    ),
    "batch_norm_zero_eps_training": lambda f: f.batch_norm(
        torch.randn(2, 3), None, None, training=True, eps=0.0
    ),
    "batch_norm_negative_eps": lambda f: f.batch_norm(
        torch.randn(2, 3), torch.zeros(3), torch.ones(3), eps=-1.0
    ),
    "dropout_p_above_one": lambda f: f.dropout(x, 1.5),
    "dropout_p_negative": lambda f: f.dropout(x, -0.1),
    "relu_inplace_on_leaf": lambda f: f.relu(torch.randn(3, requires_grad=True), inplace=True),
    "dropout_inplace_on_leaf": lambda f: f.dropout(
        torch.randn(3, requires_grad=True), inplace=True
    ),
}


def _torch_error(call: Callable[[ModuleType], Any]) -> type[BaseException]:
    try:
        call(TF)
    except Exception as error:
        return type(error)
    raise AssertionError("torch accepts this call: the table entry tests nothing")


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_the_error_type_torch_raises(call: Callable[[ModuleType], Any]) -> None:
    with pytest.raises(_torch_error(call)):
        call(F)


def test_cross_entropy_out_of_range_message_names_the_target() -> None:
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        F.cross_entropy(x, torch.tensor([0, 1, 7]))


def test_ignored_target_outside_the_classes_is_accepted() -> None:
    target = torch.tensor([0, -100, 2])
    torch.testing.assert_close(F.cross_entropy(x, target), TF.cross_entropy(x, target))


def test_leaky_relu_inplace_negative_slope_refuses_to_be_differentiated() -> None:
    # torch raises only at backward; refusing at forward keeps a wrong gradient impossible
    input = torch.randn(3, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match=r"negative_slope=-0\.1"):
        F.leaky_relu(input, -0.1, inplace=True)


def test_mse_loss_warns_when_target_broadcasts_like_torch() -> None:
    with pytest.warns(UserWarning, match="different to the input size"):
        F.mse_loss(x, torch.randn(4))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(4,), (2, 3), (2, 3, 4), (2, 3, 4, 5)])
def test_softmax_without_dim_warns_and_picks_torchs_dimension(
    name: str, shape: tuple[int, ...]
) -> None:
    input = torch.randn(shape)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        ours = getattr(F, name)(input)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        theirs = getattr(TF, name)(input)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_normalized_shape_gets_torchs_message(
    name: str, backend: str, monkeypatch
) -> None:
    monkeypatch.setenv("TORCHOPT_LAB_BACKEND", backend)
    input = torch.randn(2, 3)
    with pytest.raises(RuntimeError) as theirs:
        getattr(TF, name)(input, ())
    with pytest.raises(RuntimeError) as ours:
        getattr(F, name)(input, ())
    assert str(ours.value) == str(theirs.value)
