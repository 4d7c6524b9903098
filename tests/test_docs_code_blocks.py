"""Every code block in README.md and docs/*.md runs, or at least parses (issue 18).

How blocks are treated (the agreement with whoever writes the docs):

- ```python blocks run in a subprocess with this venv's Python; ```bash, ```sh, ```shell and
  untagged ``` blocks run with ``bash -euo pipefail``. Both run in a fresh temporary folder whose
  top-level entries link to the repository's (so ``.venv/bin/ctlesion``, ``models/``, ``scripts/``
  resolve) while ``work/`` is the temporary folder's own; ``.venv/bin`` is first on ``PATH``.
- Fixture data: ``study/series_dir`` in that folder is a held-out phantom CT series (3-4 nodules)
  when a block names it; a block that names ``CTLESION_URL`` gets a real tritonserver serving the
  CPU repository, its gRPC ``host:port`` in that variable.
- ```console and ```text blocks are transcripts or pictures: never run. Other tags (yaml, json,
  mermaid, ...) are not run either.
- A block that cannot run in the suite (trains for an hour, needs Docker or a cluster, runs a
  load test) is preceded by ``<!-- docs-test: skip reason="..." -->``. It is still checked: bash
  syntax, every ``ctlesion SUB`` has a ``--help`` that lists every flag the block passes (the same
  for ``python -m MODULE`` and ``python scripts/x.py``), the repository files it names exist,
  ``make`` targets exist; a skipped Python block must compile and its imports must resolve.
- ``<!-- docs-test: timeout=N -->`` raises a block's time limit (default 120 s).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_TAGS = {"python", "py"}
SHELL_TAGS = {"bash", "sh", "shell", ""}
TRANSCRIPT_TAGS = {"console", "text"}
DEFAULT_TIMEOUT_S = 120
SERIES_FIXTURE = "study/series_dir"
URL_VARIABLE = "CTLESION_URL"

_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
_MARKER_ARG = re.compile(r'(\w+)(?:=("[^"]*"|\S+))?')
_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", "|&", ";;"}
_PYTHON_PROGRAMS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    tag: str
    text: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.tag in PYTHON_TAGS:
            return "python"
        if self.tag in SHELL_TAGS:
            return "shell"
        return "other"

    @property
    def skip_reason(self) -> str | None:
        return self.directives.get("skip_reason") if "skip" in self.directives else None

    @property
    def timeout_s(self) -> int:
        return int(self.directives.get("timeout", DEFAULT_TIMEOUT_S))


def parse_directives(comment: str, where: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for match in _MARKER_ARG.finditer(comment):
        key, value = match.group(1), (match.group(2) or "").strip('"')
        if key == "skip":
            directives["skip"] = ""
        elif key == "reason":
            directives["skip_reason"] = value
        elif key == "timeout":
            directives["timeout"] = value
        else:
            raise ValueError(f"{where}: unknown docs-test directive {key!r} (known: skip reason=\"...\", timeout=N)")
    if "skip" in directives and not directives.get("skip_reason"):
        raise ValueError(f'{where}: docs-test skip needs reason="why it cannot run in the suite"')
    return directives


def read_blocks(path: Path) -> list[Block]:
    """Fenced blocks of one Markdown file, each with the docs-test directives just above it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, tag = fence.group(1), fence.group(2).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: code block never closed")
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        directives: dict[str, str] = {}
        if above >= 0 and (marker := _MARKER.match(lines[above])):
            directives = parse_directives(marker.group(1), f"{path.name}:{above + 1}")
        blocks.append(Block(path, start + 1, tag, "\n".join(body) + "\n", directives))
        i += 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in read_blocks(doc)]
EXECUTABLE = [b for b in ALL_BLOCKS if b.kind in ("python", "shell")]


# ----------------------------------------------------------------------------- static checks


def shell_commands(text: str) -> list[list[str]]:
    """Simple commands of a shell block: words, leading VAR=value assignments dropped."""
    # One line at a time (continuations joined): shlex drops newlines, which end a command too.
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line_lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        line_lexer.whitespace_split = True
        line_lexer.commenters = "#"
        current: list[str] = []
        for token in line_lexer:
            if token in _OPERATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    result = []
    for words in out:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words = words[1:]
        if words and words[0] == "export":
            continue
        if words:
            result.append(words)
    return result


