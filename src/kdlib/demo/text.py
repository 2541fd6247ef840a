"""Tiny random models and tokenizers, built from real transformers configs, for tests, benchmarks and
the project's tools (scripts/).

Everything here is created locally in a second or two and saved to a directory, then loaded by path
exactly as a real run loads a hub checkpoint; nothing touches the network. The tokenizer is a small
byte-level BPE trained on a fixed corpus, with a ChatML chat template (``chatml``) or a Llama-3-like
one (``llama3``), so chat rendering, loss masks and generation behave as with real models; a
metaspace Unigram with a BOS token (:func:`build_unigram_tokenizer`) is the different tokenizer of
cross-tokenizer tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_SPECIAL = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>", None),
    "llama3": (
        ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|begin_of_text|>",
    ),
}
_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student model to imitate a large teacher model.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "Two plus three equals five, and ten minus four equals six.",
    "def add(a, b):\n    return a + b\n",
    "Summarize the passage in one sentence, please.",
    "Translate 'good morning' into French: bonjour.",
    "You are a helpful assistant. Answer briefly and clearly.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "List three ideas for a weekend: hiking, reading, cooking.",
    "system user assistant hello thanks yes no maybe because therefore",
]


def build_tokenizer(directory: str | Path, *, template: str = "chatml", vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on :data:`CORPUS`, save it to ``directory``, return it."""
    specials, eos, pad, bos = _SPECIAL[template]
    fast = bpe_tokenizer(
        specials, vocab_size=vocab_size, eos_token=eos, pad_token=pad, bos_token=bos, additional_special_tokens=[]
    )
    fast.chat_template = _TEMPLATES[template]
    fast.save_pretrained(str(directory))
    return fast


def bpe_tokenizer(specials: list[str], *, vocab_size: int = 384, **token_kwargs):
    """A byte-level BPE trained on :data:`CORPUS` with ``specials`` first in the vocabulary, as a
    transformers fast tokenizer (``token_kwargs`` name its eos/pad/bos/... tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **token_kwargs)


def build_unigram_tokenizer(directory: str | Path, *, vocab_size: int = 600, prepend_scheme: str = "first"):
    """A metaspace Unigram (``▁`` spaces, digits split one by one, ``<0xNN>`` byte fallback, BOS
    ``<s>``, ChatML-like template) trained on :data:`CORPUS`, saved to ``directory``, returned.

    A tokenizer genuinely unlike :func:`build_tokenizer`'s byte-level BPE, for cross-tokenizer
    tests; ``prepend_scheme="first"`` adds Llama-2's phantom space before each text.
    """
    from kdlib.xtok.metaspace import build_metaspace_tokenizer

    tokenizer = build_metaspace_tokenizer(
        CORPUS * 4, model="unigram", vocab_size=vocab_size, prepend_scheme=prepend_scheme
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_model(
    directory: str | Path,
    *,
    arch: str = "llama",
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    tie_word_embeddings: bool = False,
    seed: int = 0,
):
    """A random causal LM of family ``arch`` (llama | qwen3), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else None
    common = dict(
        language_model_kwargs(tokenizer, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers),
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // 4, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose llama or qwen3")
    model = random_model(AutoModelForCausalLM, config, seed)
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return model


def language_model_kwargs(tokenizer, *, vocab_size: int | None = None, hidden_size: int = 64, num_layers: int = 4) -> dict:
    """Config values every tiny language model shares: its sizes and the tokenizer's special ids
    (the vocabulary is the tokenizer's unless ``vocab_size`` is given; 384 without a tokenizer)."""
    return dict(
        vocab_size=vocab_size or (len(tokenizer) if tokenizer is not None else 384),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else None,
    )


def random_model(auto_class, config, seed: int):
    """``auto_class.from_config(config)`` seeded, with a larger-than-default init (matrices drawn
    from N(0, 0.2^2)) so that random models have non-trivial outputs."""
    import torch

    torch.manual_seed(seed)
    model = auto_class.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.2)
    return model


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def chat_rows(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` varied single- and multi-turn chats in OpenAI ``messages`` format."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(CORPUS, 2)
        messages = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
        if i % 3 == 1:
            c, d = rng.sample(CORPUS, 2)
            messages = [{"role": "system", "content": "Answer briefly."}, *messages,
                        {"role": "user", "content": c}, {"role": "assistant", "content": d}]
        rows.append({"id": i, "messages": messages})
    return rows
