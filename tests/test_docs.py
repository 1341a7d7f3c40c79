"""The README and docs/ hold what they promise: a short README whose Quickstart is on the first
screen and runs the CI's own test command, Python blocks that run (README) or compile (docs),
commands that parse, and relative links and anchors that resolve (GitHub's slug rules)."""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from torchopt_lab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
QUICKSTART_WITHIN = 40  # lines: the first screen
COMPILE_ONLY = "<!-- compile-only -->"

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, first line number (of the fence), text, and whether
    an HTML comment right above marks it compile-only."""

    language: str
    line: int
    text: str
    compile_only: bool


def code_blocks(text: str) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, language, start = match.group(2), match.group(3).lower(), index
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append(Block(language, start + 1, "\n".join(body) + "\n", previous == COMPILE_ONLY))
        index += 1
    return blocks


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    result, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            result.append((number, line))
    return result


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercased, punctuation other than
    hyphens and underscores removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(
        char
        for char in text
        if char in " -_" or unicodedata.category(char)[0] in "LNM"  # letters, numbers, marks
    )
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """The relative links and #anchors in ``path`` that do not resolve, as 'line: target (why)'."""
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{path.name}:{number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{path.name}:{number}: {target} (no such heading)")
    return problems


def test_readme_is_at_most_250_lines() -> None:
    length = len(README.read_text(encoding="utf-8").splitlines())
    assert length <= MAX_README_LINES, f"README.md has {length} lines"


def test_quickstart_is_on_the_first_screen() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    headings = [n for n, line in enumerate(lines, 1) if line.strip() == "## Quickstart"]
    assert headings, "README.md has no '## Quickstart' heading"
    assert headings[0] <= QUICKSTART_WITHIN, f"Quickstart starts at line {headings[0]}"


def _quickstart(text: str) -> str:
    return text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]


def test_quickstart_test_command_is_the_one_ci_runs() -> None:
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if re.match(r"\s*python3? -m pytest\b", line)
    ]
    assert len(ci_commands) == 1, ci_commands
    quickstart = _quickstart(README.read_text(encoding="utf-8"))
    commands = [
        line.split("#", 1)[0].strip()
        for block in code_blocks(quickstart)
        for line in block.text.splitlines()
    ]
    readme_commands = [command for command in commands if "-m pytest" in command]
    assert readme_commands == ci_commands


def test_quickstart_installs_the_cpu_build_and_runs_the_main_job() -> None:
    quickstart = _quickstart(README.read_text(encoding="utf-8"))
    commands = [line for block in code_blocks(quickstart) for line in block.text.splitlines()]
    assert any(
        line.startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu")
        for line in commands
    )
    assert 'pip install -e ".[dev]"' in "\n".join(commands)
    assert "torchopt-lab compare" in commands


def _compare_commands(text: str) -> list[str]:
    from_blocks = [
        line.split("#", 1)[0].strip()
        for block in code_blocks(text)
        if block.language in {"bash", "sh", "shell", "console"}
        for line in block.text.splitlines()
    ]
    from_prose = [span for _, line in prose_lines(text) for _, span in _INLINE_CODE.findall(line)]
    return [
        command
        for command in from_blocks + from_prose
        if command.startswith("torchopt-lab compare")
    ]


def test_readme_compare_commands_parse() -> None:
    commands = _compare_commands(README.read_text(encoding="utf-8"))
    assert "torchopt-lab compare" in commands
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.command == "compare", command


def _python_blocks(path: Path) -> list[Block]:
    return [
        block
        for block in code_blocks(path.read_text(encoding="utf-8"))
        if block.language in {"python", "py"}
    ]


README_BLOCKS = _python_blocks(README)


def test_readme_marks_only_the_framework_snippets_compile_only() -> None:
    # Lightning and Hugging Face are not dependencies: only their snippets are left unrun.
    skipped = [block for block in README_BLOCKS if block.compile_only]
    assert len(skipped) == 2
    assert "lightning" in skipped[0].text and "configure_optimizers" in skipped[0].text
    assert (
        "transformers" in skipped[1].text and "optimizers=(optimizer, scheduler)" in skipped[1].text
    )


@pytest.mark.parametrize(
    "block", [b for b in README_BLOCKS if not b.compile_only], ids=lambda b: f"line{b.line}"
)
def test_readme_python_block_runs(block: Block, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write (TensorBoard runs) write here
    code = compile(block.text, f"README.md:{block.line}", "exec")
    threads = torch.get_num_threads()
    # One thread: these tiny models gain nothing from more, and on a busy machine extra threads
    # spin (the training loop took 25 s with 2 threads under load, 3 s with one).
    torch.set_num_threads(1)
    try:
        exec(code, {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "block",
    [(path, block) for path in [README, *DOCS] for block in _python_blocks(path)],
    ids=lambda item: f"{item[0].name}:{item[1].line}",
)
def test_python_block_compiles(block: tuple[Path, Block]) -> None:
    path, code = block
    compile(code.text, f"{path.name}:{code.line}", "exec")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_link_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with: punctuation\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-code-heading-with-punctuation) [self](#page) [web](https://x.org/y)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading) ![img](nowhere.png)\n"
        "`[in code](ignored.md)`\n\n"
        "```markdown\n[in a block](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md:4: missing.md (no such file)",
        "page.md:4: other.md#no-such-heading (no such heading)",
        "page.md:4: nowhere.png (no such file)",
    ]


def test_github_slug_follows_githubs_rules() -> None:
    assert github_slug("The main job: torchopt-lab compare") == "the-main-job-torchopt-lab-compare"
    assert github_slug("Differences from torch.optim") == "differences-from-torchoptim"
    assert github_slug("Layer kernels (Triton)") == "layer-kernels-triton"
    assert github_slug("`SGD` and *friends*") == "sgd-and-friends"


def test_every_optimizer_has_its_section_in_optimizers_md() -> None:
    import torchopt_lab.optim as optim

    classes = [
        name
        for name in optim.__all__
        if isinstance(getattr(optim, name), type)
        and issubclass(getattr(optim, name), torch.optim.Optimizer)
        and name != "RuleOptimizer"
    ]
    sections = anchors(ROOT / "docs" / "optimizers.md")
    assert classes and [name for name in classes if github_slug(name) not in sections] == []


def test_readme_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    linked = {Path(target.partition("#")[0]).name for target in _LINK.findall(text)}
    assert [path.name for path in DOCS if path.name not in linked] == []
