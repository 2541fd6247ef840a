"""Every kdlib command in README.md, docs/ and conf/ comments composes as written (each job of a
sweep), so a renamed key or option cannot leave a documented command behind."""

from __future__ import annotations

import pytest

from documented_commands import documented_commands, documented_modules, jobs
from kdlib.config.compose import compose, import_plugins, plugins_in
from kdlib.errors import ConfigError

COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50 and {"my_losses", "my_transforms"} <= set(documented_modules())
    assert any(c.file == "README.md" and c.argv == () for c in COMMANDS)  # the default job


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_composes(command, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, source in documented_modules().items():  # the plugin modules the docs write out
        (tmp_path / f"{name}.py").write_text(source)
    for overrides in jobs(list(command.argv)):
        try:
            import_plugins(plugins_in(overrides))
            compose(overrides)
        except ConfigError as exc:
            pytest.fail(f"{command.id}: `{command.text}` does not compose: {exc}")

