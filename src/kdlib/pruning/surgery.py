"""Building the pruned model: a fresh Hugging Face model of the source's class from a config with
smaller sizes, filled with the kept slices of the source's weights.

Building from a config (instead of editing modules in place) means the result is exactly what
``from_pretrained`` makes of the saved checkpoint: every size cached on a module (heads per KV
group, head_dim, rotary tables, masks per layer type) comes from the config. Weights move by name:

=========================================  ====================================
parameter (in a kept decoder layer)         rows / columns kept
=========================================  ====================================
``self_attn.q_proj``                        query heads' rows / hidden
``self_attn.k_proj``, ``v_proj``            KV heads' rows / hidden
``self_attn.o_proj``                        hidden / query heads' columns
``self_attn.q_norm``, ``k_norm`` (Qwen3)    unchanged (head_dim is kept)
``mlp.gate_proj``, ``up_proj``              channels / hidden
``mlp.down_proj``                           hidden / channels
``*norm`` on the residual stream            hidden
``embed_tokens``, ``lm_head``, final norm   hidden columns (tied weights stay tied)
=========================================  ====================================

Anything else keeps its shape; a parameter whose shape would have to change without a rule here
(a VLM's projector into a narrower language model) is a one-line :class:`ConfigError`. Gemma 3
scales its embeddings by ``sqrt(hidden_size)``, so its hidden size is not pruned either.
RMSNorm over fewer hidden channels normalises by their own mean square, which is why hidden
pruning is not exact (Minitron accepts this and lets distillation repair it).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from kdlib.errors import ConfigError
from kdlib.pruning.calibration import TextModel
from kdlib.pruning.config import PrunePlan, Sizes

_NO_HIDDEN_PRUNING = {"gemma3_text": "it scales embeddings by sqrt(hidden_size)", "gemma2": "it scales embeddings by sqrt(hidden_size)"}


def sizes_of(config) -> Sizes:
    """The prunable sizes of a (text) model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Sizes(
        num_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        hidden_size=text.hidden_size,
    )


def pruned_config(config, target: Sizes, layers: Optional[list[int]] = None):
    """A copy of ``config`` with ``target`` sizes (head_dim fixed to the source's); ``layers``
    slices per-layer lists (``layer_types``)."""
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    source = sizes_of(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if target.hidden_size != source.hidden_size:
        reason = _NO_HIDDEN_PRUNING.get(text.model_type)
        if reason is None and text is not config:
            reason = "its vision projector writes the language model's hidden size"
        if reason is not None:
            raise ConfigError(
                f"cannot prune the hidden size of {config.model_type} ({reason}); prune layers, heads or MLP channels"
            )
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and layers is not None and len(layer_types) == source.num_layers:
        text.layer_types = [layer_types[i] for i in layers]
    text.num_hidden_layers = target.num_layers
    text.num_attention_heads = target.num_attention_heads
    text.num_key_value_heads = target.num_key_value_heads
    text.intermediate_size = target.intermediate_size
    text.hidden_size = target.hidden_size
    text.head_dim = head_dim
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except Exception as exc:  # transformers' strict-dataclass errors say what the family needs
            raise ConfigError(f"cannot prune {config.model_type} to {target}: {_last_line(exc)}") from None
    return config


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def build_pruned(model: nn.Module, plan: PrunePlan, target: Sizes) -> nn.Module:
    """A new model of ``model``'s class with ``target`` sizes holding ``plan``'s slices of its weights."""
    text = TextModel.of(model)
    source = sizes_of(text.config)
    config = pruned_config(model.config, target, plan.layers)
    pruned = type(model)._from_config(config, dtype=model.dtype)
    prefix = _prefix_of(model, text.decoder)
    head_dim = text.head_dim
    hidden = torch.tensor(plan.hidden)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(prefix + "layers."):
            index, rest = key[len(prefix) + len("layers."):].split(".", 1)
            if int(index) not in plan.layers:
                continue
            position = plan.layers.index(int(index))
            rows = _LayerRows(plan, position, head_dim, hidden)
            state[f"{prefix}layers.{position}.{rest}"] = rows.slice(rest, tensor, source.hidden_size)
        elif key.startswith(prefix) and key[len(prefix):] in ("embed_tokens.weight", "norm.weight", "norm.bias"):
            state[key] = tensor.index_select(tensor.dim() - 1, hidden)
        elif key == "lm_head.weight" or key.endswith(".lm_head.weight"):
            state[key] = tensor.index_select(1, hidden)
        else:
            state[key] = tensor
    expected = pruned.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise ConfigError(
                f"cannot prune {type(model).__name__}: no rule for {key} {tuple(tensor.shape)} -> {tuple(expected[key].shape)}"
            )
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(pruned)]:
        raise ConfigError(f"cannot prune {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.train(model.training)


class _LayerRows:
    """Index tensors of one kept layer, and the rule that slices each of its parameters."""

    def __init__(self, plan: PrunePlan, position: int, head_dim: int, hidden: torch.Tensor) -> None:
        self.q = _head_rows(plan.heads[position], head_dim)
        self.kv = _head_rows(plan.kv_heads[position], head_dim)
        self.channels = torch.tensor(plan.channels[position])
        self.hidden = hidden

    def slice(self, name: str, tensor: torch.Tensor, hidden_size: int) -> torch.Tensor:
        module, kind = name.rsplit(".", 1)
        rules = {
            "self_attn.q_proj": (self.q, self.hidden),
            "self_attn.k_proj": (self.kv, self.hidden),
            "self_attn.v_proj": (self.kv, self.hidden),
            "self_attn.o_proj": (self.hidden, self.q),
            "mlp.gate_proj": (self.channels, self.hidden),
            "mlp.up_proj": (self.channels, self.hidden),
            "mlp.down_proj": (self.hidden, self.channels),
        }
        if module in rules:
            rows, cols = rules[module]
            tensor = tensor.index_select(0, rows)
            return tensor.index_select(1, cols) if kind == "weight" else tensor
        if module.endswith("norm") and not module.startswith("self_attn.") and tensor.shape == (hidden_size,):
            return tensor.index_select(0, self.hidden)
        return tensor


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _prefix_of(model: nn.Module, decoder: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is decoder:
            return f"{name}." if name else ""
    raise ConfigError(f"cannot find the decoder inside {type(model).__name__}")


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys a tied model may leave out of a state dict (the output head when tied)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())
