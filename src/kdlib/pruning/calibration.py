"""Calibration: a seeded slice of training tokens, and one recorded forward pass over it.

Every importance score of :mod:`kdlib.pruning.importance` is a statistic of the source model's
activations on a few thousand calibration tokens. This module picks those tokens (whole samples,
drawn under a seed, the last one cut to the requested count) and runs the model over them once with
hooks that accumulate what the scores need, so that no score costs a forward pass of its own: the
residual stream entering every layer (for block influence and angular distances), each attention
head's and MLP channel's contribution to the residual stream, and the normalised activations per
hidden channel. Samples run one at a time (batch 1, no padding, so no mask bookkeeping in the
statistics); the layer inputs of the first rows, up to ``kl_tokens`` tokens, are kept for the
layer-KL scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from kdlib.errors import ConfigError
from kdlib.models.head import decoder_of


def select_calibration(samples: Sequence[Sequence[int]], n_tokens: int, seed: int) -> list[torch.Tensor]:
    """Token id rows for calibration: whole samples in a seeded order until ``n_tokens`` tokens,
    the last one cut so the total is exactly ``n_tokens`` (or all tokens when there are fewer)."""
    if n_tokens < 2:
        raise ConfigError(f"prune.calibration_tokens must be at least 2, got {n_tokens}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows, total = [], 0
    for index in order:
        ids = list(samples[index])[: n_tokens - total]
        if len(ids) < 2:
            continue
        rows.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= n_tokens:
            break
    if not rows:
        raise ConfigError("pruning needs calibration samples of at least 2 tokens; none were given")
    return rows


@dataclass
class TextModel:
    """The parts of a causal LM (or of a VLM's language model) that pruning reads and changes."""

    model: nn.Module
    decoder: nn.Module
    layers: nn.ModuleList
    config: object  # the text config (num_hidden_layers, hidden_size, ...)

    @classmethod
    def of(cls, model: nn.Module) -> "TextModel":
        decoder = decoder_of(model)
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__}: pruning needs a decoder with a `layers` list")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(model=model, decoder=decoder, layers=layers, config=config)

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def hidden_norms(self, layer: nn.Module) -> list[nn.Module]:
        """The RMSNorm/LayerNorm modules of ``layer`` that act on the residual stream's channels."""
        size = self.config.hidden_size
        return [
            module for name, module in layer.named_children()
            if name.endswith("norm") and getattr(module, "weight", None) is not None and module.weight.shape == (size,)
        ]


@dataclass
class Recording:
    """Sums over calibration tokens from one forward pass of the source model (float64)."""

    n_tokens: int
    # [L+1, L+1] sum over tokens of cos(x_i, x_j) between the residual stream entering layer i and
    # layer j (index L: the last layer's output, before the final norm).
    cos_sum: torch.Tensor
    # [L+1, L+1] sum over tokens of the angular distance arccos(cos)/pi.
    angle_sum: torch.Tensor
    # [L, heads] sum over tokens of ||head's contribution to the residual stream||^2.
    head_sq: torch.Tensor
    # [L, intermediate] sum over tokens of the MLP channel's activation^2 (input of down_proj).
    channel_sq: torch.Tensor
    # [L, hidden] sum over tokens, over the layer's norms, of the normalised activation^2.
    hidden_sq: torch.Tensor
    # [hidden] the same for the final norm.
    final_hidden_sq: torch.Tensor
    # Layer inputs of the first rows (about kl_tokens tokens): per row, a list of L+1 tensors [1, t, hidden]
    # (index L: the last layer's output); and the decoder layers' output type (tuple or tensor).
    layer_inputs: list[list[torch.Tensor]] = field(default_factory=list)
    kl_rows: list[torch.Tensor] = field(default_factory=list)
    returns_tuple: bool = False


