"""Importance scores of a model's layers, attention heads, MLP channels and hidden channels.

One recorded forward pass (:mod:`kdlib.pruning.calibration`) gives every activation score; the KL
scores (:mod:`kdlib.pruning.layer_kl`) add partial forward passes. With ``x_l`` the residual stream
entering layer ``l`` and means over calibration tokens:

- block influence (ShortGPT, Men et al. 2024): ``BI_l = 1 - mean cos(x_l, x_{l+1})``;
- angular distance of a span of ``n`` layers (Gromov et al. 2024): ``d(l, n) = mean arccos(cos(x_l,
  x_{l+n})) / pi``;
- drop-one KL: ``KL(p_source || p_source without layer l)`` per token;
- a head's score is the root mean square of its contribution to the residual stream,
  ``||W_o[:, h] attn_h(x)||``; a KV group's is the sum over its query heads;
- an MLP channel's, ``rms(a_j) * ||W_down[:, j]||`` with ``a_j`` its gated activation;
- a hidden channel's (Minitron, Muralidharan et al. 2024), the sum over the normalisation layers
  (attention and MLP input norms of each kept layer, final norm) of the rms of the channel's
  normalised activation.

Heads and channels are scored by what they add to the residual stream rather than by their raw
activation (Minitron's choice), so a unit whose output weights are small is not kept for a large
activation it barely passes on. Scores are plain lists, saved as JSON by :mod:`kdlib.pruning.report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from kdlib.pruning import layer_kl
from kdlib.pruning.calibration import Recording, TextModel, attention_of, mlp_of, record
from kdlib.pruning.config import DepthMethod, PruneConfig


@dataclass
class Scores:
    """Importance of every prunable unit of a source model (higher = more important, except the
    distances and KLs of dropping, where lower = safer to drop)."""

    n_tokens: int
    # [L] 1 - mean cos(x_l, x_{l+1}).
    block_influence: list[float]
    # {n: [d(l, n) for l in 0..L-n]}, angular distance of the span of n layers starting at l.
    angular: dict[int, list[float]]
    # [L] KL(source || source without layer l) per token; None when not computed.
    layer_kl: Optional[list[float]]
    # Greedy KL search: layers dropped in order, and the KL after each drop.
    greedy_dropped: Optional[list[int]]
    greedy_kl: Optional[list[float]]
    # [L][heads], [L][kv heads], [L][intermediate]: per layer.
    heads: list[list[float]]
    kv_heads: list[list[float]]
    channels: list[list[float]]
    # [L][hidden] per layer (its norms), and [hidden] for the final norm.
    hidden_per_layer: list[list[float]]
    hidden_final: list[float]
    # Wall-clock and process-CPU seconds per part.
    seconds: dict[str, float] = field(default_factory=dict)

    def hidden(self, layers: Sequence[int]) -> torch.Tensor:
        """Hidden-channel scores summed over ``layers``' norms and the final norm."""
        per_layer = torch.tensor(self.hidden_per_layer, dtype=torch.float64)
        return per_layer[list(layers)].sum(0) + torch.tensor(self.hidden_final, dtype=torch.float64)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["angular"] = {str(n): d for n, d in self.angular.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Scores":
        data = dict(data)
        data["angular"] = {int(n): d for n, d in data["angular"].items()}
        return cls(**data)


class _Timer:
    """Wall-clock and CPU seconds of named parts (CPU time: less sensitive to a busy machine)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def part(self, name: str):
        timer = self

        class _Part:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.seconds[f"{name}_wall"] = round(time.perf_counter() - self.wall, 3)
                timer.seconds[f"{name}_cpu"] = round(time.process_time() - self.cpu, 3)

        return _Part()


@torch.no_grad()
def compute_scores(model: nn.Module, rows: Sequence[torch.Tensor], cfg: PruneConfig, *, n_drop: int = 0) -> Scores:
    """Every score of ``model`` on calibration ``rows``; the KL scores when ``cfg`` asks for them
    (``layer_kl_scores``, or a KL depth method), the greedy search down ``n_drop`` layers when
    ``cfg.depth`` is greedy_kl."""
    was_training = model.training
    model.eval()
    timer = _Timer()
    text = TextModel.of(model)
    need_kl = cfg.layer_kl_scores or cfg.depth in (DepthMethod.layer_kl, DepthMethod.greedy_kl)
    try:
        with timer.part("activations"):
            rec = record(model, rows, kl_tokens=cfg.kl_tokens if need_kl else 0)
        scores = _activation_scores(text, rec, cfg)
        if need_kl:
            with timer.part("layer_kl"):
                reference = layer_kl.reference_log_probs(text, rec.kl_rows)
                scores.layer_kl = layer_kl.drop_one_kl(text, rec, reference)
            if cfg.depth == DepthMethod.greedy_kl and n_drop > 0:
                with timer.part("greedy_kl"):
                    scores.greedy_dropped, scores.greedy_kl = layer_kl.greedy_kl(
                        text, rec, reference, n_drop, pool=GREEDY_POOL, first=scores.layer_kl
                    )
    finally:
        model.train(was_training)
    scores.seconds = timer.seconds
    return scores


# Candidates tried per greedy step: the remaining layers of lowest drop-one KL. Trying every layer
# would cost about L/pool times more; the pooled search was not compared with it (docs/pruning.md).
GREEDY_POOL = 8


def _activation_scores(text: TextModel, rec: Recording, cfg: PruneConfig) -> Scores:
    n = max(rec.n_tokens, 1)
    n_layers = len(text.layers)
    cos_mean, angle_mean = rec.cos_sum / n, rec.angle_sum / n
    spans = cfg.angular_spans or list(range(1, n_layers))
    angular = {s: [angle_mean[l, l + s].item() for l in range(n_layers - s + 1)] for s in spans if 1 <= s <= n_layers}
    heads = (rec.head_sq / n).sqrt()
    kv = attention_of(text.layers[0]).k_proj.weight.shape[0] // text.head_dim
    kv_heads = heads.view(n_layers, kv, -1).sum(-1)
    down_norms = torch.stack([mlp_of(layer).down_proj.weight.detach().double().norm(dim=0) for layer in text.layers])
    channels = (rec.channel_sq / n).sqrt() * down_norms
    return Scores(
        n_tokens=rec.n_tokens,
        block_influence=[1.0 - cos_mean[l, l + 1].item() for l in range(n_layers)],
        angular=angular,
        layer_kl=None,
        greedy_dropped=None,
        greedy_kl=None,
        heads=heads.tolist(),
        kv_heads=kv_heads.tolist(),
        channels=channels.tolist(),
        hidden_per_layer=(rec.hidden_sq / n).sqrt().tolist(),
        hidden_final=(rec.final_hidden_sq / n).sqrt().tolist(),
    )
