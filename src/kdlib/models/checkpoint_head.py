"""The teacher's LM head read from its checkpoint files, without building the model.

When the teacher model lives elsewhere (an inference engine in its own processes owns it) or is not needed at all (every
teacher output comes from the cache), the students still need the teacher's head to turn hidden
states into logits. Here the architecture is instantiated on the ``meta`` device (no memory, no
weights) only to learn which parameter is the output embedding, under which names it may be saved
(a tied head is stored as the input embedding), and the logit scale / soft-cap its config applies;
then that one tensor is read from the safetensors shard that holds it. A vision-language checkpoint
is instantiated as one (its head is the language model's). The result equals
``lm_head_of(the loaded model)`` bit for bit in the same dtype (a test checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from kdlib.config.schema import ModelConfig
from kdlib.errors import ModelError
from kdlib.models.head import LMHead, lm_head_of
from kdlib.models.loading import model_location, torch_dtype

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def load_lm_head(cfg: ModelConfig, *, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> LMHead:
    """``cfg``'s head in ``dtype`` (default: the config's dtype) on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from kdlib.models.vlm import is_vision_language

    location = model_location(cfg.model)
    try:
        config = AutoConfig.from_pretrained(location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        auto_class = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = auto_class.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the architecture of {cfg.model!r}: {str(exc).splitlines()[0]}") from None
    head = lm_head_of(skeleton)
    names = _names_of(skeleton, head.weight)
    bias_names = _names_of(skeleton, head.bias) if head.bias is not None else []
    dtype = dtype or torch_dtype(cfg.dtype)
    weight = _read_tensor(location, cfg, names).to(device=device, dtype=dtype)
    bias = _read_tensor(location, cfg, bias_names).to(device=device, dtype=dtype) if bias_names else None
    return LMHead(weight=weight, bias=bias, logit_scale=head.logit_scale, softcap=head.softcap)


def _names_of(model: torch.nn.Module, tensor: torch.Tensor) -> list[str]:
    """Every name under which ``tensor`` is a parameter of ``model`` (tied weights have several)."""
    return [name for name, param in model.named_parameters(remove_duplicate=False) if param is tensor]


def _read_tensor(location: str, cfg: ModelConfig, names: list[str]) -> torch.Tensor:
    from safetensors import safe_open

    shards = _shard_of_each_tensor(location, cfg)
    for name in names:
        if name in shards:
            with safe_open(_local_file(location, cfg, shards[name]), framework="pt") as handle:
                return handle.get_tensor(name)
    raise ModelError(f"{cfg.model!r}: none of {names} is in its safetensors files; cannot read its LM head")


def _shard_of_each_tensor(location: str, cfg: ModelConfig) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index (sharded) or the single file."""
    from safetensors import safe_open

    try:
        index = _local_file(location, cfg, _INDEX)
    except ModelError:
        with safe_open(_local_file(location, cfg, _SINGLE), framework="pt") as handle:
            return {key: _SINGLE for key in handle.keys()}
    return dict(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"])


def _local_file(location: str, cfg: ModelConfig, filename: str) -> str:
    """A file of a local checkpoint directory, or of a hub checkpoint (fetched into the HF cache)."""
    if Path(location).is_dir():
        path = Path(location) / filename
        if not path.is_file():
            raise ModelError(f"{location}: no {filename}")
        return str(path)
    from transformers.utils import cached_file

    try:
        found = cached_file(location, filename, revision=cfg.revision, _raise_exceptions_for_missing_entries=False)
    except OSError as exc:
        raise ModelError(f"{cfg.model!r}: cannot fetch {filename}: {str(exc).splitlines()[0]}") from None
    if found is None:
        raise ModelError(f"{cfg.model!r}: no {filename}")
    return found