@torch.no_grad()
def record(model: nn.Module, rows: Sequence[torch.Tensor], kl_tokens: int = 0) -> Recording:
    """Run ``model`` over ``rows`` (one at a time) and return the sums the scores need."""
    text = TextModel.of(model)
    n_layers, heads, hd = len(text.layers), text.config.num_attention_heads, text.head_dim
    hidden, inter = text.config.hidden_size, _intermediate_size(text)
    f64 = dict(dtype=torch.float64)
    rec = Recording(
        n_tokens=0,
        cos_sum=torch.zeros(n_layers + 1, n_layers + 1, **f64),
        angle_sum=torch.zeros(n_layers + 1, n_layers + 1, **f64),
        head_sq=torch.zeros(n_layers, heads, **f64),
        channel_sq=torch.zeros(n_layers, inter, **f64),
        hidden_sq=torch.zeros(n_layers, hidden, **f64),
        final_hidden_sq=torch.zeros(hidden, **f64),
    )
    states: list[Optional[torch.Tensor]] = [None] * (n_layers + 1)
    handles = []

    def on_layer(index):
        def hook(module, args, kwargs, output):
            states[index] = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            rec.returns_tuple = isinstance(output, tuple)
            if index == n_layers - 1:
                states[n_layers] = out
        return hook

    def on_o_proj(index, weight):
        per_head = weight.detach().double().view(hidden, heads, hd)  # o_proj: [hidden, heads * hd]

        def hook(module, args):
            x = args[0].double().reshape(-1, heads, hd)
            contribution = torch.einsum("tnd,cnd->tnc", x, per_head)
            rec.head_sq[index] += contribution.pow(2).sum(dim=(0, 2))
        return hook

    def on_down_proj(index):
        def hook(module, args):
            rec.channel_sq[index] += args[0].double().reshape(-1, inter).pow(2).sum(0)
        return hook

    def on_norm(target):
        def hook(module, args, output):
            target.add_(output.double().reshape(-1, hidden).pow(2).sum(0))
        return hook

    try:
        for index, layer in enumerate(text.layers):
            handles.append(layer.register_forward_hook(on_layer(index), with_kwargs=True))
            attention, mlp = attention_of(layer), mlp_of(layer)
            handles.append(attention.o_proj.register_forward_pre_hook(on_o_proj(index, attention.o_proj.weight)))
            handles.append(mlp.down_proj.register_forward_pre_hook(on_down_proj(index)))
            for norm in text.hidden_norms(layer):
                handles.append(norm.register_forward_hook(on_norm(rec.hidden_sq[index])))
        final_norm = getattr(text.decoder, "norm", None)
        if final_norm is not None:
            handles.append(final_norm.register_forward_hook(on_norm(rec.final_hidden_sq)))
        kl_left = kl_tokens
        for ids in rows:
            model(input_ids=ids[None].to(_device(model)), use_cache=False)
            stacked = torch.stack([s[0].double() for s in states])  # [L+1, t, hidden]
            unit = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = torch.einsum("itc,jtc->ijt", unit, unit).clamp(-1.0, 1.0)
            rec.cos_sum += cos.sum(-1)
            rec.angle_sum += (torch.arccos(cos) / torch.pi).sum(-1)
            rec.n_tokens += ids.numel()
            if kl_left > 0:  # whole rows, the first one always, until kl_tokens are reached
                rec.kl_rows.append(ids)
                rec.layer_inputs.append([s.detach().clone() for s in states])
                kl_left -= ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return rec


def _intermediate_size(text: TextModel) -> int:
    return mlp_of(text.layers[0]).down_proj.weight.shape[1]


def attention_of(layer: nn.Module) -> nn.Module:
    attention = getattr(layer, "self_attn", None)
    if attention is None or not all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise ConfigError(f"{type(layer).__name__}: width pruning needs attention with q/k/v/o projections")
    return attention


def mlp_of(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise ConfigError(f"{type(layer).__name__}: width pruning needs a gated MLP (gate/up/down projections)")
    return mlp


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
