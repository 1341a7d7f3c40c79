r"""TensorBoard logging for optimizer research, for any PyTorch training loop and any optimizer.

Wrap the optimizer's step in :meth:`TrainingLogger.step`::

    logger = TrainingLogger("runs/adam", model, optimizer, config={"lr": 1e-3})
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        with logger.step(loss):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # optional
            optimizer.step()
    logger.finish({"val_loss": val_loss})

Tags written (``<name>`` is the parameter's name in ``model.named_parameters()``):

=============================  ==============================================================
``train/loss``                 the loss passed to :meth:`~TrainingLogger.step`
``lr/group_<i>``               learning rate of param group ``i`` used by this step
``grad/global_norm``           :math:`\|g\|_2` over all parameters, measured when the context is
                               entered, so before any clipping inside it: it equals the total
                               norm ``clip_grad_norm_`` returns (optimizer path: the norm of the
                               gradients its update used, see :class:`SupportsDiagnostics`)
``grad_norm/<name>``           :math:`\|g_i\|_2` of each parameter (optimizer path: of the
                               gradient its update used)
``update/global_norm``         :math:`\|\Delta\theta\|_2` over all parameters, where
                               :math:`\Delta\theta_i = \theta_i^{after} - \theta_i^{before}`
``update_ratio/<name>``        :math:`\|\Delta\theta_i\|_2 / \|\theta_i^{before}\|_2` (skipped
                               while :math:`\theta_i^{before} = 0`, e.g. zero-initialised biases)
``weights/<name>``             histogram of each parameter, every ``histogram_every`` steps
``grads/<name>``               histogram of each gradient, every ``histogram_every`` steps
``config``                     the run's configuration as a text table
``logger/norm_source``         which path computed the norms (see below), as text
``hparam/<metric>``            final metrics, with the hparams plugin's session in the same run
=============================  ==============================================================

Where the norms come from. An optimizer that computes them during its own update may expose
them through ``norm_diagnostics()`` (the :class:`SupportsDiagnostics` protocol; torchopt-lab's
optimizers do on their fused Triton path with ``record_norms=True``). When it covers every
parameter that had a gradient in the step just taken, the logger uses it and makes no pass over
memory of its own (``norm_source == "optimizer"``). Otherwise (``norm_source == "logger"``) the
logger computes the norms itself, at this cost per logged step, for ``P`` parameter elements: one
read of the gradients for the gradient norms; a copy of the parameters before the step (``P``
elements of extra memory, one read and one write) and, after it, an in-place difference and its
norm (two reads, one write, one read). ``log_every`` bounds that cost; ``update_ratios=False``
removes the copy. Until the optimizer has once covered every parameter, the logger snapshots the
parameters, so every logged step has its update norms; the ``logger/norm_source`` text records
each switch between the two paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

__all__ = ["NormSource", "SupportsDiagnostics", "TrainingLogger"]

NormSource = Literal["optimizer", "logger"]


@runtime_checkable
class SupportsDiagnostics(Protocol):
    r"""An optimizer that reports per-tensor squared norms computed during its last ``step()``.

    ``norm_diagnostics()`` maps each parameter the last step updated with diagnostics on to a
    tensor (on any device) holding ``[grad_sq_norm, update_sq_norm, param_sq_norm]``:
    :math:`\|g_i\|_2^2` of the gradient the update used (after unscaling and any clipping the
    optimizer fused in, so with ``max_grad_norm`` the logged gradient norms are the clipped
    ones), :math:`\|\theta_i^{after} - \theta_i^{before}\|_2^2` and
    :math:`\|\theta_i^{before}\|_2^2`. An empty mapping means no diagnostics for that step.
    """

    def norm_diagnostics(self) -> Mapping[torch.Tensor, torch.Tensor]: ...


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _hparam_value(value: Any) -> bool | int | float | str:
    """What the hparams plugin can hold: bool, int, float or str; anything else as its str()."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _to_host(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-shape tensors into one float64 CPU tensor with one transfer (and so one host
    synchronisation) per device, not one per tensor."""
    host = torch.empty(len(values), *values[0].shape, dtype=torch.float64)
    for device in {value.device for value in values}:
        rows = [i for i, value in enumerate(values) if value.device == device]
        host[rows] = torch.stack([values[i] for i in rows]).to("cpu", torch.float64)
    return host


def _config_table(config: Mapping[str, Any]) -> str:
    rows = [f"| {key} | {json.dumps(value, default=str)} |" for key, value in config.items()]
    return "\n".join(["| key | value |", "| --- | --- |", *rows])


class TrainingLogger:
    """Writes per-step optimizer statistics of a training run to TensorBoard (tags: module doc).

    Args:
        log_dir: directory of this run's event files (ignored when ``writer`` is given).
        model: the module being trained, to name parameters after ``named_parameters()``; an
            iterable of ``(name, parameter)`` pairs also works. Parameters of the optimizer it
            does not name are called ``group<g>.<index>``.
        optimizer: any ``torch.optim.Optimizer``-like object with ``param_groups``.
        writer: an existing ``SummaryWriter`` to write to instead of opening one.
        log_every: log scalars (and pay for the norms) every this many steps.
        histogram_every: histograms of weights and gradients every this many steps; 0 disables.
        update_ratios: compute update norms and update/weight ratios (needs a snapshot of the
            parameters when the optimizer provides no diagnostics).
        config: the run's configuration, written as text now and used as hparams at the end.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]] | None = None,
        optimizer: Any = None,
        *,
        writer: SummaryWriter | None = None,
        log_every: int = 1,
        histogram_every: int = 100,
        update_ratios: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if optimizer is None or not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"optimizer must have param_groups (a torch.optim.Optimizer), got {optimizer!r}"
            )
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"Invalid log_every: {log_every!r}; expected an int >= 1")
        if not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(
                f"Invalid histogram_every: {histogram_every!r}; expected an int >= 0 (0: off)"
            )
        if writer is None and log_dir is None:
            raise ValueError("Give log_dir or writer: where should the event files go?")
        self.writer = writer if writer is not None else SummaryWriter(log_dir=os.fspath(log_dir))
        self.optimizer = optimizer
        self.log_every = log_every
        self.histogram_every = histogram_every
        self.update_ratios = update_ratios
        self.config: dict[str, Any] = _flatten(config or {})
        self.global_step = 0
        self.norm_source: NormSource | None = None
        self._diagnostics_seen = False
        self._named = self._name_parameters(model)
        self._norm_source_written: NormSource | None = None
        if self.config:
            self.writer.add_text("config", _config_table(self.config), 0)

    def _name_parameters(self, model: Any) -> list[tuple[str, torch.Tensor]]:
        pairs = model.named_parameters() if isinstance(model, torch.nn.Module) else model or []
        names = {id(parameter): name for name, parameter in pairs}
        return [
            (names.get(id(parameter), f"group{g}.{i}"), parameter)
            for g, group in enumerate(self.optimizer.param_groups)
            for i, parameter in enumerate(group["params"])
        ]

    @contextlib.contextmanager
    def step(self, loss: torch.Tensor | float | None = None) -> Iterator[None]:
        """Wrap ``optimizer.step()`` (and any clipping) to log this step; advances ``global_step``.

        Gradient norms are taken on entry, before anything inside the block changes the
        gradients; update norms are taken on exit.
        """
        step = self.global_step
        logging = step % self.log_every == 0
        histograms = self.histogram_every > 0 and step % self.histogram_every == 0
        with torch.no_grad():
            live = [(n, p) for n, p in self._named if p.grad is not None]
            use_diagnostics = self._diagnostics_seen and isinstance(
                self.optimizer, SupportsDiagnostics
            )
            grad_norms = None
            if logging and not use_diagnostics:
                grad_norms = self._norms([p.grad for _, p in live])
            if histograms:
                self._histograms(live, step)
            snapshot = None
            if logging and self.update_ratios and not use_diagnostics:
                snapshot = [p.detach().clone() for _, p in live]
            lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        yield
        self.global_step = step + 1
        if not logging:
            return
        with torch.no_grad():
            diagnostics = self._read_diagnostics(live)
            if diagnostics is not None:
                self.norm_source = "optimizer"
                grad_norms, update_norms, param_norms = diagnostics
            else:
                self.norm_source = "logger"
                update_norms = param_norms = None
                if snapshot is not None:
                    param_norms = self._norms(snapshot)
                    for before, (_, parameter) in zip(snapshot, live, strict=True):
                        before.sub_(parameter.detach()).neg_()
                    update_norms = self._norms(snapshot)
            if grad_norms is None:
                # Diagnostics were on before this step and are off now: this step's gradient
                # norm was not measured on entry, and is not logged.
                grad_norms = []
        self._write_step(step, loss, lrs, live, grad_norms, update_norms, param_norms)

    def _read_diagnostics(
        self, live: list[tuple[str, torch.Tensor]]
    ) -> tuple[list[float], list[float], list[float]] | None:
        """The optimizer's norms for ``live`` (one host transfer), or None if it has none for
        some of them (diagnostics off, or a parameter it did not run through its kernels)."""
        if not isinstance(self.optimizer, SupportsDiagnostics):
            return None
        report = {id(p): norms for p, norms in self.optimizer.norm_diagnostics().items()}
        self._diagnostics_seen = bool(live) and all(id(p) in report for _, p in live)
        if not self._diagnostics_seen:
            return None
        rows = _to_host([report[id(p)].detach().reshape(3) for _, p in live])
        grad, update, param = rows.sqrt().T.tolist()
        return grad, update, param

    @staticmethod
    def _norms(tensors: list[torch.Tensor]) -> list[float]:
        """Per-tensor L2 norms."""
        if not tensors:
            return []
        return _to_host([torch.linalg.vector_norm(t.detach()) for t in tensors]).tolist()

    def _histograms(self, live: list[tuple[str, torch.Tensor]], step: int) -> None:
        for name, parameter in live:
            self.writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu(), step)
            self.writer.add_histogram(f"grads/{name}", parameter.grad.detach().float().cpu(), step)

    def _write_step(
        self,
        step: int,
        loss: torch.Tensor | float | None,
        lrs: list[float],
        live: list[tuple[str, torch.Tensor]],
        grad_norms: list[float],
        update_norms: list[float] | None,
        param_norms: list[float] | None,
    ) -> None:
        add = self.writer.add_scalar
        if loss is not None:
            add("train/loss", float(loss.detach() if torch.is_tensor(loss) else loss), step)
        for g, lr in enumerate(lrs):
            add(f"lr/group_{g}", lr, step)
        if grad_norms:
            add("grad/global_norm", math.sqrt(sum(norm * norm for norm in grad_norms)), step)
            for (name, _), norm in zip(live, grad_norms, strict=True):
                add(f"grad_norm/{name}", norm, step)
        if update_norms is not None and param_norms is not None:
            add("update/global_norm", math.sqrt(sum(n * n for n in update_norms)), step)
            for (name, _), update, weight in zip(live, update_norms, param_norms, strict=True):
                if weight > 0:
                    add(f"update_ratio/{name}", update / weight, step)
        if self.norm_source != self._norm_source_written:
            self._norm_source_written = self.norm_source
            how = {
                "optimizer": "optimizer.norm_diagnostics(): norms computed inside its step",
                "logger": "logger: norms computed by the logger in extra passes over memory",
            }[self.norm_source]
            self.writer.add_text("logger/norm_source", how, step)

    def log_scalars(self, scalars: Mapping[str, float], step: int | None = None) -> None:
        """Write extra scalars (validation loss, accuracy...) at ``step`` (default: current)."""
        step = self.global_step if step is None else step
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)

    def finish(
        self, metrics: Mapping[str, float], hparams: Mapping[str, Any] | None = None
    ) -> None:
        """Write the final ``metrics`` with the run's hyperparameters, then close the writer.

        ``hparams`` defaults to the flattened ``config``. Metrics are written as scalars
        ``hparam/<name>`` and, with the hparams, into this run for TensorBoard's HPARAMS tab.
        """
        values = {key: _hparam_value(v) for key, v in _flatten(hparams or self.config).items()}
        metric_tags = {f"hparam/{name}": float(value) for name, value in metrics.items()}
        writer = self.writer._get_file_writer()
        for summary in hparams_summaries(values, metric_tags):
            writer.add_summary(summary, self.global_step)
        for tag, value in metric_tags.items():
            self.writer.add_scalar(tag, value, self.global_step)
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.flush()
        self.writer.close()

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
