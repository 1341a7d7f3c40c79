"""Real data that needs no network: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DigitsSplit", "load_digits_split"]


@dataclass(frozen=True)
class DigitsSplit:
    """Digits as tensors: inputs of shape [n, 64] (standardised), labels of shape [n] in 0..9."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    val_inputs: torch.Tensor
    val_labels: torch.Tensor


def load_digits_split(
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DigitsSplit:
    """The 1797 digits of ``sklearn.datasets.load_digits``, split into train and a held-out
    validation set (stratified by class, ``val_fraction`` of the samples, shuffled by ``seed``).

    Each of the 64 pixels is standardised with the mean and standard deviation of the training
    split only (pixels constant there are left centred), so nothing leaks from validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction}; expected 0 < val_fraction < 1")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, val_x, train_y, val_y = train_test_split(
        digits.data,
        digits.target,
        test_size=val_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std[std == 0] = 1.0

    def inputs(x):
        return torch.as_tensor((x - mean) / std, dtype=dtype, device=device)

    def labels(y):
        return torch.as_tensor(y, dtype=torch.long, device=device)

    return DigitsSplit(inputs(train_x), labels(train_y), inputs(val_x), labels(val_y))
