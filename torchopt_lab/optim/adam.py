"""Adam and AdamW."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from torchopt_lab.optim._base import (
    TensorLists,
    TorchoptOptimizer,
    as_float,
    foreach_addcdiv_,
    increment_steps,
    new_step,
    per_step,
    read_steps,
)

__all__ = ["Adam", "AdamW", "adam"]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Adam's torch reference update over real tensors of one device and dtype (see :class:`Adam`).

    ``state_steps`` are incremented here; ``max_exp_avg_sqs`` is empty unless ``amsgrad``.
    """
    lr, beta1, beta2 = as_float(lr), as_float(beta1), as_float(beta2)
    increment_steps(state_steps)
    steps = read_steps(state_steps)
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            # AdamW: theta <- theta * (1 - lr * lambda).
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            # Adam's L2 penalty: g <- g + lambda * theta.
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # First moment: m <- beta1 * m + (1 - beta1) * g.
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    # Second moment: v <- beta2 * v + (1 - beta2) * g^2.
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:
        # AMSGrad normalizes by the running maximum of v.
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)

    def bias_corrected(t: Any) -> tuple[Any, Any]:
        # Bias corrections folded into two scalars per step count (one pass fewer than dividing
        # sqrt(v) by c2): theta <- theta - (lr * c2 / c1) * m / (sqrt(v) + eps * c2),
        # c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t).
        c1, c2 = 1 - beta1**t, (1 - beta2**t) ** 0.5
        return eps * c2, -lr * c2 / c1

    scalars = per_step(steps, bias_corrected)
    denominators = torch._foreach_sqrt(max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    torch._foreach_add_(denominators, [eps_c2 for eps_c2, _ in scalars])
    foreach_addcdiv_(params, exp_avgs, denominators, [step_size for _, step_size in scalars])


class Adam(TorchoptOptimizer):
    r"""Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"), with the AMSGrad
    variant (Reddi et al., 2018, "On the Convergence of Adam and Beyond").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad)}, \text{ else } v_t \\
        \theta_t &= \theta_{t-1} - \gamma \frac{m_t / (1-\beta_1^t)}
            {\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}

    With ``decoupled_weight_decay=True`` (what :class:`AdamW` is) the decay leaves the gradient
    and shrinks the weights instead: :math:`\theta \leftarrow \theta(1-\gamma\lambda)`.
    Arguments, defaults, errors, param groups and state (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) are torch.optim.Adam's. The reference path folds :math:`\sqrt{1-\beta_2^t}`
    into the step size and epsilon (same value, one pass over memory fewer), so results agree with
    torch to rounding. ``fused``, ``capturable`` and ``differentiable`` behave as torch's
    (docs/optimizers.md).
    """

    _reference = staticmethod(adam)
    _group_defaults: ClassVar[dict[str, Any]] = {
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
        "fused": None,
    }

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        float32_state: bool = False,
        record_norms: bool = False,
    ) -> None:
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{index}] as a Tensor is not supported for capturable=False "
                        "and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        betas = tuple(beta.squeeze() if isinstance(beta, Tensor) else beta for beta in betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        super().__init__(
            params,
            defaults,
            backend=backend,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            float32_state=float32_state,
            record_norms=record_norms,
        )

    def _group_tensors(self, group: dict[str, Any]) -> TensorLists:
        tensors: TensorLists = {
            "params": [],
            "grads": [],
            "exp_avgs": [],
            "exp_avg_sqs": [],
            "max_exp_avg_sqs": [],
            "state_steps": [],
        }
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                )
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            tensors["params"].append(p)
            tensors["grads"].append(p.grad)
            tensors["exp_avgs"].append(state["exp_avg"])
            tensors["exp_avg_sqs"].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                tensors["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            tensors["state_steps"].append(state["step"])
        return tensors

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {
            "amsgrad": group["amsgrad"],
            "beta1": beta1,
            "beta2": beta2,
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
            "decoupled_weight_decay": group["decoupled_weight_decay"],
        }


class AdamW(Adam):
    r""":class:`Adam` with decoupled weight decay (Loshchilov & Hutter, 2019, "Decoupled Weight
    Decay Regularization"): :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam
    update, instead of adding :math:`\lambda\theta` to the gradient. Default ``weight_decay=1e-2``.

    Arguments, defaults, errors, param groups and state are torch.optim.AdamW's (its param groups
    carry ``decoupled_weight_decay=True``, forced on load as torch does).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        float32_state: bool = False,
        record_norms: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            float32_state=float32_state,
            record_norms=record_norms,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
