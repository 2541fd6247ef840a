"""SGLang's own OpenAI-protocol models and log-probability rendering, built from the installed source.

The installed sglang (0.5.23, ``--no-deps``) cannot be imported here (its package ``__init__``
pulls orjson, msgspec, openai, CUDA helpers). Its ``srt/entrypoints/openai/protocol.py`` and
``utils.py`` are parsed with ``ast`` instead, and the top-level definitions that
``CompletionRequest``, ``CompletionResponse`` and ``to_openai_style_logprobs`` need (found by
following the names they use) are executed as they are, with pydantic, in a module of their own. So
the loopback server validates requests and builds responses with SGLang's real pydantic classes
and renders top-log-probability keys with SGLang's real functions, not with a transcription.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading
import types
from importlib import metadata
from pathlib import Path
from typing import Any

PROTOCOL = "srt/entrypoints/openai/protocol.py"
UTILS = "srt/entrypoints/openai/utils.py"
# Imports of those files that run without sglang's dependencies (the rest are skipped).
_LOADING = threading.Lock()  # the loopback server's threads may ask at once
SAFE_IMPORTS = ("pydantic", "typing", "typing_extensions", "dataclasses", "time", "uuid", "logging", "unicodedata")


def sglang_root() -> Path:
    return Path(metadata.distribution("sglang").locate_file("sglang"))


def _definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _closure(tree: ast.Module, roots: list[str]) -> list[ast.stmt]:
    """The top-level statements defining ``roots`` and every top-level name they use, in source order."""
    defined = _definitions(tree)
    wanted, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in wanted or name not in defined:
            continue
        wanted.add(name)
        todo.extend(n.id for n in ast.walk(defined[name]) if isinstance(n, ast.Name))
    chosen = {id(defined[name]) for name in wanted}
    return [node for node in tree.body if id(node) in chosen]


def _safe_imports(tree: ast.Module) -> list[ast.stmt]:
    return [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            and all((getattr(node, "module", None) or a.name).split(".")[0] in SAFE_IMPORTS for a in node.names)]


def _load(name: str, relative: str, roots: list[str], given: dict[str, Any]) -> types.ModuleType:
    with _LOADING:
        if name in sys.modules:
            return sys.modules[name]
        return _exec(name, relative, roots, given)


def _exec(name: str, relative: str, roots: list[str], given: dict[str, Any]) -> types.ModuleType:
    tree = ast.parse((sglang_root() / relative).read_text(encoding="utf-8"))
    module = types.ModuleType(name)
    sys.modules[name] = module  # pydantic resolves the postponed annotations through it
    module.__dict__.update(given)
    body = ast.Module(body=_safe_imports(tree) + _closure(tree, roots), type_ignores=[])
    exec(compile(body, f"sglang/{relative}", "exec"), module.__dict__)
    return module


@functools.lru_cache(maxsize=None)
def protocol() -> types.ModuleType:
    """SGLang's CompletionRequest, CompletionResponse, CompletionResponseChoice, LogProbs, UsageInfo."""
    from typing import Any as StructuralTag  # sglang's fallback when xgrammar is missing

    module = _load("sglang_protocol_from_source", PROTOCOL,
                   ["CompletionRequest", "CompletionResponse", "CompletionResponseChoice", "LogProbs", "UsageInfo"],
                   {"StructuralTag": StructuralTag})
    for cls in ("CompletionRequest", "CompletionResponse"):
        getattr(module, cls).model_rebuild()
    return module


@functools.lru_cache(maxsize=None)
def openai_utils() -> types.ModuleType:
    """SGLang's ``to_openai_style_logprobs`` (with its lossless rendering of byte fragments)."""
    return _load("sglang_openai_utils_from_source", UTILS, ["to_openai_style_logprobs"],
                 {"LogProbs": protocol().LogProbs})


def completion_request_fields() -> set[str]:
    return set(protocol().CompletionRequest.model_fields)
