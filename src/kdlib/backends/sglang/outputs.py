"""Reading SGLang's outputs for the teacher: which positions its hidden states and log-probs cover.

What sglang 0.5.23 returns for ``generate(input_ids=[ids], sampling_params={"max_new_tokens": 1},
return_hidden_states=True, ...)`` on an engine started with ``enable_return_hidden_states``
(read from ``managers/scheduler_components/batch_result_processor.py``, ``output_streamer.py``,
``tokenizer_manager.py`` and ``logprob_result_processor.py``):

- ``meta_info["hidden_states"]`` is a list. Its first element is the prefill: one row per prompt
  position 0..len(ids)-1 that was *computed* in the request's last prefill chunk (a prefix served
  from the radix cache is not recomputed, and a chunked prefill keeps only its last chunk, hence
  the teacher's engine runs with the radix cache off and chunked prefill off). Each decode step
  then appends one row, for the position of the token it consumed, so a response of n tokens adds
  n - 1 rows, and the list is cut to ``finished_len`` elements. ``max_new_tokens=0`` (prefill
  only) sets ``finished_len`` to 0 and returns no hidden states at all; kdlib asks for 1 token.
- The rows are the tensor the model passes to its logits processor: after the final norm for the
  Llama, Qwen2/3 and Qwen3-MoE families (their ``forward`` applies ``self.norm`` first); a model
  that hands the processor ``hidden_states_before_norm`` (DeepSeek-V4, MiMo-V2, Step-3.5, MTP
  heads) returns pre-norm rows, and the head self-check rejects it. Values are the model dtype's
  values as Python floats, so ``torch.tensor(rows, float32)`` holds them exactly.
- Input log-probs (``return_logprob``, ``logprob_start_len=0``): entry t of
  ``input_token_logprobs`` / ``input_top_logprobs`` / ``input_token_ids_logprobs`` is the
  distribution *for* token t, computed at position t - 1, from the raw logits (no temperature);
  entry 0 is None. Items are ``(logprob, token_id, text_or_None)`` tuples.

kdlib's contract is the hidden state at every loss position t (it predicts token t + 1), so row t
of the prefill block, and top-k entry t + 1.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from kdlib.errors import ModelError


def prefill_hidden(output: dict[str, Any], n_tokens: int, positions: Sequence[int], what: str) -> torch.Tensor:
    """Rows ``positions`` of the prefill block of ``meta_info["hidden_states"]``, float32
    [len(positions), hidden]. Only those rows are converted from Python floats (numpy converts
    nested lists faster than ``torch.tensor``; the conversion is a visible part of a teacher step,
    see docs/gpu.md)."""
    blocks = output["meta_info"].get("hidden_states")
    if not blocks:
        raise ModelError(
            f"{what}: SGLang returned no hidden states (the engine must start with "
            "enable_return_hidden_states and score with max_new_tokens >= 1)"
        )
    block = blocks[0]
    if len(block) != n_tokens or not block or not isinstance(block[0], list):
        shape = (len(block), len(block[0]) if block and isinstance(block[0], list) else 0)
        raise ModelError(
            f"{what}: SGLang returned hidden states of shape {shape} for a prompt of {n_tokens} "
            "tokens; every position must be recomputed (radix cache and chunked prefill off)"
        )
    rows = np.array([block[i] for i in positions], dtype=np.float32).reshape(len(positions), len(block[0]))
    return torch.from_numpy(rows)


def input_top_logprobs(output: dict[str, Any], positions: torch.Tensor, k: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([rows, k] ids, [rows, k] log-probs)`` of the distribution predicted at each of
    ``positions`` (entry t + 1 of ``input_top_logprobs``)."""
    table = output["meta_info"].get("input_top_logprobs")
    if table is None:
        raise ModelError(f"{what}: SGLang returned no input_top_logprobs (return_logprob with top_logprobs_num)")
    ids = torch.empty(positions.numel(), k, dtype=torch.long)
    values = torch.empty(positions.numel(), k, dtype=torch.float32)
    for row, position in enumerate(positions.tolist()):
        entry = table[position + 1]
        if entry is None or len(entry) < k:
            raise ModelError(f"{what}: SGLang returned no top-{k} log-probs for position {position + 1}")
        values[row] = torch.tensor([item[0] for item in entry[:k]], dtype=torch.float32)
        ids[row] = torch.tensor([item[1] for item in entry[:k]], dtype=torch.long)
    return ids, values


def input_token_ids_logprobs(output: dict[str, Any], token_ids: list[int], what: str) -> torch.Tensor:
    """[n_tokens - 1, len(token_ids)] log-probs of ``token_ids`` predicted at positions
    0..n_tokens-2 (entries 1.. of ``input_token_ids_logprobs``), columns in ``token_ids`` order."""
    table = output["meta_info"].get("input_token_ids_logprobs")
    if not table or table[0] is not None:
        raise ModelError(f"{what}: SGLang's input_token_ids_logprobs do not start with the empty entry 0")
    column = {token: j for j, token in enumerate(token_ids)}
    out = torch.full((len(table) - 1, len(token_ids)), float("nan"), dtype=torch.float32)
    for row, entry in enumerate(table[1:]):
        for logprob, token, *_ in entry or ():
            out[row, column[token]] = logprob
    if torch.isnan(out).any():
        raise ModelError(f"{what}: SGLang left some requested token-id log-probs out")
    return out


def logprob_of_next_tokens(output: dict[str, Any], what: str) -> torch.Tensor:
    """[n_tokens - 1] log-prob of each prompt token given the ones before it (entries 1..)."""
    table: Optional[list] = output["meta_info"].get("input_token_logprobs")
    if not table or table[0][0] is not None:
        raise ModelError(f"{what}: SGLang's input_token_logprobs do not start with the empty entry 0")
    return torch.tensor([item[0] for item in table[1:]], dtype=torch.float32)
