"""A loopback OpenAI-compatible ``/v1/completions`` server running a transformers model, for tests.

It listens on 127.0.0.1 at an ephemeral port (stdlib ``http.server``, one thread per request, one
request per connection) and answers the way the servers kdlib targets do:

- ``token_keys="text"``: as SGLang 0.5.23 (``serving_completions.py``): the request is validated
  with SGLang's own ``CompletionRequest`` and the answer built with its ``CompletionResponse``
  (both executed from the installed source, :mod:`sglang_protocol`); entry t of the echoed
  top-log-probabilities is the distribution for prompt token t (entry 0 null), one generated token
  adds entry n; keys are each token's text rendered by SGLang's ``to_openai_style_logprobs``.
- ``token_keys="ids"``: as vLLM with ``return_tokens_as_token_ids`` (read from its source, see
  :mod:`vllm_completion_fields`): keys ``"token_id:<id>"``, the prompt's own token listed first
  (so a position carries k + 1 tokens when it is not among the top k); the request is also checked
  against vLLM's field names.

The numbers are the model's own log-softmax over its logits. Faults for tests: ``faults`` is a
queue of actions taken by the next requests (``("status", 503)``, ``("sleep", seconds)``,
``("body", bytes)``, ``("json", obj)``), and ``die_after=n`` closes the server for good on request
n + 1 (the connection dropped unanswered, later ones refused). ``requests`` records each request's
headers and body.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from sglang_protocol import protocol, openai_utils
from vllm_completion_fields import VLLM_COMPLETION_REQUEST_FIELDS


class LoopbackServer:
    def __init__(self, model_path: str, *, token_keys: str = "text", dtype: torch.dtype = torch.float32,
                 api_key: Optional[str] = None, model_name: str = "default", die_after: Optional[int] = None,
                 validate: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
        self.token_keys, self.api_key, self.model_name = token_keys, api_key, model_name
        self.die_after, self.validate = die_after, validate
        self.faults: deque = deque()
        self.requests: list[dict[str, Any]] = []
        self.answered = 0
        # where a request's time goes (the benchmark reports them): the model's forward and top-k,
        # the whole answer (validation, key rendering, SGLang's models, JSON), the bytes sent
        self.compute_seconds = 0.0
        self.answer_seconds = 0.0
        self.response_bytes = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- answering ---------------------------------------------------------------------------

    def answer(self, headers: dict[str, str], raw: bytes) -> tuple[int, bytes]:
        """(status, body) for one POST to /v1/completions."""
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, b'{"error": "invalid API key"}'
        action = self.faults.popleft() if self.faults else None
        if action is not None:
            kind, value = action
            if kind == "status":
                return value, json.dumps({"error": f"status {value}"}).encode()
            if kind == "body":
                return 200, value
            if kind == "json":
                return 200, json.dumps(value).encode()
            if kind == "sleep":
                time.sleep(value)
        body = json.loads(raw)
        problem = self.invalid(body)
        if problem:
            return 400, json.dumps({"error": problem}).encode()
        return 200, self.complete(body).encode()

    def invalid(self, body: dict[str, Any]) -> Optional[str]:
        if not self.validate:
            return None
        try:
            protocol().CompletionRequest.model_validate(body)
        except Exception as exc:  # pydantic's ValidationError: the server's 400
            return str(exc).splitlines()[0]
        if self.token_keys == "ids" and set(body) - VLLM_COMPLETION_REQUEST_FIELDS:
            return f"unknown fields {sorted(set(body) - VLLM_COMPLETION_REQUEST_FIELDS)}"
        if self.token_keys == "ids" and not body.get("return_tokens_as_token_ids"):
            return "this double answers with token-id keys only"
        return None

    def complete(self, body: dict[str, Any]) -> str:
        P = protocol()
        prompts: list[list[int]] = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        k = body["logprobs"]
        start = time.perf_counter()
        tables = self._log_probs(prompts)
        with self._lock:
            self.compute_seconds += time.perf_counter() - start
        choices = []
        for index, (ids, lp) in enumerate(zip(prompts, tables)):
            values, top = lp.topk(k, dim=-1)  # row t: the distribution after tokens 0..t
            generated = int(top[-1, 0])
            logprobs = self._logprobs(ids + [generated], lp, values, top)
            text = self.tokenizer.decode(ids + [generated])
            choices.append(P.CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason="length"))
        n_prompt = sum(len(p) for p in prompts)
        usage = P.UsageInfo(prompt_tokens=n_prompt, completion_tokens=len(prompts), total_tokens=n_prompt + len(prompts))
        response = P.CompletionResponse(id=uuid.uuid4().hex, model=self.model_name, choices=choices, usage=usage)
        return response.model_dump_json()

    @torch.inference_mode()
    def _log_probs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, [n, vocab] float32 log-probabilities: row t is the distribution for token t + 1.
        One forward per prompt: a server computes no padding."""
        return [torch.log_softmax(self.model(input_ids=torch.tensor([p])).logits[0].float(), dim=-1) for p in prompts]

    def _logprobs(self, tokens: list[int], lp: torch.Tensor, values: torch.Tensor, top: torch.Tensor) -> Any:
        """The choice's ``logprobs`` for ``tokens`` (prompt + the generated one): entry t for token t."""
        n = len(tokens)
        own = [None] + [float(lp[t - 1, tokens[t]]) for t in range(1, n)]
        if self.token_keys == "ids":
            top_logprobs: list = [None]
            for t in range(1, n):
                entry = {f"token_id:{tokens[t]}": own[t]}  # the token itself first, as vLLM lists it
                entry.update({f"token_id:{int(i)}": float(v) for v, i in zip(values[t - 1], top[t - 1])})
                top_logprobs.append(entry)
            return protocol().LogProbs(
                text_offset=[-1] * n, token_logprobs=own, tokens=[f"token_id:{t}" for t in tokens], top_logprobs=top_logprobs,
            )
        # SGLang: (logprob, id, text) triples, texts from the tokenizer's batch_decode of each id alone
        # (tokenizer_manager.detokenize_logprob_tokens), rendered by to_openai_style_logprobs
        def triples(pairs: list[tuple[Optional[float], int]]) -> list[tuple]:
            texts = self.tokenizer.batch_decode([[i] for _, i in pairs])
            return [(v, i, s) for (v, i), s in zip(pairs, texts)]

        tops = [[(float(v), int(i)) for v, i in zip(values[t - 1], top[t - 1])] for t in range(1, n)]
        return openai_utils().to_openai_style_logprobs(
            input_token_logprobs=triples(list(zip(own[: n - 1], tokens[: n - 1]))),
            input_top_logprobs=[None] + [triples(pairs) for pairs in tops[:-1]],
            output_token_logprobs=triples([(own[-1], tokens[-1])]),
            output_top_logprobs=[triples(tops[-1])],
            tokenizer=self.tokenizer,
        )


def _handler(server: LoopbackServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with server._lock:
                server.requests.append({"path": self.path, "headers": headers, "body": raw})
                dying = server.die_after is not None and server.answered >= server.die_after
                server.answered += 1
            if dying:  # crash: drop this connection unanswered and stop listening
                threading.Thread(target=server.close, daemon=True).start()
                self.close_connection = True
                self.connection.close()
                return
            if self.path != "/v1/completions":
                status, body = 404, b'{"error": "not found"}'
            else:
                start = time.perf_counter()
                status, body = server.answer(headers, raw)
                with server._lock:
                    server.answer_seconds += time.perf_counter() - start
                    server.response_bytes += len(body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (a timeout test)
                pass

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    return Handler
