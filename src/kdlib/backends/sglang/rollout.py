"""SGLang rollout backend: sampling on an SGLang Engine whose weights follow the student.

Sampling uses kdlib's rollout options as SGLang sampling parameters (``n_samples_per_prompt``
requests per prompt, in order; temperature 0 is SGLang's greedy; ``stop_token_ids`` = the
end-of-turn ids with ``no_stop_trim`` so the end token stays in the response, as with
``rollout=hf``). A response ends at its first end-of-turn token ("stop") or at
``max_new_tokens`` ("length"); an engine that also stops at its model's own EOS reports "stop".
All prompts of a call go to the engine at once (it batches itself; ``rollout.batch_size`` is the
hf backend's).

Weights arrive after every optimizer step, in buckets, through one SGLang weight-update session:
``begin_weight_update`` before the first bucket, ``update_weights_from_tensor`` (buckets through
kdlib's transport) or ``update_weights_from_distributed`` (an NCCL broadcast from student rank 0,
see :mod:`kdlib.backends.sglang.sync`) per bucket with ``flush_cache=False``, then, before the
next generation, ``end_weight_update`` and one ``flush_cache``: the KV/prefix cache was computed
with the old weights. With ``rollout.release_memory`` the engine frees its GPU memory
after each generation; the weights are released without a host copy, so the next generation is
refused unless a full set of weights was loaded after the release (the stale-weights bug that
sleep/wake cycles cause in other frameworks).

The engine loads the student's architecture from a checkpoint: a depth-pruned student is written
once (its initial weights) to kdlib's cache, since SGLang cannot prune at load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional

import torch

from kdlib.backends.base import Generation, RolloutBackend
from kdlib.backends.sglang.engine import SGLangEngine, server_args
from kdlib.backends.sglang.options import MEMORY_TAGS, SGLangRolloutConfig
from kdlib.backends.sglang.sync import BucketMeta
from kdlib.config.models import ModelConfig, StudentConfig
from kdlib.errors import ModelError
from kdlib.locations import cache_dir
from kdlib.models.loading import model_location

log = logging.getLogger(__name__)

WEIGHTS = "weights"


class SGLangRolloutBackend(RolloutBackend):
    cfg: SGLangRolloutConfig

    def __init__(self, model: ModelConfig, device: torch.device, cfg: SGLangRolloutConfig) -> None:
        super().__init__(model, device, cfg)
        self.options = cfg
        args = server_args(
            self.options, model, model_path=engine_checkpoint(model), device=device,
            enable_memory_saver=self.options.release_memory,
            enable_deterministic_inference=self.options.deterministic,
        )
        self.engine = SGLangEngine(args, "rollout")
        self._released: set[str] = set()
        self._session_open = False
        self._dirty = False  # weights changed since the last generation: flush before the next
        self._weights_lost = False  # released without a host copy: only a full sync restores them
        self._round: set[str] = set()  # names loaded since the last generation
        self._all_names: Optional[set[str]] = None  # names of the first full sync

    # ------------------------------------------------------------------------------------------
    # Weight sync

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """One bucket of the student's weights (tensor path)."""
        self._open_session()
        self.engine.update_weights_from_tensor([(name, t.to(self.device)) for name, t in state.items()])
        self._round.update(state)

    def join_weight_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> None:
        """Distributed path: join student rank 0's broadcast group (once)."""
        self.engine.init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name, backend)

    def receive_weights(self, plan: list[BucketMeta], group_name: str) -> None:
        """Distributed path: receive every bucket of ``plan`` while student rank 0 broadcasts it."""
        self._open_session()
        for bucket in plan:
            self.engine.update_weights_from_distributed(bucket.names, bucket.dtypes, bucket.shapes, group_name)
            self._round.update(bucket.names)

    def _open_session(self) -> None:
        if WEIGHTS in self._released:
            self._resume([WEIGHTS])  # memory to load into
        if not self._session_open:
            self.engine.begin_weight_update()
            self._session_open = True
        self._dirty = True

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompts: list[list[int]], *, stop_ids: set[int], pad_id: int, seed: int,
                 logprobs: bool = False) -> list[list[Generation]]:
        cfg = self.cfg
        self._prepare_generation()
        n = cfg.n_samples_per_prompt
        requests = [prompt for prompt in prompts for _ in range(n)]
        base = {
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "stop_token_ids": sorted(stop_ids),
            "no_stop_trim": True,
        }
        if self.options.deterministic:
            params: Any = [{**base, "sampling_seed": seed + i} for i in range(len(requests))]
        else:
            params = base
        outputs = self.engine.generate(requests, params, **({"return_logprob": True} if logprobs else {}))
        if self.options.release_memory:
            self._release(list(MEMORY_TAGS))
            self._weights_lost = True
        out: list[list[Generation]] = [[] for _ in prompts]
        for index, output in enumerate(outputs):
            out[index // n].append(parse_generation(output, stop_ids, cfg.max_new_tokens, logprobs=logprobs))
        return out

    def _prepare_generation(self) -> None:
        if self._session_open:
            self.engine.end_weight_update()
            self._session_open = False
        if self._round and self._all_names is None:
            self._all_names = set(self._round)
        if self._weights_lost:
            missing = (self._all_names or {"<all weights>"}) - self._round
            if missing:
                raise ModelError(
                    f"rollout: the SGLang engine released its weights and {len(missing)} tensors "
                    f"(e.g. {sorted(missing)[:2]}) were not loaded again before generating: it would "
                    "sample from stale or freed weights"
                )
            self._weights_lost = False
        self._resume([tag for tag in MEMORY_TAGS if tag in self._released])
        if self._dirty:
            self.engine.flush_cache()
            self._dirty = False
        self._round = set()

    def _release(self, tags: list[str]) -> None:
        tags = [tag for tag in tags if tag not in self._released]
        if tags:
            self.engine.release(tags)
            self._released.update(tags)

    def _resume(self, tags: list[str]) -> None:
        if tags:
            self.engine.resume(tags)
            self._released.difference_update(tags)


def parse_generation(output: dict[str, Any], stop_ids: set[int], max_new_tokens: int, *,
                     logprobs: bool = False) -> Generation:
    """kdlib's Generation from one SGLang output (``output_ids`` include the stop token). With
    ``logprobs`` (``return_logprob``), ``meta_info["output_token_logprobs"]`` holds one
    ``(logprob, token_id, text_or_None)`` per output token, from the temperature-scaled
    distribution before top-p (SGLang's sampler, unless SGLANG_RETURN_ORIGINAL_LOGPROB is set)."""
    tokens = list(output["output_ids"])
    scores = output_logprobs(output, tokens) if logprobs else None
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tokens[: i + 1], "stop", None if scores is None else scores[: i + 1])
    reason = output["meta_info"]["finish_reason"]["type"]
    if reason == "length" and len(tokens) != max_new_tokens:
        raise ModelError(f"rollout: SGLang reported a length finish after {len(tokens)} of {max_new_tokens} tokens")
    return Generation(tokens, "stop" if reason == "stop" else "length", scores)


