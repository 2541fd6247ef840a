"""An in-test stand-in for ``sglang.Engine`` (0.5.23) built on a tiny transformers model.

It takes the same keyword arguments (ServerArgs fields) and returns outputs in SGLang's layout,
as read from the 0.5.23 source (see kdlib/backends/sglang/outputs.py): ``output_ids`` through the
stop token, ``meta_info["finish_reason"]`` as {"type": "stop", "matched": id} or
{"type": "length", "length": n}, ``meta_info["hidden_states"]`` = [prefill rows] + one row per
decode step cut to the number of output tokens, input log-probs whose entry t is the
distribution for token t (entry 0 None) as (logprob, id, None) tuples. It also reproduces the
behaviours kdlib must cope with: a radix-cache hit or a chunked prefill leaves prompt rows out;
``max_new_tokens=0`` returns no hidden states; weight updates outside a
``begin_weight_update``/``end_weight_update`` session fail with (False, message); resuming a tag
that was not released raises; weights released without a CPU backup come back as garbage; a
``generate`` while memory is released fails. The numbers are the model's own (post-norm hidden
states, its logits), so kdlib's conversions are checked against real values.
"""

from __future__ import annotations

import datetime
import os
from types import SimpleNamespace
from typing import Any, ClassVar, Optional

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# The double's prefill chunk when chunked prefill is on (SGLang's default is thousands of tokens).
DEFAULT_CHUNK = 16


class _CallLog(list):
    """The calls made on an engine; also appended to a file when the engine lives in another
    process (a Ray actor) and the test set $ENGINE_DOUBLE_LOG."""

    def __init__(self, path: Optional[str]) -> None:
        super().__init__()
        self.path = path

    def append(self, call) -> None:
        super().append(call)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {call[0]}\n")


