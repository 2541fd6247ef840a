"""The served teacher backend against a loopback /v1/completions server (tests/served_double.py).

The server runs the tiny Llama and answers as SGLang 0.5.23 does (requests validated, responses
built with SGLang's own pydantic models, keys rendered by SGLang's own function, all executed from
the installed source) or as vLLM does with token-id keys. The backend's top-k must be the hf
teacher's top-k signal; every failure must be one line naming the URL; the key must stay secret.
"""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from kdlib.backends import TEACHER_BACKENDS
from kdlib.backends.served.options import ServedTeacherOptions, TokenKeys
from kdlib.backends.served.protocol import TextKeys, completion_request
from kdlib.batch import TokenBatch
from kdlib.config import SignalConfig, SignalKind, TeacherConfig
from kdlib.errors import ConfigError, ModelError, TeacherUnavailable
from kdlib.signals import signal_from_hidden
from kdlib.teacher_output import TeacherOutput
from served_double import LoopbackServer
from token_batches import packed as pack, padded_batch
from sglang_protocol import completion_request_fields, openai_utils, protocol
from vllm_completion_fields import VLLM_COMPLETION_REQUEST_FIELDS

K = 4


def _batch(seed: int = 0, packed: bool = False) -> TokenBatch:
    """Three samples, the first one's loss span reaching its last token (entry n of the answer)."""
    batch = padded_batch(seed, spans=((4, 12), (2, 6), (0, 9)))
    return pack(batch) if packed else batch


def _served(model, url: str, k: int = K, **options) -> TeacherConfig:
    backend = ServedTeacherOptions(url=url, backoff_s=0.01, **options)
    return TeacherConfig(model=str(model), backend=backend, signal=SignalConfig(kind=SignalKind.topk, k=k))


def _backend(cfg: TeacherConfig):
    return TEACHER_BACKENDS.get("served")(cfg, torch.device("cpu"))


def _hf_topk(model, batch: TokenBatch, k: int = K) -> TeacherOutput:
    """The reference: the hf teacher's hidden states turned into top-k as the teacher worker does
    (float32 on the wire, so the only difference left is the server's own arithmetic)."""
    cfg = TeacherConfig(model=str(model), signal=SignalConfig(kind=SignalKind.topk, k=k))
    hf = TEACHER_BACKENDS.get("hf")(cfg, torch.device("cpu"))
    return signal_from_hidden(hf.score(batch), hf.lm_head(), cfg.signal, wire_dtype=torch.float32, chunk_size=256)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("keys", ["text", "ids"])
@pytest.mark.parametrize("packed", [False, True])
def test_served_topk_is_the_hf_teachers_topk(tiny_llama, keys, packed):
    batch = _batch(packed=packed)
    reference = _hf_topk(tiny_llama, batch)
    with LoopbackServer(tiny_llama, token_keys=keys) as server:
        out = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys(keys), batch_size=2)).score(batch)
        assert len(server.requests) == 2  # 3 samples, 2 per request
    assert out.signal == "topk" and out.topk_ids.dtype == torch.uint16
    assert out.topk_ids.shape == (batch.n_loss_tokens, K)
    assert torch.equal(out.topk_ids.long(), reference.topk_ids.long())
    torch.testing.assert_close(out.topk_logprobs, reference.topk_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.topk_tail, reference.topk_tail, atol=1e-4, rtol=1e-4)


def test_request_fields_exist_in_both_servers_and_sglang_accepts_the_request():
    """The text-key request (SGLang) uses only fields both servers define; the id-key request (vLLM)
    adds return_tokens_as_token_ids, which vLLM defines (read from its source, see the fixture)."""
    sglang, vllm = completion_request_fields(), VLLM_COMPLETION_REQUEST_FIELDS
    text = completion_request("m", [[1, 2, 3], [4, 5]], K, TokenKeys.text)
    ids = completion_request("m", [[1, 2, 3], [4, 5]], K, TokenKeys.ids)
    assert set(text) <= sglang & vllm
    assert set(ids) <= vllm and set(ids) - set(text) == {"return_tokens_as_token_ids"}
    parsed = protocol().CompletionRequest.model_validate(text)
    assert parsed.echo and parsed.logprobs == K and parsed.max_tokens == 1 and parsed.prompt == [[1, 2, 3], [4, 5]]
    with pytest.raises(Exception, match="max_tokens must be positive"):  # why kdlib asks for one token
        protocol().CompletionRequest.model_validate({**text, "max_tokens": 0})


