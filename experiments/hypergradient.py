r"""Experiment 8: hypergradient descent learns the learning rate through ``differentiable=True``.

Baydin et al., 2018, "Online Learning Rate Adaptation with Hypergradient Descent" (ICLR). After
an update :math:`\theta_t = \theta_{t-1} - \alpha\,u_{t-1}`, the next loss depends on the
learning rate :math:`\alpha` through :math:`\theta_t` alone, so its derivative, the
hypergradient, is

.. math::
    h_t = \frac{\partial f(\theta_t)}{\partial \alpha} = -\nabla f(\theta_t) \cdot u_{t-1},
    \qquad \alpha_t = \alpha_{t-1} - \beta\,h_t

with :math:`u = \nabla f(\theta)` for SGD (SGD-HD) and :math:`u = \hat m / (\sqrt{\hat v} +
\epsilon)` for Adam (Adam-HD). Here nobody writes that formula into the training loop: the
learning rate is a tensor that requires grad, ``torchopt_lab.optim.SGD`` / ``Adam`` take it with
``differentiable=True``, so ``opt.step()`` records :math:`\theta_t` as a function of it, and
autograd returns :math:`h_t` together with the next step's gradient. The parameters are plain
tensors detached before every step, so :math:`h_t` is the paper's one-step hypergradient, not a
derivative through the whole history.

Claim, on the 8x8 digits with ``torchopt-lab compare``'s MLP, minibatches and tuned learning
rates :math:`\alpha^*` (SGD 0.1, Adam 1e-3), in float64:

1. the autograd hypergradient equals the closed form above (:math:`u` recomputed from the
   gradients, not read from the optimizer) at every step of every run, to ``tolerance`` relative
   to :math:`\|\nabla f(\theta_t)\|\,\|u_{t-1}\|` (float64 rounding);
2. started from poor learning rates, :math:`\alpha^*/10` and :math:`10\alpha^*`, SGD-HD and
   Adam-HD (the paper's :math:`\beta` for MNIST: 1e-3 and 1e-7) end at a lower training loss (whole
   training split) than SGD and Adam kept at the same initial learning rate;
3. from those poor starts, the learned rate ends closer to :math:`\alpha^*` (in log scale) than
   it started.

The runs started at :math:`\alpha^*` are shown for reference; no claim is made about them.

    python experiments/hypergradient.py            # full run
    python experiments/hypergradient.py --smoke    # small budget
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import common
import torch

from torchopt_lab import nn, optim
from torchopt_lab.compare import DEFAULT_LR
from torchopt_lab.data import DigitsSplit, load_digits_split
from torchopt_lab.tracking import TrainingLogger

NAME = "hypergradient"
CLAIM = (
    "the hypergradient that autograd returns through a differentiable=True step equals the "
    "paper's closed form; from learning rates 10x too small and 10x too large, SGD-HD and "
    "Adam-HD end at a lower training loss than SGD and Adam at the same fixed learning rate, "
    "and move their learning rate toward the tuned one"
)
OPTIMIZERS = ("sgd", "adam")
# The initial learning rates, as multiples of the tuned one; "poor" are the claim's starts.
SCALES = (0.1, 1.0, 10.0)
POOR = (0.1, 10.0)


@dataclass
class Config:
    epochs: int = 10  # passes over the training split, for every run
    batch_size: int = 32  # minibatch size (the last, smaller batch of an epoch is dropped)
    hidden: tuple[int, ...] = (128, 64)  # widths of the hidden ReLU layers (compare's model)
    beta_sgd: float = 1e-3  # SGD-HD's hypergradient learning rate (the paper's MNIST value)
    beta_adam: float = 1e-7  # Adam-HD's hypergradient learning rate (the paper's MNIST value)
    tolerance: float = 1e-12  # max |h_autograd - h_closed| / (|grad| |u|) allowed (claim 1)
    seed: int = 0  # seeds the split, the initial weights and the minibatch order
    out: str = ""  # output directory (default: runs/experiments/hypergradient)


SMOKE = {"epochs": 1, "batch_size": 64}


@dataclass
class Run:
    """One training run: a learning rate kept fixed or learned (``beta`` > 0)."""

    optimizer: str
    lr0: float
    hyper: bool
    losses: list[float] = dataclasses.field(default_factory=list)  # minibatch loss per step
    lrs: list[float] = dataclasses.field(default_factory=list)  # learning rate each step used
    hypergradients: list[float] = dataclasses.field(default_factory=list)  # h_t, from step 1
    closed_form_gap: float = 0.0  # max |h_autograd - h_closed| / (|grad| |u|) over the run
    train_loss: float = math.nan  # on the whole training split, after the last step
    val_accuracy: float = math.nan

    @property
    def label(self) -> str:
        kind = f"{self.optimizer.upper() if self.optimizer == 'sgd' else 'Adam'}"
        return f"{kind}{'-HD' if self.hyper else ''} lr0={self.lr0:g}"


class ClosedForm:
    r"""The paper's hypergradient, from the gradients alone: :math:`h_t = -g_t \cdot u_{t-1}`,
    with :math:`u` SGD's gradient or Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)`
    (torch's defaults: betas (0.9, 0.999), eps 1e-8)."""

    def __init__(self, optimizer: str, betas: tuple[float, float] = (0.9, 0.999), eps=1e-8):
        self.optimizer = optimizer
        self.betas = betas
        self.eps = eps
        self.step = 0
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.direction: list[torch.Tensor] | None = None  # u_{t-1}

    def hypergradient(self, grads: Sequence[torch.Tensor]) -> tuple[float, float]:
        r""":math:`h_t` for this step's gradients, and its scale :math:`\|g_t\|\|u_{t-1}\|`."""
        assert self.direction is not None
        h = -sum(
            torch.dot(g.flatten(), u.flatten()) for g, u in zip(grads, self.direction, strict=True)
        )
        scale = math.sqrt(sum(g.square().sum().item() for g in grads)) * math.sqrt(
            sum(u.square().sum().item() for u in self.direction)
        )
        return float(h), scale

    def advance(self, grads: Sequence[torch.Tensor]) -> None:
        """Record :math:`u_t`, the direction the step about to be taken with ``grads`` follows."""
        self.step += 1
        if self.optimizer == "sgd":
            self.direction = [g.clone() for g in grads]
            return
        beta1, beta2 = self.betas
        if not self.moments:
            self.moments = [(torch.zeros_like(g), torch.zeros_like(g)) for g in grads]
        directions = []
        for (m, v), g in zip(self.moments, grads, strict=True):
            m.mul_(beta1).add_(g, alpha=1 - beta1)  # first moment
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment
            m_hat = m / (1 - beta1**self.step)  # bias corrections
            v_hat = v / (1 - beta2**self.step)
            directions.append(m_hat / (v_hat.sqrt() + self.eps))
        self.direction = directions


def make_optimizer(
    name: str, params: list[torch.Tensor], lr: float | torch.Tensor, hyper: bool
) -> torch.optim.Optimizer:
    """torchopt_lab's SGD or Adam; a learned rate (``hyper``) is a tensor and the step is
    differentiable, so that autograd records the parameters as a function of it."""
    cls = {"sgd": optim.SGD, "adam": optim.Adam}[name]
    return cls(params, lr=lr, differentiable=hyper)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def train(
    run: Run,
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    data: DigitsSplit,
    beta: float,
    logger_for: Callable[[list[tuple[str, torch.Tensor]], torch.optim.Optimizer], TrainingLogger],
    optimizer_factory: Callable[..., torch.optim.Optimizer] = make_optimizer,
) -> Run:
    r"""Train a copy of ``model``'s weights on ``batches`` (indices into the training split).

    The weights are plain tensors, so that a differentiable step may record its graph in them.
    With ``run.hyper``, before each step :math:`t \ge 1` the learning rate moves against the
    hypergradient that autograd returns with the gradient, :math:`\alpha_t = \alpha_{t-1} -
    \beta h_t`, and :math:`h_t` is compared with :class:`ClosedForm`'s."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    dtype = params[0].dtype

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        weights = dict(zip(names, params, strict=True))
        return torch.func.functional_call(model, weights, (inputs,))

    loss_fn = nn.CrossEntropyLoss()
    closed = ClosedForm(run.optimizer)
    # torch.optim (and so ours) keeps Adam's step count, and computes a differentiable step's
    # bias corrections from it, in the default dtype: float32 there would put its rounding
    # (about 5e-6 relative in h_t) between the step and the float64 closed form.
    with default_dtype(dtype):
        lr = torch.tensor(run.lr0, requires_grad=True) if run.hyper else run.lr0
        opt = optimizer_factory(run.optimizer, params, lr, run.hyper)
        logger = logger_for(list(zip(names, params, strict=True)), opt)
        for step, index in enumerate(batches):
            for p in params:
                if p.is_leaf:  # after a differentiable step they carry the graph back to lr
                    p.requires_grad_(True)
            loss = loss_fn(logits_of(data.train_inputs[index]), data.train_labels[index])
            if run.hyper and step > 0:
                # One backward: the gradient g_t and, through the last step, h_t = dloss_t/dlr.
                *grads, h = torch.autograd.grad(loss, [*params, lr])
                h_closed, scale = closed.hypergradient(grads)
                run.closed_form_gap = max(run.closed_form_gap, abs(h.item() - h_closed) / scale)
                run.hypergradients.append(h.item())
                logger.log_scalars({"hypergradient/lr": h.item()}, step)
                with torch.no_grad():
                    lr.sub_(beta * h)  # alpha_t = alpha_{t-1} - beta h_t
            else:
                grads = list(torch.autograd.grad(loss, params))
            closed.advance(grads)
            for p, g in zip(params, grads, strict=True):
                p.detach_()  # the next hypergradient is one step's, as in the paper
                p.grad = g
            run.losses.append(loss.item())
            run.lrs.append(float(lr.detach()) if run.hyper else lr)
            with logger.step(loss):
                opt.step()

    with torch.no_grad():
        run.train_loss = loss_fn(logits_of(data.train_inputs), data.train_labels).item()
        predictions = logits_of(data.val_inputs).argmax(dim=1)
        run.val_accuracy = (predictions == data.val_labels).double().mean().item()
    logger.finish(
        {"train_loss": run.train_loss, "val_accuracy": run.val_accuracy, "final_lr": run.lrs[-1]}
    )
    return run


def build(hidden: Sequence[int]) -> torch.nn.Module:
    """``Linear -> ReLU`` per hidden width, then ``Linear`` to the 10 classes (compare's MLP)."""
    layers: list[torch.nn.Module] = []
    width = 64
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


def closer_in_log(start: float, end: float, target: float) -> bool:
    """Whether ``end`` is nearer ``target`` than ``start`` is, in log scale (a learning rate
    that ended non-positive or non-finite is not)."""
    if not (math.isfinite(end) and end > 0):
        return False
    return abs(math.log(end / target)) < abs(math.log(start / target))


def plot(runs: list[Run], path: Path) -> None:
    pyplot = common.pyplot()
    figure, axes = pyplot.subplots(2, len(OPTIMIZERS), figsize=(11, 7), squeeze=False)
    for column, name in enumerate(OPTIMIZERS):
        loss_axes, lr_axes = axes[0][column], axes[1][column]
        for color, scale in enumerate(SCALES):
            for run in runs:
                if run.optimizer != name or run.lr0 != scale * DEFAULT_LR[name]:
                    continue
                style = {"color": f"C{color}", "linestyle": "-" if run.hyper else ":"}
                window = max(1, len(run.losses) // 40)
                smooth = torch.tensor(run.losses).unfold(0, window, window).mean(1)
                steps = torch.arange(len(smooth)) * window + window // 2
                loss_axes.plot(steps, smooth.clamp(max=1e3), label=run.label, **style)
                # A learning rate that left (0, inf) is drawn up to there and marked with an x.
                kept = next(
                    (i for i, lr in enumerate(run.lrs) if not (0 < lr < math.inf)), len(run.lrs)
                )
                lr_axes.plot(run.lrs[:kept], label=run.label, **style)
                if kept < len(run.lrs):
                    lr_axes.plot(kept - 1, run.lrs[kept - 1], "x", color=style["color"])
        tuned = lr_axes.axhline(DEFAULT_LR[name], color="grey", linewidth=0.8, label="tuned lr")
        title = "SGD vs SGD-HD" if name == "sgd" else "Adam vs Adam-HD"
        loss_axes.set(yscale="log", xlabel="step", ylabel="minibatch loss (mean)", title=title)
        lr_axes.set(yscale="log", xlabel="step", ylabel="learning rate (x: left (0, inf))")
        loss_axes.legend(fontsize=7)
        lr_axes.legend(handles=[tuned], fontsize=7)  # the runs: as in the legend above
    figure.suptitle("hypergradient descent on the 8x8 digits (dotted: fixed lr; solid: HD)")
    common.save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__)
    if not all(width >= 1 for width in config.hidden):  # parse_config checks numbers, not tuples
        print(
            f"{NAME}.py: error: invalid --hidden {config.hidden!r}: widths must be >= 1",
            file=sys.stderr,
        )
        raise SystemExit(2)
    out = common.start(NAME, CLAIM, config)
    data = load_digits_split(seed=config.seed, dtype=torch.float64)
    common.seed_everything(config.seed)
    model = build(config.hidden).to(torch.float64)
    order = torch.Generator().manual_seed(config.seed)
    samples = data.train_inputs.shape[0]
    per_epoch = samples // config.batch_size
    batches = []
    for _ in range(config.epochs):
        permutation = torch.randperm(samples, generator=order)
        batches += [
            permutation[i * config.batch_size : (i + 1) * config.batch_size]
            for i in range(per_epoch)
        ]
    betas = {"sgd": config.beta_sgd, "adam": config.beta_adam}

    runs = []
    for name in OPTIMIZERS:
        for scale in SCALES:
            for hyper in (False, True):
                run = Run(name, scale * DEFAULT_LR[name], hyper)
                directory = out / f"{name}{'-hd' if hyper else ''}-lr{run.lr0:g}"

                def logger_for(named, opt, directory=directory, run=run):
                    settings = {**dataclasses.asdict(config), "run": run.label}
                    return TrainingLogger(
                        directory,
                        named,
                        opt,
                        histogram_every=0,
                        update_ratios=False,
                        config=settings,
                    )

                train(run, model, batches, data, betas[name], logger_for)
                runs.append(run)
                print(
                    f"{run.label:>22}: train loss {run.train_loss:.4g}, val accuracy "
                    f"{run.val_accuracy:.3f}, lr {run.lr0:g} -> {run.lrs[-1]:.4g}"
                )

    figure_path = out / f"{NAME}.png"
    plot(runs, figure_path)

    def find(name: str, scale: float, hyper: bool) -> Run:
        lr0 = scale * DEFAULT_LR[name]
        return next(r for r in runs if (r.optimizer, r.lr0, r.hyper) == (name, lr0, hyper))

    gap = max(run.closed_form_gap for run in runs if run.hyper)
    exact = gap <= config.tolerance
    lower, closer = {}, {}
    for name in OPTIMIZERS:
        for scale in POOR:
            fixed, learned = find(name, scale, False), find(name, scale, True)
            key = f"{learned.label}"
            # NaN compares False: a diverged HD run does not count as lower.
            lower[key] = learned.train_loss < fixed.train_loss or (
                math.isfinite(learned.train_loss) and not math.isfinite(fixed.train_loss)
            )
            closer[key] = closer_in_log(learned.lr0, learned.lrs[-1], DEFAULT_LR[name])
    evidence = [
        f"{len(batches)} steps per run, float64; tuned lr: SGD {DEFAULT_LR['sgd']:g}, "
        f"Adam {DEFAULT_LR['adam']:g}; beta: SGD-HD {config.beta_sgd:g}, "
        f"Adam-HD {config.beta_adam:g}",
        f"(1) max |h_autograd - h_closed| / (|g_t| |u_t-1|) over all HD steps: {gap:.1e} "
        f"(tolerance {config.tolerance:.0e})",
        "(2) final training loss, fixed -> HD: "
        + "; ".join(
            f"{name} lr0={scale * DEFAULT_LR[name]:g}: {find(name, scale, False).train_loss:.4g}"
            f" -> {find(name, scale, True).train_loss:.4g}"
            for name in OPTIMIZERS
            for scale in SCALES
        ),
        "(2) HD lower from the poor starts: " + ", ".join(f"{k} {v}" for k, v in lower.items()),
        "(3) learned lr, start -> end (tuned SGD 0.1, Adam 0.001): "
        + "; ".join(
            f"{find(name, scale, True).label} -> {find(name, scale, True).lrs[-1]:.3g}"
            for name in OPTIMIZERS
            for scale in SCALES
        ),
        "(3) ends closer to the tuned lr: " + ", ".join(f"{k} {v}" for k, v in closer.items()),
    ]
    return common.verdict(
        exact and all(lower.values()) and all(closer.values()),
        evidence,
        out,
        figure_path,
        smoke=smoke,
    )


if __name__ == "__main__":
    sys.exit(main())