@functools.cache
def help_flags(argv: tuple[str, ...]) -> frozenset[str]:
    """Options listed by ``argv + --help`` (run from the repository root, as a user would)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    proc = subprocess.run([*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`{' '.join(argv)} --help` failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


def _flags_passed(words: list[str]) -> list[str]:
    flags = []
    for word in words:
        if word == "--":
            break
        if re.match(r"^--?[A-Za-z][\w-]*(=.*)?$", word):
            flags.append(word.split("=", 1)[0])
    return flags


def _looks_like_repo_path(word: str) -> bool:
    if "$" in word or "://" in word or word.startswith("-"):
        return False
    top = word.split("/", 1)[0]
    # Only names with a file suffix: `deploy/ctlesion-triton` is a Kubernetes object, not a path.
    has_suffix = bool(Path(word).suffix) and not word.endswith(".")
    return "/" in word and has_suffix and top not in ("work", "", ".", "..") and (REPO / top).exists()


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one command of a block (empty: it would parse)."""
    problems: list[str] = []
    program = words[0]
    base = Path(program).name
    if base == "ctlesion":
        from ctlesion_client.cli import COMMANDS

        if len(words) < 2 or words[1].startswith("-"):
            return problems
        sub = words[1]
        if sub not in COMMANDS:
            return [f"`ctlesion {sub}`: no such subcommand (known: {', '.join(COMMANDS)})"]
        accepted = help_flags((str(VENV_BIN / "ctlesion"), sub))
        problems += [f"`ctlesion {sub}` does not accept {flag}" for flag in _flags_passed(words[2:]) if flag not in accepted]
    elif program in _PYTHON_PROGRAMS or base in ("python", "python3"):
        if len(words) >= 3 and words[1] == "-m":
            module, rest = words[2], words[3:]
            if module == "pytest":
                problems += check_pytest_args(rest)
            elif importlib.util.find_spec(module) is None:
                problems.append(f"python -m {module}: no such module")
            else:
                accepted = help_flags((sys.executable, "-m", module))
                problems += [f"`python -m {module}` does not accept {f}" for f in _flags_passed(rest) if f not in accepted]
        elif len(words) >= 2 and words[1].endswith(".py"):
            script = REPO / words[1]
            if not script.is_file():
                problems.append(f"{words[1]}: no such script")
            else:
                accepted = help_flags((sys.executable, str(script)))
                problems += [f"`{words[1]}` does not accept {f}" for f in _flags_passed(words[2:]) if f not in accepted]
    elif base == "pytest":
        problems += check_pytest_args(words[1:])
    elif base == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
            if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.M):
                problems.append(f"make {target}: no such target in the Makefile")
    for word in words[1:]:
        for part in [word.split("=", 1)[1]] if word.startswith("--") and "=" in word else [word]:
            if _looks_like_repo_path(part) and not list(REPO.glob(part)) and not (REPO / part).exists():
                problems.append(f"{program}: {part} does not exist in the repository")
    return problems


def check_pytest_args(args: list[str]) -> list[str]:
    return [
        f"pytest: {arg} does not exist" for arg in args
        if not arg.startswith("-") and arg.startswith("tests/") and not (REPO / arg.split("::")[0]).exists()
    ]


def static_problems(block: Block) -> list[str]:
    if block.kind == "python":
        try:
            tree = ast.parse(block.text, filename=block.name)
        except SyntaxError as exc:
            return [f"does not compile: {exc}"]
        problems = []
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if importlib.util.find_spec(name.split(".")[0]) is None:
                    problems.append(f"import {name}: no such module")
        return problems
    syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    if syntax.returncode:
        return [f"bash syntax (an output transcript? tag it ```console or ```text): {syntax.stderr.strip()}"]
    problems: list[str] = []
    for words in shell_commands(block.text):
        problems += check_command(words)
    return problems


# ----------------------------------------------------------------------------- running


def sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the repository root (links) with its own work/."""
    root = tmp_path / "root"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("work", ".git", ".pytest_cache"):
            (root / entry.name).symlink_to(entry)
    (root / "work").mkdir()
    return root


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if block.kind == "python":
        script = cwd / "docs_block.py"
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    else:
        script = cwd / "docs_block.sh"
        script.write_text(block.text)
        argv = ["bash", "-euo", "pipefail", str(script)]
    try:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=block.timeout_s)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.name}: ran past its {block.timeout_s} s limit (mark it <!-- docs-test: skip reason=... --> "
                    f"or timeout=N); output so far:\n{exc.stdout or ''}{exc.stderr or ''}")


def test_the_docs_have_blocks_and_every_fence_is_closed() -> None:
    """The parser sees the README's blocks; an unclosed fence or unknown directive fails at import."""
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md"]
    assert any(b.kind == "python" and b.skip_reason is None for b in readme), "README's client example must run"
    assert any(b.skip_reason for b in ALL_BLOCKS), "the long-running blocks are marked, not silently ignored"


def test_static_checks_catch_a_bad_flag_and_a_missing_file() -> None:
    """The parse check can fail: a flag ctlesion does not have, a file the repository does not have."""
    bad = Block(REPO / "README.md", 0, "bash", "ctlesion phantom --out x --no-such-flag 3\nbash scripts/no_such.sh\n")
    problems = static_problems(bad)
    assert any("--no-such-flag" in p for p in problems), problems
    assert any("scripts/no_such.sh" in p for p in problems), problems
    good = Block(REPO / "README.md", 0, "bash", "ctlesion phantom --out x --cases 1 --seed 3  # comment\n")
    assert static_problems(good) == []


@pytest.mark.slow
@pytest.mark.parametrize("block", EXECUTABLE, ids=[b.name for b in EXECUTABLE])
def test_code_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    problems = static_problems(block)
    assert not problems, f"{block.name}:\n  " + "\n  ".join(problems)
    if block.skip_reason is not None:
        return  # checked above; cannot run in the suite (the reason is in the Markdown)
    cwd = sandbox(tmp_path)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    if SERIES_FIXTURE in block.text:
        (cwd / SERIES_FIXTURE).parent.mkdir(parents=True)
        (cwd / SERIES_FIXTURE).symlink_to(request.getfixturevalue("phantom_case"))
    if URL_VARIABLE in block.text:
        env[URL_VARIABLE] = request.getfixturevalue("triton").grpc_url
    proc = run_block(block, cwd, env)
    assert proc.returncode == 0, (
        f"{block.name} ({block.kind}) exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_resolve() -> None:
    """[text](path#anchor) links between the docs point to files (and headings) that exist."""
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # links inside code blocks are code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", file.read_text(), flags=re.M)}
                if anchor not in anchors:
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