def test_text_keys_invert_sglangs_rendering_of_every_token(tiny_llama):
    """Every id of the tokenizer, rendered as a key by SGLang's to_openai_style_logprobs, maps back
    to that id (or is reported as ambiguous, never silently to another id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    keys = TextKeys(tokenizer)
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    rendered = openai_utils().to_openai_style_logprobs(
        input_top_logprobs=[[(0.0, i, t)] for i, t in enumerate(texts)], tokenizer=tokenizer,
    ).top_logprobs
    for token_id, entry in enumerate(rendered):
        (key,) = entry
        if key in keys.ambiguous:
            assert token_id in keys.ambiguous[key]
        else:
            assert keys.id_of(key) == token_id
    assert len(keys.ids) + sum(len(v) for v in keys.ambiguous.values()) == vocab
    assert keys.id_of(next(iter(keys.ids))) is not None


def test_a_token_whose_text_names_several_ids_is_left_out_of_the_topk(tiny_llama):
    """SmolLM2's lone byte 0xE6, rendered latin-1, is also its token "æ" (the default job meets it):
    such a token cannot be named by a text key, so it is left out and the top-k is the k most
    probable of the other tokens, its probability counted in the tail; with no extra tokens asked
    for, a position that then has fewer than k is one line."""
    from kdlib.models.checkpoint_head import load_lm_head

    batch = _batch()
    cfg = TeacherConfig(model=str(tiny_llama))
    hidden = TEACHER_BACKENDS.get("hf")(cfg, torch.device("cpu")).score(batch).hidden
    full = torch.log_softmax(load_lm_head(cfg).logits(hidden).double(), dim=-1)
    often = int(full.topk(K).indices.flatten().mode().values)  # a token in many rows' top-k
    with LoopbackServer(tiny_llama) as server:
        backend = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys.text, extra_logprobs=2))
        text = next(t for t, i in backend.text_keys.ids.items() if i == often)
        backend.text_keys.ambiguous[text] = [backend.text_keys.ids.pop(text), 10**6]
        out = backend.score(batch)
        assert backend.skipped == int((full.topk(K).indices == often).sum()) > 0
        strict = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys.text, extra_logprobs=0))
        strict.text_keys.ambiguous[text] = [strict.text_keys.ids.pop(text), 10**6]
        with pytest.raises(TeacherUnavailable, match=r"fewer than k=4 \(raise teacher.backend.extra_logprobs\)"):
            strict.score(batch)
    expected = full.clone()
    expected[:, often] = float("-inf")
    reference = expected.topk(K)
    assert torch.equal(out.topk_ids.long(), reference.indices)
    torch.testing.assert_close(out.topk_logprobs.double(), reference.values, atol=1e-5, rtol=1e-5)
    tail = torch.log1p(-reference.values.exp().sum(-1))
    torch.testing.assert_close(out.topk_tail.double(), tail, atol=1e-4, rtol=1e-4)


def test_id_keys_from_a_server_that_sends_text_name_the_fix(tiny_llama):
    with LoopbackServer(tiny_llama, token_keys="text", validate=False) as server:
        backend = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys.ids))
        with pytest.raises(TeacherUnavailable, match="set teacher.backend.token_keys=text") as info:
            backend.score(_batch())
    assert server.url in str(info.value) and "\n" not in str(info.value)


def test_a_dead_server_is_one_line_naming_the_url(tiny_llama):
    url = f"http://127.0.0.1:{_closed_port()}"
    backend = _backend(_served(tiny_llama, url, retries=2))
    with pytest.raises(TeacherUnavailable) as info:
        backend.score(_batch())
    message = str(info.value)
    assert message.startswith(f"teacher server {url}/v1/completions: cannot connect")
    assert message.endswith("after 3 attempts") and "\n" not in message
    assert backend.client.retried == 2


def test_a_slow_server_times_out_retries_then_stops(tiny_llama):
    with LoopbackServer(tiny_llama) as server:
        server.faults.extend([("sleep", 2.0)] * 3)
        backend = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys.text, retries=2, read_timeout_s=0.2,
                                   batch_size=8))
        with pytest.raises(TeacherUnavailable) as info:
            backend.score(_batch())
        assert len(server.requests) == 3
    message = str(info.value)
    assert server.url in message and "no answer within the timeout (ReadTimeout) after 3 attempts" in message
    assert "\n" not in message


@pytest.mark.parametrize("fault, expected", [
    (("body", b"<html>busy</html>"), "the answer is not JSON"),
    (("json", {"object": "error"}), "unexpected answer: the response has no 'choices' list"),
    (("json", {"choices": []}), "unexpected answer: the response has 0 choices for 3 prompts"),
    (("json", {"choices": [{"index": i, "logprobs": {"top_logprobs": [None]}} for i in range(3)]}),
     "unexpected answer: top_logprobs has 1 entries for a 12-token prompt"),
    (("json", {"choices": [{"index": i, "logprobs": {"top_logprobs": [None] + [{"a": -1.0}] * 12}} for i in range(3)]}),
     "unexpected answer: top_logprobs entry 5 has 1 tokens, fewer than logprobs=4"),
    (("status", 400), "HTTP 400: {\"error\": \"status 400\"}"),
])
def test_a_wrong_answer_is_one_line_and_not_retried(tiny_llama, fault, expected):
    with LoopbackServer(tiny_llama) as server:
        server.faults.append(fault)
        backend = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys.text))
        with pytest.raises(TeacherUnavailable) as info:
            backend.score(_batch())
        assert len(server.requests) == 1
    message = str(info.value)
    assert message.startswith(f"teacher server {server.url}/v1/completions: ") and expected in message
    assert "\n" not in message


def test_busy_and_unavailable_answers_are_retried_until_one_succeeds(tiny_llama, caplog):
    batch = _batch()
    with LoopbackServer(tiny_llama) as server:
        cfg = _served(tiny_llama, server.url, token_keys=TokenKeys.text)
        clean = _backend(cfg).score(batch)
        server.faults.extend([("status", 429), ("status", 503)])
        backend = _backend(cfg)
        with caplog.at_level(logging.WARNING):
            out = backend.score(batch)
        assert len(server.requests) == 4 and backend.client.retried == 2
    assert torch.equal(out.topk_ids, clean.topk_ids) and torch.equal(out.topk_logprobs, clean.topk_logprobs)
    assert "HTTP 429" in caplog.text and "HTTP 503" in caplog.text


def test_the_api_key_is_sent_and_never_shown(tiny_llama, monkeypatch, caplog, tmp_path):
    import kdlib
    from omegaconf import OmegaConf

    secret = "sk-kdlib-test-4f9a1c"
    monkeypatch.setenv("KDLIB_TEST_SERVED_KEY", secret)
    with LoopbackServer(tiny_llama, api_key=secret) as server:
        cfg = _served(tiny_llama, server.url, token_keys=TokenKeys.text, api_key_env="KDLIB_TEST_SERVED_KEY")
        with caplog.at_level(logging.DEBUG):
            _backend(cfg).score(_batch())
        assert server.requests[-1]["headers"]["authorization"] == f"Bearer {secret}"
        server.api_key = "another-key"  # the server now refuses ours
        with caplog.at_level(logging.DEBUG), pytest.raises(TeacherUnavailable, match="HTTP 401") as info:
            _backend(cfg).score(_batch())
    assert secret not in str(info.value) and secret not in caplog.text
    composed = kdlib.compose([f"teacher.model={tiny_llama}", "teacher/backend=served", "teacher.signal.kind=topk",
                              "teacher.backend.api_key_env=KDLIB_TEST_SERVED_KEY"])
    text = OmegaConf.to_yaml(OmegaConf.structured(composed))
    assert "KDLIB_TEST_SERVED_KEY" in text and secret not in text
    monkeypatch.delenv("KDLIB_TEST_SERVED_KEY")
    with pytest.raises(ModelError, match="api_key_env=KDLIB_TEST_SERVED_KEY: that environment variable is not set"):
        _backend(cfg)


@pytest.mark.parametrize("overrides, message", [
    ([], "teacher/backend=served sends teacher.signal=topk only; teacher.signal.kind=hidden needs"),
    (["teacher.signal.kind=sampled"], "teacher.signal.kind=sampled needs a backend that returns it"),
    (["teacher.signal.kind=topk", "pipeline.colocate=true"], "pipeline.colocate needs a teacher backend that can sleep"),
    (["teacher.signal.kind=topk", "teacher.from_student=true"], "teacher.from_student needs a teacher backend that loads"),
    (["teacher.signal.kind=topk", "teacher.backend.url=localhost:30000"], "teacher.backend.url must be http(s)://"),
    (["teacher.signal.kind=topk", "teacher.backend.url=http://h:1/v1"], "teacher.backend.url is the server's base"),
    (["teacher.signal.kind=topk", "teacher.backend.concurrency=0"], "teacher.backend.concurrency must be >= 1"),
])
def test_impossible_combinations_are_refused_at_composition(overrides, message):
    import kdlib

    with pytest.raises(ConfigError) as info:
        kdlib.compose(["teacher/backend=served"] + overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("keys, key, expected", [
    ("ids", "token_id:99999", "token id 99999 is beyond the teacher's vocabulary of 384"),
    ("text", "no such token text", "key 'no such token text' is not the text of any token of the teacher's tokenizer"),
])
def test_a_token_the_teachers_tokenizer_lacks_is_one_line(tiny_llama, keys, key, expected):
    if keys == "ids":
        others = [f"token_id:{i}" for i in range(3)]
    else:  # three real token texts beside the unknown one
        from transformers import AutoTokenizer

        others = AutoTokenizer.from_pretrained(tiny_llama).batch_decode([[i] for i in (300, 301, 302)])
    entry = {key: -0.1, **{other: -1.0 - i for i, other in enumerate(others)}}
    answer = {"choices": [{"index": i, "logprobs": {"top_logprobs": [None] + [entry] * 12}} for i in range(3)]}
    with LoopbackServer(tiny_llama) as server:
        server.faults.append(("json", answer))
        backend = _backend(_served(tiny_llama, server.url, token_keys=TokenKeys(keys)))
        with pytest.raises(TeacherUnavailable) as info:
            backend.score(_batch())
    assert expected in str(info.value) and server.url in str(info.value) and "\n" not in str(info.value)
