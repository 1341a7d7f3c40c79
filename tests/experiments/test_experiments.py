"""Every experiment runs end to end on its small budget (``--smoke``): it states its claim,
prints its numbers and no verdict (a smoke budget supports no claim), exits 0, and writes its
configuration, a valid PNG and TensorBoard runs. Bad options exit 2 with one line."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

# module -> TensorBoard runs it must write (relative to its output directory; "*" globs)
CASES = {
    "linear_regression": ["tensorboard"],
    "textbook_classifier": ["ours", "torch"],
    "optimizer_comparison": ["compare-*/sgd", "compare-*/adam"],
    "vanishing_gradients": ["sigmoid-plain", "relu-residual", "tanh-layernorm"],
    "exploding_gradients": ["none", "clip_grad_norm_", "clip_grad_value_"],
    "optimizer_paths": ["rosenbrock/sgd", "beale/adam", "quadratic/momentum"],
    "sparse_features": ["sgd", "adagrad", "rmsprop"],
    "hypergradient": ["sgd-lr0.1", "sgd-hd-lr0.01", "adam-hd-lr0.01"],
}


@pytest.fixture
def experiment_module(monkeypatch):
    """Import experiments by name as scripts do (their directory first on sys.path), and keep
    the caller's torch thread count, which experiments set to 1."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)
    sys.modules.pop("common", None)


@pytest.mark.parametrize("name", list(CASES))
def test_experiment_runs_on_its_smoke_budget_and_prints_no_verdict(
    name: str, experiment_module, tmp_path: Path
) -> None:
    module = experiment_module(name)
    printed = StringIO()
    with redirect_stdout(printed):
        code = module.main(["--smoke", "--out", str(tmp_path)])
    output = printed.getvalue()
    assert code == 0
    assert f"CLAIM: {module.CLAIM}" in output
    assert "VERDICT" not in output, output
    lines = output.splitlines()
    assert [line for line in lines if line.startswith("smoke run: no verdict")] == [
        sys.modules["common"].SMOKE_VERDICT
    ]

    config = json.loads((tmp_path / "config.json").read_text())
    for knob, value in module.SMOKE.items():
        assert config[knob] == value

    (figure,) = [path for path in tmp_path.rglob("*.png")]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import image

    pixels = image.imread(figure)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01

    for pattern in CASES[name]:
        (run,) = tmp_path.glob(pattern)
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        assert "train/loss" in tags and "lr/group_0" in tags, (pattern, tags)
        assert any(tag.startswith("hparam/") for tag in tags), (pattern, tags)


def test_experiment_help_shows_each_knobs_comment(experiment_module, capsys) -> None:
    module = experiment_module("exploding_gradients")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--clip-value CLIP_VALUE clip_grad_value_'s clip_value (default: 0.1)" in text
    assert "--smoke small budget for tests: {'steps': 40}" in text
    # --out's comment states its default; the generated "(default: '')" would be a second one.
    assert text.endswith(
        "--out OUT output directory (default: runs/experiments/exploding_gradients)"
    )
    assert text.count("(default:") == len(dataclasses.fields(module.Config))  # one per knob


def test_a_full_run_prints_its_verdict(experiment_module, tmp_path) -> None:
    common = experiment_module("common")
    for supported, line in ((True, "VERDICT: SUPPORTED"), (False, "VERDICT: NOT SUPPORTED")):
        printed = StringIO()
        with redirect_stdout(printed):
            assert (
                common.verdict(supported, ["x 1"], tmp_path, tmp_path / "f.png", smoke=False) == 0
            )
        assert printed.getvalue().splitlines()[:2] == ["  x 1", line]


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("linear_regression", ["--steps", "0"], "invalid --steps 0: must be > 0"),
        ("linear_regression", ["--noise", "nan"], "invalid --noise nan: must be >= 0"),
        ("linear_regression", ["--seed", "-1"], "invalid --seed -1: must be >= 0"),
        ("sparse_features", ["--p-rare", "2"], "invalid --p-rare 2.0: must be in (0, 1]"),
        ("vanishing_gradients", ["--depth", "1"], "invalid --depth 1: must be >= 2"),
        ("hypergradient", ["--hidden", "8", "0"], "invalid --hidden (8, 0): widths must be >= 1"),
        (
            "optimizer_comparison",
            ["--device", "gpu7"],
            "invalid --device 'gpu7'",
        ),
        (
            "textbook_classifier",
            ["--dtype", "foo"],
            "invalid --dtype 'foo': choose from float16, bfloat16, float32, float64",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_the_value(
    name, argv, message, experiment_module, tmp_path, capsys
) -> None:
    module = experiment_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}.py: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_an_out_that_is_a_file_exits_2_naming_it(experiment_module, tmp_path, capsys) -> None:
    module = experiment_module("linear_regression")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--smoke", "--out", str(out)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            f"linear_regression.py: error: invalid --out {str(out)!r}: {str(a_file)!r} is not a "
            "directory\n"
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_with_one_line(experiment_module, capsys) -> None:
    module = experiment_module("optimizer_comparison")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("optimizer_comparison.py: error: invalid --device 'cuda'")
    assert err.count("\n") == 1


def test_config_json_is_written_atomically(experiment_module, tmp_path, monkeypatch) -> None:
    """A run killed while writing config.json leaves no truncated file behind."""
    module = experiment_module("linear_regression")
    original = Path.write_text

    def killed_halfway(self: Path, data: str, *args, **kwargs) -> int:
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt), redirect_stdout(StringIO()):
        module.main(["--smoke", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_the_figure_is_written_atomically(experiment_module, tmp_path) -> None:
    """A figure whose writing fails halfway leaves the previous file and no temporary one."""
    common = experiment_module("common")
    pyplot = common.pyplot()
    path = tmp_path / "figure.png"
    path.write_bytes(b"previous")
    figure = pyplot.figure()
    figure.savefig = lambda target, **options: Path(target).write_bytes(b"\x89PNG") and 1 / 0
    with pytest.raises(ZeroDivisionError):
        common.save_figure(figure, path)
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


def test_experiment_options_override_the_smoke_budget(experiment_module, tmp_path) -> None:
    module = experiment_module("linear_regression")
    with redirect_stdout(StringIO()):
        module.main(["--smoke", "--steps", "3", "--lr", "0.2", "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["steps"], config["lr"], config["samples"]) == (3, 0.2, 200)


def test_the_package_never_imports_experiments() -> None:
    package = Path(__file__).resolve().parents[2] / "torchopt_lab"
    imports = re.compile(r"^\s*(from|import)\s+(experiments|common)\b", re.MULTILINE)
    for source in package.rglob("*.py"):
        assert not imports.search(source.read_text()), source