def output_logprobs(output: dict[str, Any], tokens: list[int]) -> list[float]:
    """The log-probability SGLang reports for each of ``tokens``, checked token by token."""
    entries = output["meta_info"].get("output_token_logprobs") or []
    if [int(entry[1]) for entry in entries] != tokens:
        raise ModelError(f"rollout: SGLang's output_token_logprobs cover {len(entries)} tokens that are not the "
                         f"{len(tokens)} output_ids it returned")
    return [float(entry[0]) for entry in entries]


def engine_checkpoint(model: ModelConfig) -> str:
    """A checkpoint SGLang can load with ``model``'s architecture: the model's own location, or
    for a depth-pruned student its initial pruned weights, written once to kdlib's cache."""
    if isinstance(model, StudentConfig) and model.prune.output is not None:
        return model.prune.output  # pruned by importance: already a checkpoint of its own
    location = model_location(model.model)
    if not isinstance(model, StudentConfig) or (model.num_layers is None and model.keep_layers is None):
        return location
    from filelock import FileLock

    from kdlib.models.student import build_model

    key = json.dumps([location, model.revision, model.dtype.value, model.num_layers, model.keep_layers], default=str)
    target = cache_dir() / "sglang" / hashlib.sha256(key.encode()).hexdigest()[:16]
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            log.info("writing the pruned student for the SGLang rollout engine to %s", target)
            build_model(model, torch.device("cpu")).save_pretrained(target)
            done.touch()
    return str(target)
