"""transformers rollout backend: a copy of the model sampling batches of left-padded prompts.

``rollout.engine`` chooses how a batch is decoded: plain ``model.generate`` (the reference), or
kdlib's :class:`~kdlib.backends.hf.decode.engine.DecodeEngine` (static KV cache kept across calls, a lean
decode loop, optionally compiled), which runs generate's own preparation and samples the same
tokens from the same seed. The engine is built on first use and kept for the life of the backend,
so its caches and compiled graphs survive from one on-policy step to the next; weight syncs copy
into the model's parameters in place, which the engine reads on its next call (a ``frozen`` engine,
whose compiled step reads packed copies of the weights, packs them again). A model the engine
cannot serve (its checks fail) falls back to plain generate, with the reason logged once.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kdlib.backends.base import Generation, RolloutBackend
from kdlib.backends.hf.decode.engine import EngineUnsupported, build_engine, token_logprobs
from kdlib.backends.hf.options import HFRolloutConfig, RolloutEngine, RolloutSampler
from kdlib.config.models import ModelConfig
from kdlib.config.rollout import RolloutConfig
from kdlib.models.student import build_model

log = logging.getLogger(__name__)


class HFRolloutBackend(RolloutBackend):
    cfg: HFRolloutConfig

    def __init__(self, model: ModelConfig, device: torch.device, cfg: HFRolloutConfig) -> None:
        super().__init__(model, device, cfg)
        self.model = build_model(model, device)
        self.model.eval()
        self.model.requires_grad_(False)
        self._engines: dict[RolloutEngine, Optional[object]] = {}  # None: fell back to generate
        self._reserved = 0  # positions the calls will need (see reserve)

    def engine(self, choice: RolloutEngine):
        """The :class:`DecodeEngine` for ``choice`` (built once, then kept), or None for generate."""
        choice = RolloutEngine(choice)
        kind = RolloutEngine.static if choice == RolloutEngine.auto else choice
        if kind == RolloutEngine.generate:
            return None
        if kind not in self._engines:
            try:
                self._engines[kind] = build_engine(self.model, compile=kind == RolloutEngine.compiled,
                                                   freeze=kind == RolloutEngine.frozen)
            except EngineUnsupported as exc:
                log.info("rollout.engine=%s: %s; decoding with plain generate (the same distribution)",
                         kind.value, exc)
                self._engines[kind] = None
            else:
                self._engines[kind].reserve(self._reserved)
        return self._engines[kind]

    def reserve(self, length: int) -> None:
        self._reserved = max(self._reserved, length)
        for engine in self._built_engines():
            engine.reserve(self._reserved)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        super().load_weights(state)
        for engine in self._built_engines():
            engine.weights_changed()

    def _built_engines(self) -> list:
        """The engines built so far (not those that fell back to generate)."""
        return [engine for engine in self._engines.values() if engine is not None]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, stop_ids: set[int], pad_id: int, seed: int,
                 logprobs: bool = False) -> list[list[Generation]]:
        cfg = self.cfg
        kwargs = generate_kwargs(cfg, stop_ids=stop_ids, pad_id=pad_id)
        out: list[list[Generation]] = [[] for _ in prompts]
        repeated = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.n_samples_per_prompt)]
        torch.manual_seed(seed)
        for start in range(0, len(repeated), cfg.batch_size):
            chunk = repeated[start : start + cfg.batch_size]
            ids, attention = left_pad([p for _, p in chunk], pad_id)
            sequences, scores = self._decode_batch(ids.to(self.device), attention.to(self.device), cfg, kwargs, logprobs)
            new_tokens = sequences[:, ids.shape[1]:].tolist()
            for row, ((prompt_index, _), tokens) in enumerate(zip(chunk, new_tokens)):
                out[prompt_index].append(until_stop(tokens, stop_ids, None if scores is None else scores[row].tolist()))
        return out

    def _decode_batch(self, ids: torch.Tensor, attention: torch.Tensor, cfg: HFRolloutConfig, kwargs: dict,
                      logprobs: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """generate's ``sequences`` for one left-padded batch, on the configured engine, and with
        ``logprobs`` the [batch, generated] log-probabilities of the drawn tokens."""
        engine = self.engine(cfg.engine)
        if engine is not None:
            try:
                decoded = engine.decode(ids, attention, sampler=RolloutSampler(cfg.sampler).value,
                                        record_logprobs=logprobs, **kwargs)
                return decoded.sequences, decoded.logprobs
            except EngineUnsupported as exc:  # raised before anything is drawn
                log.info("rollout.engine=%s: %s; decoding with plain generate (the same distribution)",
                         RolloutEngine(cfg.engine).value, exc)
                self._engines = dict.fromkeys(self._engines)
        return generate_with_logprobs(self.model, ids, attention, kwargs, logprobs, cfg.temperature)


def generate_kwargs(cfg: RolloutConfig, *, stop_ids: set[int], pad_id: int) -> dict:
    """``model.generate`` arguments for ``cfg``: sampling with temperature and top_p (no top-k), or
    greedy when the temperature is 0; every engine decodes with exactly these."""
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        if cfg.temperature > 0
        else {"do_sample": False}
    )
    return {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": sorted(stop_ids), "pad_token_id": pad_id, **sampling}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``prompts``, padded on the left to the longest."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[row, length - len(prompt):] = 1
    return ids, attention


def generate_with_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, kwargs: dict, logprobs: bool,
                           temperature: float, **extra) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain ``model.generate``'s sequences and, with ``logprobs``, each drawn token's log-probability
    from generate's own raw logits (``output_logits``; they are kept for every step of the batch,
    steps x batch x vocabulary floats, which the decode engine avoids)."""
    if not logprobs:
        return model.generate(input_ids=ids, attention_mask=attention, **extra, **kwargs), None
    out = model.generate(input_ids=ids, attention_mask=attention, output_logits=True, return_dict_in_generate=True,
                         **extra, **kwargs)
    drawn = out.sequences[:, ids.shape[1]:]
    scale = temperature if kwargs.get("do_sample") else 1.0
    return out.sequences, torch.stack([token_logprobs(step, drawn[:, t], scale) for t, step in enumerate(out.logits)], 1)


def until_stop(tokens: list[int], stop_ids: set[int], logprobs: Optional[list[float]] = None) -> Generation:
    """The response through its first stop token (kept), or all of it, cut by max_new_tokens
    (and its tokens' log-probabilities, cut the same way)."""
    end = next((i + 1 for i, token in enumerate(tokens) if token in stop_ids), None)
    kept = tokens if end is None else tokens[:end]
    return Generation(kept, "length" if end is None else "stop", None if logprobs is None else logprobs[: len(kept)])
