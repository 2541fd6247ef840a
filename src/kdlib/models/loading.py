"""Loading models and tokenizers from a hub id, a local directory, a GGUF file or a package.

GGUF files (the embedded SmolLM2 teacher ships as one) are dequantised by transformers once, saved
as safetensors in kdlib's cache and loaded from there afterwards (tens of seconds the first
time, under a second later). A file lock keeps two processes (a sweep, Ray workers) from converting the
same file at once. Model dtype, attention implementation and chat-template overrides come from the
model's :class:`~kdlib.config.ModelConfig`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch

from kdlib.config.schema import ModelConfig, Precision
from kdlib.errors import ModelError, first_line
from kdlib.locations import cache_dir, looks_like_path, resolve_location
from kdlib.models import packed_attention

log = logging.getLogger(__name__)

DTYPES = {Precision.float32: torch.float32, Precision.bfloat16: torch.bfloat16}


def torch_dtype(precision: Precision) -> torch.dtype:
    return DTYPES[Precision(precision)]


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def model_location(spec: str) -> str:
    """A directory or hub id transformers can load; GGUF files are converted (once) first."""
    try:
        location = resolve_location(spec)
    except FileNotFoundError as exc:
        raise ModelError(str(exc)) from None
    if location.endswith(".gguf"):
        if not Path(location).is_file():
            raise ModelError(f"GGUF file not found: {location}")
        return str(converted_gguf(Path(location)))
    if not Path(location).exists() and looks_like_path(spec):
        raise ModelError(f"model directory not found: {location}")
    return location


def converted_gguf(path: Path) -> Path:
    """The safetensors copy of a GGUF checkpoint in the cache, made on first use."""
    from filelock import FileLock

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    done = target / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if done.exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdlib.progress import phase

        log.info("converting %s to safetensors once (cached in %s)", path.name, target)
        with phase(f"converting {path.name}"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
            except (ImportError, ValueError) as exc:  # missing gguf/accelerate, unsupported architecture
                raise ModelError(f"cannot load {path.name}: {first_line(exc)} (install kdlib[gguf])") from None
            # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are
            # already dequantised, so drop it.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            done.touch()
    return target


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with the config's chat template and a pad token."""
    from transformers import AutoTokenizer

    location = model_location(cfg.tokenizer or cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer {cfg.tokenizer or cfg.model!r}: {first_line(exc)}") from None
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_text(spec: str) -> str:
    """A ``chat_template`` option's Jinja text: inline text, or the contents of the file it names."""
    if "{" not in spec and Path(resolve_location(spec)).is_file():
        return Path(resolve_location(spec)).read_text(encoding="utf-8")
    return spec


def load_causal_lm(
    cfg: ModelConfig, *, device: torch.device, location: Optional[str] = None
):
    """A transformers causal LM in the configured dtype on ``device``."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, cfg, device=device, location=location)


def load_pretrained(auto_class, cfg: ModelConfig, *, device: torch.device, location: Optional[str] = None, what: str = "model"):
    """``auto_class.from_pretrained`` with the config's revision, dtype, attention implementation
    and remote-code setting, on ``device``; a load failure is a one-line ModelError."""
    location = location or model_location(cfg.model)
    if cfg.attn_implementation == packed_attention.NAME:
        packed_attention.register()
    try:
        model = auto_class.from_pretrained(
            location,
            revision=cfg.revision,
            dtype=torch_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {what} {cfg.model!r}: {first_line(exc)}") from None
    return model.to(device)
