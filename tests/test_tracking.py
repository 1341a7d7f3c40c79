"""TrainingLogger: what it writes, read back from the event files with tensorboard's
EventAccumulator, against values computed independently in the training loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchopt_lab.tracking import SupportsDiagnostics, TrainingLogger

STEPS = 7


def read_run(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def text(accumulator: EventAccumulator, tag: str) -> str:
    return accumulator.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    logger: TrainingLogger,
    inside_step: Callable[[int], None] = lambda step: None,
    steps: int = STEPS,
) -> None:
    """A plain training loop on fixed random data; ``inside_step`` runs in the logged block,
    just before ``optimizer.step()``."""
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        inputs = torch.randn(16, 5, generator=generator)
        targets = torch.randn(16, 3, generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        with logger.step(loss):
            inside_step(step)
            optimizer.step()


def test_logged_lr_of_every_group_equals_the_schedulers(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.05},
        ],
        lr=0.1,
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    expected: list[list[float]] = []
    logger = TrainingLogger(tmp_path, model, optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(4, 5, generator=generator)).square().mean().backward()
        with logger.step():
            expected.append(scheduler.get_last_lr())
            optimizer.step()
        scheduler.step()
    logger.close()

    run = read_run(tmp_path)
    for group in (0, 1):
        logged = scalars(run, f"lr/group_{group}")
        assert [step for step, _ in logged] == list(range(STEPS))
        # Event files store float32.
        torch.testing.assert_close(
            [value for _, value in logged],
            [lrs[group] for lrs in expected],
            rtol=1e-7,
            atol=0,
        )
    assert expected[-1] == [0.1 / 8, 0.05 / 8], "the schedule really changed the lr"


def test_logged_grad_norm_equals_clip_grad_norm_total_norm(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    total_norms: list[float] = []
    logger = TrainingLogger(tmp_path, model, optimizer)

    def clip(step: int) -> None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        total_norms.append(norm.item())

    train(model, optimizer, logger, clip)
    logger.close()

    logged = [value for _, value in scalars(read_run(tmp_path), "grad/global_norm")]
    assert min(total_norms) > 0.05, "clipping was active, so the logged norm is the pre-clip one"
    torch.testing.assert_close(logged, total_norms, rtol=1e-6, atol=0)


def test_logged_update_norms_and_ratios_equal_the_parameter_change(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    names = [name for name, _ in model.named_parameters()]
    expected_ratio: dict[str, list[float]] = {name: [] for name in names}
    expected_global: list[float] = []
    expected_loss: list[float] = []
    logger = TrainingLogger(tmp_path, model, optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 5, generator=generator)).square().mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        with logger.step(loss):
            optimizer.step()
        updates = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
        expected_global.append(math.sqrt(sum(u.square().sum().item() for u in updates)))
        for name, update, weight in zip(names, updates, before, strict=True):
            expected_ratio[name].append((update.norm() / weight.norm()).item())
        expected_loss.append(loss.item())
    logger.close()

    run = read_run(tmp_path)
    assert {f"update_ratio/{name}" for name in names} <= set(run.Tags()["scalars"])
    for name in names:
        logged = [value for _, value in scalars(run, f"update_ratio/{name}")]
        torch.testing.assert_close(logged, expected_ratio[name], rtol=1e-5, atol=0)
    logged_global = [value for _, value in scalars(run, "update/global_norm")]
    torch.testing.assert_close(logged_global, expected_global, rtol=1e-5, atol=0)
    logged_loss = [value for _, value in scalars(run, "train/loss")]
    torch.testing.assert_close(logged_loss, expected_loss, rtol=1e-7, atol=0)
    assert "logger" in text(run, "logger/norm_source")


def test_zero_weights_get_no_update_ratio(tmp_path: Path) -> None:
    model = make_model()
    torch.nn.init.zeros_(model[0].bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = TrainingLogger(tmp_path, model, optimizer)
    train(model, optimizer, logger, steps=2)
    logger.close()
    steps = [step for step, _ in scalars(read_run(tmp_path), "update_ratio/0.bias")]
    assert steps == [1], "step 0 starts from a zero bias: its ratio is undefined, not logged"


def test_parameters_without_gradients_are_left_out(tmp_path: Path) -> None:
    model = make_model()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = TrainingLogger(tmp_path, model, optimizer)
    train(model, optimizer, logger, steps=2)
    logger.close()
    tags = set(read_run(tmp_path).Tags()["scalars"])
    assert {"grad_norm/2.weight", "update_ratio/2.weight"} <= tags
    assert not {tag for tag in tags if tag.endswith(("/0.weight", "/0.bias"))}


def test_parameters_the_model_does_not_name_are_named_by_group_and_index(tmp_path: Path) -> None:
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([{"params": model.parameters()}, {"params": [extra]}], lr=0.1)
    logger = TrainingLogger(tmp_path, model, optimizer)
    optimizer.zero_grad()
    (model(torch.ones(2, 5)).sum() + extra.square().sum()).backward()
    with logger.step():
        optimizer.step()
    logger.close()
    assert "grad_norm/group1.0" in read_run(tmp_path).Tags()["scalars"]


def test_histograms_every_n_steps_and_scalars_every_k(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = TrainingLogger(tmp_path, model, optimizer, log_every=2, histogram_every=3)
    train(model, optimizer, logger)
    logger.close()
    run = read_run(tmp_path)
    names = [name for name, _ in model.named_parameters()]
    expected_tags = {f"{kind}/{name}" for kind in ("weights", "grads") for name in names}
    assert set(run.Tags()["histograms"]) == expected_tags
    for tag in expected_tags:
        assert [event.step for event in run.Histograms(tag)] == [0, 3, 6]
    histogram = run.Histograms("weights/0.weight")[0].histogram_value
    assert histogram.num == model[0].weight.numel()
    assert [step for step, _ in scalars(run, "train/loss")] == [0, 2, 4, 6]


def test_config_text_and_hparams_with_final_metrics_in_the_same_run(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"optimizer": "sgd", "lr": 0.1, "model": {"hidden": 8}, "betas": (0.9, 0.99)}
    logger = TrainingLogger(tmp_path, model, optimizer, config=config)
    train(model, optimizer, logger, steps=2)
    logger.finish({"val_loss": 0.25, "val_accuracy": 0.75})

    event_files = list(tmp_path.iterdir())
    assert len(event_files) == 1 and event_files[0].is_file(), "one run, no sub-run for hparams"
    run = read_run(tmp_path)
    table = text(run, "config")
    for row in ('| optimizer | "sgd" |', "| lr | 0.1 |", "| model.hidden | 8 |"):
        assert row in table
    assert scalars(run, "hparam/val_loss") == [(2, 0.25)]
    assert scalars(run, "hparam/val_accuracy") == [(2, 0.75)]

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = run.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert session.hparams["lr"].number_value == 0.1
    assert session.hparams["optimizer"].string_value == "sgd"
    assert session.hparams["model.hidden"].number_value == 8
    assert session.hparams["betas"].string_value == "(0.9, 0.99)"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    assert {info.name.tag for info in experiment.metric_infos} == {
        "hparam/val_loss",
        "hparam/val_accuracy",
    }


class SGDWithDiagnostics(torch.optim.SGD):
    """Stands in for an optimizer whose kernel reports norms: reports, on purpose, numbers that
    differ from the true ones (true squared grad and update norms times ``scale``), so a test
    can tell whose numbers the logger wrote. ``skip`` names parameters it leaves out."""

    def __init__(self, params, lr: float, scale: float, skip: int = 0) -> None:
        super().__init__(params, lr=lr)
        self.scale = scale
        self.skip = skip
        self.report: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        before = [p.clone() for p in params]
        super().step(closure)
        self.report = {
            p: torch.stack(
                [
                    self.scale * p.grad.square().sum(),
                    self.scale * (p - b).square().sum(),
                    b.square().sum(),
                ]
            )
            for p, b in zip(params[self.skip :], before[self.skip :], strict=True)
        }

    def norm_diagnostics(self) -> dict[torch.Tensor, torch.Tensor]:
        return self.report


def test_norms_come_from_optimizer_diagnostics_when_it_has_them(tmp_path: Path) -> None:
    runs = {}
    for name, scale in (("logger", None), ("optimizer", 4.0)):
        model = make_model()
        optimizer = (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if scale is None
            else SGDWithDiagnostics(model.parameters(), lr=0.1, scale=scale)
        )
        assert isinstance(optimizer, SupportsDiagnostics) == (scale is not None)
        logger = TrainingLogger(tmp_path / name, model, optimizer)
        train(model, optimizer, logger)
        logger.close()
        assert logger.norm_source == name
        runs[name] = read_run(tmp_path / name)

    assert "optimizer.norm_diagnostics()" in text(runs["optimizer"], "logger/norm_source")
    # sqrt(4) = 2: the optimizer's numbers were logged, not the logger's own measurements.
    for tag in (
        "grad/global_norm",
        "update/global_norm",
        "grad_norm/2.weight",
        "update_ratio/0.weight",
    ):
        own = [value for _, value in scalars(runs["logger"], tag)]
        reported = [value for _, value in scalars(runs["optimizer"], tag)]
        assert len(own) == STEPS
        torch.testing.assert_close(reported, [2 * value for value in own], rtol=1e-5, atol=0)


def test_diagnostics_that_miss_a_parameter_fall_back_to_the_loggers_own_pass(
    tmp_path: Path,
) -> None:
    model = make_model()
    optimizer = SGDWithDiagnostics(model.parameters(), lr=0.1, scale=4.0, skip=1)
    logger = TrainingLogger(tmp_path, model, optimizer)
    reference = make_model()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference_logger = TrainingLogger(tmp_path / "reference", reference, reference_optimizer)
    train(model, optimizer, logger)
    train(reference, reference_optimizer, reference_logger)
    logger.close()
    reference_logger.close()
    assert logger.norm_source == "logger"
    run, reference_run = read_run(tmp_path), read_run(tmp_path / "reference")
    assert "logger" in text(run, "logger/norm_source")
    for tag in ("grad/global_norm", "update/global_norm"):
        torch.testing.assert_close(
            [value for _, value in scalars(run, tag)],
            [value for _, value in scalars(reference_run, tag)],
            rtol=1e-6,
            atol=0,
        )


def test_torchopt_lab_optimizer_on_cpu_is_logged_by_the_loggers_own_pass(tmp_path: Path) -> None:
    from torchopt_lab import optim

    model = make_model()
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    logger = TrainingLogger(tmp_path, model, optimizer)
    train(model, optimizer, logger, steps=2)
    logger.close()
    assert logger.norm_source == "logger", "no kernels ran on the CPU, so no kernel norms"
    assert len(scalars(read_run(tmp_path), "update_ratio/0.weight")) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"optimizer": None}, TypeError, "optimizer must have param_groups"),
        ({"log_every": 0}, ValueError, "Invalid log_every: 0"),
        ({"histogram_every": -1}, ValueError, "Invalid histogram_every: -1"),
        ({"log_dir": None}, ValueError, "Give log_dir or writer"),
    ],
)
def test_bad_arguments_raise_naming_the_value(
    tmp_path: Path, kwargs: dict, error: type[Exception], message: str
) -> None:
    model = make_model()
    arguments = {"log_dir": tmp_path, "model": model}
    arguments["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        TrainingLogger(**arguments)
