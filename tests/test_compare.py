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
        (["--device", "gpu0"], "invalid --device 'gpu0'"),
        (["--target-loss", "-1"], "Invalid target_loss: -1.0"),
        (["--target-loss", "inf"], "Invalid target_loss: inf"),
        (["--seed", "-1"], "Invalid seed: -1"),
        (["--lr", "adam=3e-3", "--optimizers", "sgd"], "--lr adam=0.003: adam is not among"),
        (["--lr", "sgd=0.1", "--lr", "sgd=0.2"], "--lr gives sgd twice: sgd=0.1 and sgd=0.2"),
    ],
)
def test_compare_reports_bad_budgets_without_a_traceback(argv, message, tmp_path, capsys) -> None:
    code = cli.main(["compare", "--logdir", str(tmp_path), "--no-progress", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("torchopt-lab compare: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not list(tmp_path.iterdir()), "nothing is written for a refused command"


def test_compare_refuses_a_logdir_that_is_a_file_naming_it(tmp_path, capsys) -> None:
    for logdir in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        (tmp_path / "a-file").write_text("not a directory")
        code = cli.main(["compare", "--logdir", str(logdir), "--no-progress", "--epochs", "1"])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("torchopt-lab compare: error: Invalid logdir: ")
        assert repr(str(logdir)) in err and err.count("\n") == 1, err


def test_compare_on_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal needs a machine without it")
    assert cli.main(["compare", "--device", "cuda", "--logdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        "torchopt-lab compare: error: invalid --device 'cuda'"
    )


def test_a_learning_rate_given_with_repeated_lr_flags_is_kept() -> None:
    args = cli.build_parser().parse_args(["compare", "--lr", "sgd=0.2", "--lr", "adam=0.01"])
    assert args.lr == [("sgd", 0.2), ("adam", 0.01)]


def test_results_json_is_written_atomically(tmp_path, monkeypatch) -> None:
    """A run killed while writing results.json leaves no truncated file behind."""
    original = Path.write_text

    def killed_halfway(self: Path, data: str, *args, **kwargs) -> int:
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    argv = ["compare", "--optimizers", "sgd", "--epochs", "1", "--eval-every", "1000"]
    with pytest.raises(KeyboardInterrupt), redirect_stdout(StringIO()):
        cli.main([*argv, "--logdir", str(tmp_path), "--no-progress"])
    (run_dir,) = tmp_path.iterdir()
    assert sorted(path.name for path in run_dir.iterdir()) == ["compare.png", "sgd"]


def test_the_plot_gives_each_optimizer_its_marker_and_labels_the_target_line(comparison) -> None:
    """SGD and Momentum take nearly the same path: colour alone lets one hide the other."""
    from matplotlib import pyplot

    from torchopt_lab.compare import OptimizerResult, figure_of

    _, _, run_dir = comparison
    report = json.loads((run_dir / "results.json").read_text())
    results = {name: OptimizerResult(**result) for name, result in report["results"].items()}
    figure = figure_of(results, target_loss=0.1)
    try:
        loss_axes, accuracy_axes = figure.axes
        curves = [line for line in loss_axes.get_lines() if len(line.get_xdata()) > 0]
        curves = [line for line in curves if len(line.get_xdata()) > 2]  # not the target line
        markers = [line.get_marker() for line in curves]
        assert len(curves) == 2 * len(results)  # train and validation per optimizer
        assert len(set(markers)) == len(results) and "None" not in markers
        offsets = {line.get_marker(): line.get_markevery() for line in curves}
        assert len({offset for offset, _ in offsets.values()}) == len(results), offsets
        legend = [text.get_text() for text in loss_axes.get_legend().get_texts()]
        assert "target train loss 0.1" in legend
        labels = [text.get_text() for text in accuracy_axes.get_legend().get_texts()]
        assert labels == [f"{name} (lr={result.lr:g})" for name, result in results.items()]
    finally:
        pyplot.close(figure)


def test_version_prints_the_package_version(capsys) -> None:
    from importlib.metadata import version

    import torchopt_lab

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"torchopt-lab {torchopt_lab.__version__}\n"
    assert torchopt_lab.__version__ == version("torchopt-lab")


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
