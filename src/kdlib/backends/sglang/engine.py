"""The one place kdlib talks to an SGLang ``Engine``: version gate, start-up arguments, every call.

SGLang is imported only here, and only when an engine starts (it pulls CUDA libraries). Before
that import the installed version is checked against :data:`SUPPORTED_VERSIONS`, the versions
whose source kdlib's contract test has read (``tests/unit/test_sglang_contract.py`` parses the
installed ``engine.py``, ``server_args.py`` and ``io_struct.py`` with ``ast`` and checks every
method, keyword argument and ServerArgs field used in this module). Every Engine call goes
through :class:`SGLangEngine`, so that test sees them all; the calls that report
``(success, message)`` are checked here and a failure is raised as a ModelError naming the call.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable, Optional, Sequence

import torch

from kdlib.backends.sglang.options import SGLangEngineConfig
from kdlib.config.models import ModelConfig, Precision
from kdlib.errors import ModelError

log = logging.getLogger(__name__)

# SGLang releases whose Engine API, ServerArgs and output layout kdlib was checked against.
SUPPORTED_VERSIONS = ("0.5.23",)

_DTYPES = {Precision.bfloat16: "bfloat16", Precision.float32: "float32"}


def installed_version() -> Optional[str]:
    """The installed sglang distribution's version, read from its metadata (no import)."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_version() -> str:
    """The installed version, or a ModelError when it is missing or not supported."""
    version = installed_version()
    supported = ", ".join(SUPPORTED_VERSIONS)
    if version is None:
        raise ModelError(f"the SGLang backends need sglang ({supported}): pip install 'kdlib[sglang]'")
    if version not in SUPPORTED_VERSIONS:
        raise ModelError(
            f"sglang {version} is installed; kdlib supports sglang {supported} (its Engine API and "
            "output layout change between releases): install one of those, or check the new release "
            "with tests/unit/test_sglang_contract.py and add it to kdlib.backends.sglang.engine.SUPPORTED_VERSIONS"
        )
    return version


def server_args(
    options: SGLangEngineConfig, model: ModelConfig, *, model_path: str, device: torch.device, **protocol: Any,
) -> dict[str, Any]:
    """ServerArgs for one engine: the user's ``options.server_args``, then the model, the typed
    ``options`` and kdlib's ``protocol`` fields (composition refuses user fields that clash)."""
    args: dict[str, Any] = dict(options.server_args)
    args.update({
        "model_path": model_path,
        "dtype": _DTYPES[Precision(model.dtype)],
        "trust_remote_code": model.trust_remote_code,
        "tp_size": options.tp_size,
        "device": device.type,
        # the engine's sampling stream (rollout.sglang.deterministic seeds every request instead)
        "random_seed": 0,
        "log_level": options.log_level,
        # kdlib sends token ids and reads token ids: no tokenizer or detokenizer process
        "skip_tokenizer_init": True,
    })
    if device.index is not None:
        args["base_gpu_id"] = device.index
    if model.revision is not None:
        args["revision"] = model.revision
    for name in ("mem_fraction_static", "quantization", "attention_backend", "context_length"):
        if getattr(options, name) is not None:
            args[name] = getattr(options, name)
    args.update(protocol)
    return args


def start_engine(**args: Any) -> Any:
    """``sglang.Engine(**args)`` after the version check: the one place SGLang is imported."""
    version = check_version()
    import sglang

    log.info("starting SGLang %s engine", version)
    return sglang.Engine(**args)


class SGLangEngine:
    """One running ``sglang.Engine`` and the calls kdlib makes on it (``what`` names it in errors)."""

    # What starts an engine from its ServerArgs fields (tests put their engine double here).
    factory: Callable[..., Any] = staticmethod(start_engine)

    def __init__(self, args: dict[str, Any], what: str) -> None:
        self.what = what
        self._engine = type(self).factory(**args)

    def generate(self, input_ids: list[list[int]], sampling_params: dict | list[dict], **request: Any) -> list[dict]:
        """One output dict per prompt, in order; an aborted request is an error."""
        outputs = self._engine.generate(input_ids=input_ids, sampling_params=sampling_params, **request)
        if len(outputs) != len(input_ids):
            raise ModelError(f"{self.what}: SGLang returned {len(outputs)} outputs for {len(input_ids)} prompts")
        for index, output in enumerate(outputs):
            reason = output["meta_info"].get("finish_reason") or {}
            if reason.get("type") == "abort":
                raise ModelError(f"{self.what}: SGLang aborted request {index}: {reason.get('message')}")
        return outputs

    def release(self, tags: Sequence[str]) -> None:
        self._engine.release_memory_occupation(tags=list(tags))

    def resume(self, tags: Sequence[str]) -> None:
        self._engine.resume_memory_occupation(tags=list(tags))

    def flush_cache(self) -> None:
        result = self._engine.flush_cache()
        if not getattr(result, "success", True):
            raise ModelError(f"{self.what}: SGLang refused to flush its cache: {getattr(result, 'message', '')}")

    def begin_weight_update(self) -> None:
        self._checked("begin_weight_update", self._engine.begin_weight_update())

    def end_weight_update(self) -> None:
        self._checked("end_weight_update", self._engine.end_weight_update())

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load named tensors; the cache is flushed once after the whole update, not per bucket."""
        result = self._engine.update_weights_from_tensor(named_tensors=named_tensors, flush_cache=False)
        self._checked("update_weights_from_tensor", result)

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> None:
        result = self._engine.init_weights_update_group(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend,
        )
        self._checked("init_weights_update_group", result)

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str
    ) -> None:
        result = self._engine.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=False,
        )
        self._checked("update_weights_from_distributed", result)

    def shutdown(self) -> None:
        self._engine.shutdown()

    def _checked(self, call: str, result: Any) -> None:
        success, message = result if isinstance(result, tuple) else (True, "")
        if not success:
            raise ModelError(f"{self.what}: SGLang {call} failed: {message}")
