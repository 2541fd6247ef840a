"""Every ``kdlib ...`` command the documentation shows, as the argument list a shell would pass.

Read from README.md, docs/*.md (lines of fenced code blocks that start with ``kdlib``, after an
optional ``$``, joined over ``\\`` continuations, and inline code spans that start with ``kdlib``)
and from comments of conf/**/*.yaml (inline code spans). A shell comment ends a command. A lone
``...`` argument stands for "and your own overrides" and is dropped; every other argument is kept
as written, so a command that does not compose is a documentation bug. recipes/*.sh are composed by
tests/unit/test_config.py::test_launcher_scripts_compose.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ELLIPSIS = "..."


@dataclass(frozen=True)
class DocumentedCommand:
    file: str  # relative to the repository
    line: int
    argv: tuple[str, ...]  # the arguments after `kdlib`

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def text(self) -> str:
        return shlex.join(["kdlib", *self.argv])


def documented_commands() -> list[DocumentedCommand]:
    commands: list[DocumentedCommand] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        commands += _markdown_commands(path)
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("#"):
                commands += [_command(path, number, span) for span in _inline_spans(line)]
    return commands


def _markdown_commands(path: Path) -> list[DocumentedCommand]:
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced:
            text = re.sub(r"^\$\s+", "", line.strip())
            if text == "kdlib" or text.startswith("kdlib "):
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                found.append(_command(path, number, text))
        else:
            found += [_command(path, number, span) for span in _inline_spans(line)]
        i += 1
    return found


def _inline_spans(line: str) -> list[str]:
    return [span for span in re.findall(r"`([^`]+)`", line) if span == "kdlib" or span.startswith("kdlib ")]


def _command(path: Path, number: int, text: str) -> DocumentedCommand:
    words = shlex.split(text, comments=True)
    return DocumentedCommand(str(path.relative_to(ROOT)), number, tuple(w for w in words[1:] if w != ELLIPSIS))


def documented_modules() -> dict[str, str]:
    """The Python modules the docs write out for their commands (a fenced block whose first line
    is ``# <name>.py``), by module name."""
    modules = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
            first = block.splitlines()[0].strip() if block.strip() else ""
            match = re.fullmatch(r"#\s*(\w+)\.py", first)
            if match:
                modules[match.group(1)] = block
    return modules


def jobs(argv) -> list[list[str]]:
    """The overrides of every job the command runs (one, or each combination of a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdlib.cli import split_arguments

    flags, overrides = split_arguments(argv)
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    parsed = OverridesParser.create().parse_overrides(kept)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(c) for c in itertools.product(*choices)]
