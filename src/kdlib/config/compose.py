"""Composing a typed config: Hydra composition, plugin imports, validation, one-line errors.

``compose(overrides)`` is the notebook/test entry point (the CLI goes through ``@hydra.main`` but
validates the same way): it imports the ``plugins=[...]`` modules named in the overrides (so user
losses and algorithms are registered), composes ``conf/config.yaml`` with the overrides, converts
the result to :class:`~kdlib.config.KDConfig` dataclasses and checks values that types alone cannot
(registry names, positive sizes, launcher/worker combinations). Every failure is a
:class:`~kdlib.errors.ConfigError` with one line that names the key and, where there is a closed
set, the valid choices.
"""

from __future__ import annotations

import importlib
import importlib.resources
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from kdlib.config.checks import check_names, check_unknown_keys, validate
from kdlib.config.resolve import resolve
from kdlib.config.schema import KDConfig
from kdlib.config.store import register_configs
from kdlib.errors import ConfigError, KdlibError, first_line

CONFIG_NAME = "config"


def conf_dir() -> str:
    """Absolute path of the shipped ``conf/`` (the package ``kdlib.conf``)."""
    return str(importlib.resources.files("kdlib.conf"))


def compose(overrides: Sequence[str] = ()) -> KDConfig:
    """The typed config of ``kdlib <overrides>`` (no run directory, no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides)
    import_plugins(plugins_in(overrides))
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        try:
            cfg = hydra_compose(CONFIG_NAME, overrides=overrides)
        except Exception as exc:  # Hydra/OmegaConf composition errors
            raise ConfigError(explain(exc, overrides)) from None
    return to_typed(cfg)


def load_config(path: str | Path) -> KDConfig:
    """The typed config of a run directory's ``config.yaml`` (or any file written like it): what
    that run executed, every registry-backed option typed by its registered class. Not resolved
    again and not checked (it was, before it ran)."""
    from kdlib.config.store import registry_groups

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = OmegaConf.create(text)
    except Exception as exc:
        raise ConfigError(f"{path}: not a kdlib config.yaml ({first_line(exc)})") from None
    register_configs()
    node = OmegaConf.structured(KDConfig)
    try:
        with open_dict(node):
            for group, (registry, key) in registry_groups().items():
                path_in_cfg = group.replace("/", ".")
                saved = OmegaConf.select(data, path_in_cfg)
                name = None if saved is None else saved.get(key)
                if name is not None and name in registry and registry.entry(name).config_cls is not None:
                    typed = OmegaConf.structured(registry.entry(name).config_cls(**{key: name}))
                    OmegaConf.update(node, path_in_cfg, typed, force_add=True)
        merged = OmegaConf.merge(node, data)
        typed = OmegaConf.to_object(merged)
    except Exception as exc:
        raise ConfigError(f"{path}: {explain(exc, [])}") from None
    return typed


def to_typed(cfg: DictConfig | KDConfig) -> KDConfig:
    """KDConfig dataclasses from a composed DictConfig, resolved (what needs no model file) and
    validated; a KDConfig is resolved and validated in place."""
    if isinstance(cfg, KDConfig):
        typed = cfg
    else:
        cfg = cfg.copy()
        if "hydra" in cfg:
            with open_dict(cfg):
                cfg.pop("hydra")
        try:
            typed = OmegaConf.to_object(cfg)
        except Exception as exc:
            raise ConfigError(explain(exc, [])) from None
        if not isinstance(typed, KDConfig):
            raise ConfigError("the composed config is not a kdlib config (was kdlib_schema dropped from defaults?)")
    check_unknown_keys(typed)
    check_names(typed)  # resolving asks the chosen options, so they must be what they say first
    resolve(typed)
    validate(typed)
    return typed


def plugins_in(overrides: Iterable[str]) -> list[str]:
    """Module names given by a ``plugins=...`` / ``+plugins=...`` override."""
    modules: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+~") != "plugins":
            continue
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        modules.extend(v.strip().strip("'\"") for v in value.split(",") if v.strip())
    return modules


def import_plugins(modules: Iterable[str]) -> None:
    """Import user modules (they register losses, algorithms, backends); '.' is importable. A module
    that cannot be found, or that raises while it is imported (a bug in the plugin), is a one-line
    ConfigError naming the plugin and, for a raise, the file and line."""
    import traceback

    modules = list(modules)
    if modules and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # only when asked: a stray file here must not shadow a package
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"plugins: cannot import {name!r}: {exc}") from None
        except KdlibError:
            raise
        except Exception as exc:  # noqa: BLE001 - the plugin's own code failed
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
            at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
            raise ConfigError(
                f"plugins: importing {name!r} raised {type(exc).__name__}: {first_line(exc)}{at}; "
                f"`python -c 'import {name}'` shows the traceback"
            ) from None


def explain(exc: BaseException, overrides: Sequence[str]) -> str:
    """One line from a Hydra or OmegaConf error, with the valid choices when there is a set."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split(f"Available options in '{group}':", 1)[-1], re.M)
        choices = f"; choose one of: {', '.join(options)}" if options else ""
        return f"unknown {group} {option!r}{choices}"
    multiple = re.search(r"Multiple values for (\S+?)\.", text)
    if multiple:
        group = multiple.group(1)
        return f"{group} is given twice; combine options of one group as +{group}=[a,b]"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        return f"unknown key {key!r}" + _valid_keys_hint(key, overrides)
    cause = exc.__cause__ or exc.__context__
    merge = re.search(r"Error merging override (\S+?)=(.*)", text)
    if merge and cause is not None:
        return f"bad value for {merge.group(1)}: {first_line(cause)}"
    key = re.search(r"full_key: (\S+)", text)
    if key:
        return f"{key.group(1)}: {first_line(exc)}"
    return first_line(exc) + (f" ({first_line(cause)})" if cause is not None and first_line(cause) not in text else "")


def _valid_keys_hint(key: str, overrides: Sequence[str]) -> str:
    """'; valid keys of <parent>: ...' computed from the config without the bad override."""
    from hydra import compose as hydra_compose

    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        cfg = hydra_compose(CONFIG_NAME, overrides=rest)
    except Exception:
        return ""
    parent = key.rpartition(".")[0]
    while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
        parent = parent.rpartition(".")[0]  # walk up to the deepest part that exists
    node: Any = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [k for k in node.keys() if k != "hydra"]
    where = f"of {parent} " if parent else ""
    return f"; valid keys {where}are: {', '.join(map(str, keys))}"
