"""SentencePiece-style tokenizers built with the ``tokenizers`` library: metaspace, byte fallback.

kdlib's default teacher (SmolLM2) uses a byte-level BPE (``Ġ`` for a space, no byte fallback, 49,152
tokens). A genuinely different tokenizer exercises every path of cross-tokenizer distillation:
this module builds the Llama-2 / Mistral kind: spaces become ``▁`` (Metaspace), digits are split
one by one, characters outside the vocabulary fall back to ``<0xNN>`` byte tokens, a BOS token
``<s>`` starts every chat, and the chat template is ChatML-like (``<|im_start|>role\\n ...
<|im_end|>\\n``) without a default system prompt. The model is a BPE or a Unigram trained on the
given texts. BPE training is deterministic, so the same texts give the same ``tokenizer.json``
(the demo tokenizer shipped in ``kdlib/data/builtin/demo_tokenizer`` is rebuilt byte for byte by
``scripts/build_demo_tokenizer.py``). Unigram training in ``tokenizers`` is not: the same pieces
come out, but pieces of equal score in any order and scores that vary by ~1e-4 between processes,
so the learned pieces are ordered by their text to give every process the same ids (a
segmentation may still differ where two readings' scores are within that noise); the tests build
small ones the same way.
"""

from __future__ import annotations

import json
from typing import Iterable

BOS, EOS, PAD, UNK = "<s>", "<|im_end|>", "<pad>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, PAD, "<|im_start|>", EOS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def build_metaspace_tokenizer(
    texts: Iterable[str],
    *,
    model: str = "bpe",
    vocab_size: int = 4096,
    prepend_scheme: str = "never",
    split_digits: bool = True,
):
    """A fast tokenizer (``PreTrainedTokenizerFast``) trained on ``texts``.

    ``model`` is ``bpe`` or ``unigram``; ``vocab_size`` counts the special and the 256 byte tokens
    (a small corpus may give a Unigram fewer pieces). ``prepend_scheme`` is the Metaspace one:
    ``never`` (Gemma-like), ``first`` (Llama-2-like phantom space before the text).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learned = vocab_size - len(_BYTE_TOKENS)
    if learned <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the special and byte tokens")
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                      show_progress=False)
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=learned, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                          show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer model {model!r}; choose bpe or unigram")
    parts = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)]
    if split_digits:
        parts.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(parts)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok = Tokenizer.from_str(_with_byte_fallback(tok.to_str()))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _with_byte_fallback(spec_json: str) -> str:
    """The trained tokenizer with the 256 ``<0xNN>`` byte tokens added (after the special tokens)
    and byte fallback switched on."""
    spec = json.loads(spec_json)
    model = spec["model"]
    n_special = len(SPECIAL_TOKENS)
    if model["type"] == "BPE":
        ordered = sorted(model["vocab"].items(), key=lambda item: item[1])
        pieces = [t for t, _ in ordered[:n_special]] + _BYTE_TOKENS + [t for t, _ in ordered[n_special:]]
        model["vocab"] = {t: i for i, t in enumerate(pieces)}
        ids = model["vocab"]
    else:  # Unigram: [piece, log-probability] pairs; bytes score below every learned piece
        floor = min(score for _, score in model["vocab"]) - 10.0
        learned = sorted(model["vocab"][n_special:], key=lambda piece: piece[0])
        pieces = model["vocab"][:n_special] + [[t, floor] for t in _BYTE_TOKENS] + learned
        model["vocab"] = pieces
        model["unk_id"] = 0
        ids = {p[0]: i for i, p in enumerate(pieces)}
    model["byte_fallback"] = True
    for added in spec["added_tokens"]:
        added["id"] = ids[added["content"]]
    return json.dumps(spec)
