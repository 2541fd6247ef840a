"""Loading models and tokenizers from a hub id, a local directory, a GGUF file or a package.

GGUF files (the embedded SmolLM2 teacher ships as one) are dequantised by transformers once, saved
as safetensors in kdlib's cache and loaded from there afterwards (tens of seconds the first
time, under a second later). A file lock keeps two processes (a sweep, Ray workers) from converting the
same file at once. Model dtype, attention implementation and chat-template overrides come from the
model's :class:`~kdlib.config.ModelConfig`.

Files that cannot be used fail in one line naming the file: the safetensors headers and shard index
of a local model directory are read when its location is first resolved (with the tokenizer, before
any weights load), so a truncated download is reported in seconds; a damaged tokenizer file, GGUF
file or chat template file likewise.
"""

from __future__ import annotations

import functools
import hashlib
import json
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
    if Path(location).is_dir():
        check_weight_files(Path(location))
    return location


def check_weight_files(directory: Path) -> None:
    """The safetensors files of a model directory are whole (their headers parse and their sizes
    cover the tensors) and its shard index names files that exist; else a one-line ModelError."""
    for path in sorted(directory.glob("*.safetensors")):
        stat = path.stat()
        _check_safetensors(str(path), stat.st_size, stat.st_mtime_ns)
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a safetensors index ({first_line(exc)}); download it again") from None
        missing = sorted(name for name in shards if not (directory / str(name)).is_file())
        if missing:
            raise ModelError(f"{directory}: {missing[0]} is missing (listed in {index.name}); download it again")


@functools.lru_cache(maxsize=256)
def _check_safetensors(path: str, size: int, mtime_ns: int) -> None:
    """One file's header (remembered per path, size and modification time)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as exc:  # SafetensorError, or an OSError
        raise ModelError(f"{path} is incomplete or damaged ({first_line(exc)}); download or copy it again") from None


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
            except ImportError as exc:  # the gguf or accelerate package is missing
                raise ModelError(f"cannot load {path.name}: {first_line(exc)} (install kdlib[gguf])") from None
            except ValueError as exc:  # not a GGUF file, an architecture transformers cannot read
                raise ModelError(f"cannot load {path}: {first_line(exc)}") from None
            except Exception as exc:  # a truncated file fails anywhere inside the GGUF reader
                raise ModelError(f"cannot read {path}: {_type_name(exc)}: {first_line(exc)}; the file looks "
                                 "incomplete or damaged (download it again)") from None
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
    except Exception as exc:  # transformers and tokenizers raise anything on a damaged file
        raise ModelError(f"cannot load tokenizer {cfg.tokenizer or cfg.model!r}: {_tokenizer_problem(location, exc)}") from None
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    return type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"


_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "config.json", "chat_template.json")


def _tokenizer_problem(location: str, exc: Exception) -> str:
    """The cause of a failed tokenizer load, naming the file when one of its JSON files is broken."""
    directory = Path(location)
    for name in _TOKENIZER_JSON if directory.is_dir() else ():
        path = directory / name
        try:
            if path.is_file():
                json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as bad:
            return f"{path} is not valid JSON ({first_line(bad)}); the file is damaged or incomplete"
    if isinstance(exc, (OSError, ValueError)):
        return first_line(exc)
    return f"{_type_name(exc)}: {first_line(exc)} (a file of the tokenizer is not what transformers expects)"


def chat_template_text(spec: str) -> str:
    """A ``chat_template`` option's Jinja text: inline text, or the contents of the file it names."""
    path = Path(resolve_location(spec)) if "{" not in spec else None
    if path is not None and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object.count(b"\n", 0, exc.start) + 1
            raise ModelError(f"chat_template {path}, line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}: "
                             f"{exc.reason}); save the file as UTF-8") from None
        except OSError as exc:
            raise ModelError(f"chat_template {path}: cannot read it: {first_line(exc)}") from None
    if path is not None and (looks_like_path(spec) or path.suffix in (".jinja", ".j2", ".txt")):
        raise ModelError(f"chat_template file not found: {path} (an inline template holds '{{')")
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
    except Exception as exc:  # safetensors' own error for a file damaged after the header check
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelError(f"cannot load {what} {cfg.model!r}: {first_line(exc)}; a weight file of {location} "
                         "is damaged (download or copy it again)") from None
    return model.to(device)


def text_vocab_size(cfg: ModelConfig) -> int:
    """The vocabulary size (rows of the embedding and head) in the checkpoint's config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_location(cfg.model), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {cfg.model!r}: {first_line(exc)}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)
