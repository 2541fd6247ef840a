"""The request fields of vLLM's ``/v1/completions``, as read from its source (vLLM is not installed).

Read from github.com/vllm-project/vllm, ``vllm/entrypoints/openai/completion/protocol.py`` at
commit d5dba2d7b0ab9b98096560c69db7126b54b14d79 (class ``CompletionRequest``), with the echo and
log-probability behaviour from ``vllm/entrypoints/openai/completion/serving.py`` at commit
cc139d8ea6ff4db984778a3e77e95e1d1c7f1362 (``_create_completion_logprobs``): with
``return_tokens_as_token_ids`` the keys of ``top_logprobs`` are ``"token_id:<id>"``, an echoed
prompt position lists up to ``logprobs + 1`` tokens (the prompt's own token first when it is not
among the top ``logprobs``), entry 0 is null, and ``max_tokens=0`` with ``echo`` is accepted
(kdlib sends 1, which the other server requires). Only the names are kept here, to check kdlib's
request keys against; nothing of vLLM's code is.
"""

VLLM_SOURCE = "vllm/entrypoints/openai/completion/protocol.py@d5dba2d7b0ab9b98096560c69db7126b54b14d79"

VLLM_COMPLETION_REQUEST_FIELDS = frozenset({
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs",
    "prompt_embeds", "add_special_tokens", "response_format", "structured_outputs", "priority", "request_id",
    "logits_processors", "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params",
    "vllm_xargs", "max_repetition_pattern_size", "min_repetition_pattern_size", "repetition_min_count",
})
