"""``torchopt-lab compare`` end to end with a tiny budget: the event files (one run per
optimizer, the promised tags, plausible values), the PNG and the JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchopt_lab import cli
from torchopt_lab.compare import DEFAULT_LR, OPTIMIZERS, CompareConfig

REPOSITORY = Path(__file__).resolve().parents[1]
EPOCHS, BATCH_SIZE, EVAL_EVERY = 1, 64, 5
TRAIN_SAMPLES = 1437  # 80% of the 1797 digits
STEPS = EPOCHS * (TRAIN_SAMPLES // BATCH_SIZE)
PER_STEP_TAGS = (
    "train/loss",
    "lr/group_0",
    "grad/global_norm",
    "update/global_norm",
    "grad_norm/0.weight",
    "update_ratio/0.weight",
    "update_ratio/4.weight",
)
EVAL_TAGS = ("eval/train_loss", "eval/train_accuracy", "eval/val_loss", "eval/val_accuracy")
FINAL_TAGS = ("hparam/train_loss", "hparam/val_loss", "hparam/val_accuracy", "hparam/ms_per_step")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """One tiny run of the whole command, shared by the tests below."""
    logdir = tmp_path_factory.mktemp("runs")
    argv = ["compare", "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE)]
    argv += ["--eval-every", str(EVAL_EVERY), "--logdir", str(logdir), "--no-progress"]
    # Lion's tuned lr (1e-4) moves each weight by at most 2e-3 in these 22 steps, and RAdam warms
    # up (its first steps are damped momentum SGD): too little to leave chance, so this short run
    # gives them larger ones, as it does Adam and SGD.
    argv += ["--lr", "adam=0.002", "sgd=0.05", "lion=0.001", "radam=0.01"]
    printed = StringIO()
    threads = torch.get_num_threads()
    with redirect_stdout(printed):
        code = cli.main([*argv, "--threads", "1"])
    assert torch.get_num_threads() == threads, "compare restores the caller's thread count"
    (run_dir,) = logdir.iterdir()
    return code, printed.getvalue(), run_dir


def read_run(path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def values(run: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in run.Scalars(tag)]


def test_compare_exits_zero_and_prints_a_row_per_optimizer(comparison) -> None:
    code, printed, run_dir = comparison
    assert code == 0
    assert run_dir.name.startswith("compare-")
    header, rule, *rows = printed.split("\n\n")[0].splitlines()
    assert "steps to loss<=0.1" in header and "ms/step" in header and set(rule) <= {"-", " "}
    assert [row.split()[0] for row in rows] == list(OPTIMIZERS)
    assert f"Plot: {run_dir / 'compare.png'}" in printed


def test_compare_writes_one_run_per_optimizer_with_the_promised_tags(comparison) -> None:
    _, _, run_dir = comparison
    assert sorted(path.name for path in run_dir.iterdir() if path.is_dir()) == sorted(OPTIMIZERS)
    expected_lr = {**DEFAULT_LR, "adam": 0.002, "sgd": 0.05, "lion": 0.001, "radam": 0.01}
    first_losses = {}
    for name in OPTIMIZERS:
        run = read_run(run_dir / name)
        tags = set(run.Tags()["scalars"])
        missing = {*PER_STEP_TAGS, *EVAL_TAGS, *FINAL_TAGS} - tags
        assert not missing, f"{name}: missing tags {missing}"
        for tag in PER_STEP_TAGS:
            logged = values(run, tag)
            assert len(logged) == STEPS, tag
            assert all(math.isfinite(value) for value in logged), tag
        torch.testing.assert_close(values(run, "lr/group_0"), [expected_lr[name]] * STEPS)
        assert all(value > 0 for value in values(run, "grad/global_norm"))
        assert all(0 < value < 1 for value in values(run, "update_ratio/0.weight"))
        assert [event.step for event in run.Scalars("eval/val_loss")] == [
            *range(0, STEPS, EVAL_EVERY),
            STEPS,
        ]
        losses = values(run, "eval/train_loss")
        assert abs(losses[0] - math.log(10)) < 0.3, "an untrained 10-class net starts near ln 10"
        assert losses[-1] < losses[0], f"{name} did not reduce the training loss"
        accuracy = values(run, "eval/val_accuracy")
        # 22 steps: far from trained, but well above chance (0.1) for every optimizer.
        assert all(0 <= value <= 1 for value in accuracy) and accuracy[-1] > 0.25
        assert "config/text_summary" in run.Tags()["tensors"]
        assert "_hparams_/session_start_info" in run.PluginTagToContent("hparams")
        first_losses[name] = (values(run, "train/loss")[0], losses[0])
    # Same initial weights and the same first minibatch for every optimizer.
    assert len(set(first_losses.values())) == 1, first_losses


def test_compare_writes_a_valid_png(comparison) -> None:
    from matplotlib import image

    _, _, run_dir = comparison
    path = run_dir / "compare.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 800 and pixels.shape[2] in (3, 4)
    assert pixels.std() > 0.01, "not a blank image"


def test_compare_writes_results_json(comparison) -> None:
    _, _, run_dir = comparison
    report = json.loads((run_dir / "results.json").read_text())
    assert report["config"]["epochs"] == EPOCHS
    assert report["environment"]["train_samples"] == TRAIN_SAMPLES
    decisions = report["environment"]["backends"]["decisions"]
    assert any(name.startswith("optim.") for name in decisions), "our optimizers ran"
    assert any(name.startswith("nn.") for name in decisions), "our layers ran"
    assert list(report["results"]) == list(OPTIMIZERS)
    for name, result in report["results"].items():
        assert result["steps"] == STEPS
        assert result["norm_source"] in ("optimizer", "logger")
        assert 0 < result["ms_per_update"] < result["ms_per_step"]
        assert result["history"]["step"][-1] == STEPS
        assert result["val_loss"] == result["history"]["val_loss"][-1]
        assert 0.25 < result["val_accuracy"] <= 1, name
    assert report["results"]["adam"]["lr"] == 0.002


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "adamw=0.1"], "invalid --lr 'adamw=0.1'"),
        (["--lr", "adam=-1"], "the learning rate must be > 0"),
        (["--lr", "adam"], "expected NAME=VALUE"),
        (["--optimizers", "shampoo"], "invalid choice: 'shampoo'"),
    ],
)
def test_compare_rejects_bad_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "Invalid epochs: 0"),
        (["--batch-size", "5000"], "Invalid batch_size: 5000"),
        (["--hidden", "0"], "Invalid hidden widths: (0,)"),
        (["--device", "gpu0"], "Invalid device: 'gpu0'"),
    ],
)
def test_compare_reports_bad_budgets_without_a_traceback(argv, message, tmp_path, capsys) -> None:
    code = cli.main(["compare", "--logdir", str(tmp_path), "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_config_rejects_unknown_optimizer_and_bad_lr() -> None:
    with pytest.raises(ValueError, match=r"Invalid optimizers: \['shampoo'\]"):
        CompareConfig(optimizers=("shampoo",))
    with pytest.raises(ValueError, match="Invalid learning rate for sgd: 0"):
        CompareConfig(lr={"sgd": 0})


def test_console_help_lists_compare_and_its_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchopt_lab.cli", "compare", "--help"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    text = " ".join(result.stdout.split())
    for option in ("--optimizers", "--epochs", "--batch-size", "--lr", "--seed", "--device"):
        assert option in text
    assert "--logdir" in text and "(default: runs)" in text
