"""Cross-tokenizer distillation: teacher and student with different tokenizers.

- :mod:`~kdlib.xtok.token_bytes`, :mod:`~kdlib.xtok.offsets`: the exact text bytes of each token.
- :mod:`~kdlib.xtok.alignment`, :mod:`~kdlib.xtok.groups`: byte-offset groups between the two
  tokenisations of a response, per sample and as micro-batch tensors.
- :mod:`~kdlib.xtok.vocab`, :mod:`~kdlib.xtok.transfer`: the matched sub-vocabulary; vocabulary
  transfer for a student that gets a new tokenizer.
- :mod:`~kdlib.xtok.overlap`, :mod:`~kdlib.xtok.uld`, :mod:`~kdlib.xtok.gold`,
  :mod:`~kdlib.xtok.dskd`, :mod:`~kdlib.xtok.marginal`: the five methods, each whole in its file
  (config, registered algorithm, per-chunk term on the shared frame of :mod:`~kdlib.xtok.method`,
  evaluated by :mod:`kdlib.losses.engine`).
- :mod:`~kdlib.xtok.metrics`: bits per byte and top-1 agreement.
- :mod:`~kdlib.xtok.metaspace`: SentencePiece-style tokenizers (the demo tokenizer, tests).

Importing this package imports nothing heavy; import the submodules you need. See
docs/cross_tokenizer.md.
"""