class EngineDouble:
    """``sglang.Engine(**server_args)`` for tests; ``instances`` lists every engine started."""

    instances: ClassVar[list["EngineDouble"]] = []
    # Return the final norm's input instead of its output (a model SGLang runs "before norm").
    prenorm: ClassVar[bool] = False

    def __init__(self, **server_args: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.server_args = server_args
        self.model = AutoModelForCausalLM.from_pretrained(server_args["model_path"], dtype=_DTYPES[server_args["dtype"]])
        self.model.eval().requires_grad_(False)
        self.calls: list[tuple[str, Any]] = _CallLog(os.environ.get("ENGINE_DOUBLE_LOG"))
        self.released: set[str] = set()
        self.session = False
        self.groups: dict[str, Any] = {}
        self._cached_prompts: list[list[int]] = []
        self._backup: Optional[dict[str, torch.Tensor]] = None
        self.generator = torch.Generator().manual_seed(server_args.get("random_seed") or 0)
        EngineDouble.instances.append(self)

    # ------------------------------------------------------------------------------------------
    # generate

    def generate(self, input_ids=None, sampling_params=None, return_hidden_states=False, return_logprob=False,
                 logprob_start_len=None, top_logprobs_num=None, token_ids_logprob=None, **unused):
        self.calls.append(("generate", len(input_ids)))
        if self.released & {"weights", "kv_cache"}:
            raise RuntimeError(f"generate while {sorted(self.released)} is released")
        if return_hidden_states and not self.server_args.get("enable_return_hidden_states"):
            raise ValueError("The server is not configured to return hidden states.")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(input_ids)
        return [
            self._one(list(ids), p, return_hidden_states, return_logprob, logprob_start_len or 0,
                      top_logprobs_num or 0, token_ids_logprob)
            for ids, p in zip(input_ids, params, strict=True)
        ]

    def _one(self, prompt, params, want_hidden, want_logprob, start, top_k, token_ids):
        max_new = params.get("max_new_tokens", 128)
        stops = set(params.get("stop_token_ids") or ()) | {self.model.config.eos_token_id}
        tokens, rows, prompt_logprobs, drawn = list(prompt), [], None, []
        generator = (torch.Generator().manual_seed(params["sampling_seed"])
                     if "sampling_seed" in params else self.generator)
        finish = None
        while finish is None:
            hidden, logprobs = self._forward(tokens)
            if prompt_logprobs is None:
                prompt_logprobs = logprobs
                rows.append(hidden[self._computed_from(prompt):].tolist())
            else:
                rows.append(hidden[-1].tolist())
            token = self._sample(logprobs[-1], params, generator)
            drawn.append(self._drawn_logprob(logprobs[-1], token, params))
            tokens.append(token)
            n_out = len(tokens) - len(prompt)
            if token in stops and not params.get("ignore_eos"):
                finish = {"type": "stop", "matched": token}
            elif n_out >= max_new:
                finish = {"type": "length", "length": max_new}
        output_ids = tokens[len(prompt):]
        finished_len = min(len(output_ids), max_new)
        meta: dict[str, Any] = {"id": f"req{len(self.calls)}", "finish_reason": finish, "prompt_tokens": len(prompt),
                                "completion_tokens": len(output_ids)}
        if want_hidden:
            meta["hidden_states"] = rows[:finished_len]
        if want_logprob:
            meta.update(self._input_logprobs(prompt, prompt_logprobs, start, top_k, token_ids))
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(drawn, output_ids)][:finished_len]
        self._cached_prompts.append(list(prompt))
        return {"output_ids": output_ids[:finished_len], "meta_info": meta}

    @torch.no_grad()
    def _forward(self, tokens):
        captured = {}
        norm = self.model.model.norm
        hook = norm.register_forward_hook(lambda m, args, out: captured.update(pre=args[0], post=out))
        try:
            self.model.model(input_ids=torch.tensor([tokens]), use_cache=False)
        finally:
            hook.remove()
        post = captured["post"][0]
        logits = self.model.lm_head(post).float()
        hidden = captured["pre"][0] if self.prenorm else post
        return hidden.float(), torch.log_softmax(logits, dim=-1)

    def _computed_from(self, prompt):
        """First prompt position the last prefill chunk recomputes (radix hit, chunked prefill)."""
        start = 0
        if not self.server_args.get("disable_radix_cache"):
            for seen in self._cached_prompts:
                shared = next((i for i, (a, b) in enumerate(zip(seen, prompt)) if a != b), min(len(seen), len(prompt)))
                start = max(start, min(shared, len(prompt) - 1))
        chunk = self.server_args.get("chunked_prefill_size") or DEFAULT_CHUNK
        if chunk != -1 and len(prompt) - start > chunk:
            start = len(prompt) - ((len(prompt) - start - 1) % chunk + 1)
        return start

    @staticmethod
    def _drawn_logprob(logprobs, token, params):
        """SGLang's sampler reports log softmax(logits / T) of the drawn token (raw when greedy)."""
        temperature = params.get("temperature", 1.0)
        scaled = logprobs if temperature < 1e-6 else torch.log_softmax(logprobs / temperature, dim=-1)
        return float(scaled[token])

    def _sample(self, logprobs, params, generator):
        temperature = params.get("temperature", 1.0)
        if temperature < 1e-6:
            return int(logprobs.argmax())
        probs = torch.softmax(logprobs / temperature, dim=-1)
        top_p = params.get("top_p", 1.0)
        if top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    @staticmethod
    def _input_logprobs(prompt, logprobs, start, top_k, token_ids):
        def entry(t, pairs):
            return [(float(logprobs[t - 1, i]), int(i), None) for i in pairs]

        positions = range(start, len(prompt))
        out: dict[str, Any] = {"input_token_logprobs": [
            (None if t == 0 else float(logprobs[t - 1, prompt[t]]), prompt[t], None) for t in positions
        ]}
        if top_k:
            out["input_top_logprobs"] = [None if t == 0 else entry(t, logprobs[t - 1].topk(top_k).indices.tolist())
                                         for t in positions]
        if token_ids:
            out["input_token_ids_logprobs"] = [None if t == 0 else entry(t, token_ids) for t in positions]
        return out

    # ------------------------------------------------------------------------------------------
    # weights

    def begin_weight_update(self, selector: str = "all"):
        self.calls.append(("begin_weight_update", None))
        if self.session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end_weight_update", None))
        if not self.session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", ([n for n, _ in named_tensors], flush_cache)))
        return self._load(named_tensors, "update_weights_from_tensor", flush_cache)

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl"):
        """SGLang's custom group: TCP rendezvous, a store prefixed with the group name."""
        from torch.distributed import distributed_c10d as c10d

        self.calls.append(("init_weights_update_group", (rank_offset, world_size, group_name, backend)))
        timeout = datetime.timedelta(seconds=60)
        store, rank, world = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank_offset, world_size,
                                                  timeout=timeout))
        group, _ = c10d._new_process_group_helper(world, rank, [], c10d.Backend(backend),
                                                  c10d.PrefixStore(group_name, store), group_name=group_name,
                                                  timeout=timeout)
        c10d._world.pg_group_ranks[group] = dict(enumerate(range(world)))
        self.groups[group_name] = group
        return True, "Succeeded to initialize custom process group."

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name="weight_update_group",
                                        flush_cache=True, load_format=None):
        import torch.distributed as dist

        self.calls.append(("update_weights_from_distributed", (list(names), flush_cache)))
        if not self.session:
            return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(tensor, src=0, group=self.groups[group_name])
            received.append((name, tensor))
        return self._load(received, "update_weights_from_distributed", flush_cache)

    def _load(self, named_tensors, call, flush_cache):
        if not self.session:
            return False, f"{call} must run between begin_weight_update() and end_weight_update()"
        if "weights" in self.released:
            raise RuntimeError(f"{call} while the weights are released")
        own = dict(self.model.named_parameters())
        own.update(self.model.named_buffers())
        for name, tensor in named_tensors:
            if name == "lm_head.weight" and name not in own:  # tied head: loaded with the embedding
                continue
            if name not in own:
                return False, f"unknown weight {name}"
            with torch.no_grad():
                own[name].copy_(tensor)
        if flush_cache:
            self.flush_cache()
        return True, "Success"

    # ------------------------------------------------------------------------------------------
    # memory and cache

    def flush_cache(self):
        self.calls.append(("flush_cache", None))
        self._cached_prompts.clear()
        return SimpleNamespace(success=True, message="")

    def release_memory_occupation(self, tags=None):
        tags = list(tags or ["kv_cache", "weights", "cuda_graph"])
        self.calls.append(("release_memory_occupation", tags))
        if not self.server_args.get("enable_memory_saver"):
            raise RuntimeError("release_memory_occupation needs enable_memory_saver")
        if set(tags) & self.released:
            raise RuntimeError(f"{sorted(set(tags) & self.released)} already released")
        if "weights" in tags and self.server_args.get("enable_weights_cpu_backup"):
            self._backup = {k: v.clone() for k, v in self.model.state_dict().items()}
        if "kv_cache" in tags:
            self._cached_prompts.clear()
        self.released.update(tags)

    def resume_memory_occupation(self, tags=None):
        tags = list(tags or ["kv_cache", "weights", "cuda_graph"])
        self.calls.append(("resume_memory_occupation", tags))
        for tag in tags:
            self.released.remove(tag)  # KeyError for a tag that was not released, as in SGLang
        if "weights" in tags:
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    value.copy_(self._backup[name] if self._backup is not None else torch.full_like(value, 7.0))
            self._backup = None

    def shutdown(self):
        self.calls.append(("shutdown", None))

    def calls_named(self, *names: str) -> list[tuple[str, Any]]:
        return [call for call in self.calls if call[0] in names]


def install() -> None:
    """Make every SGLang engine kdlib starts in this process an :class:`EngineDouble` (a Ray
    ``worker_process_setup_hook`` for the actors of a test)."""
    from kdlib.backends.sglang.engine import SGLangEngine

    SGLangEngine.factory = EngineDouble
