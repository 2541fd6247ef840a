"""The language-model head as data: what turns a last-layer hidden state into logits.

Hidden-state KD rests on one identity: ``lm_head(final_hidden) == model(...).logits``. This module
extracts that head from a transformers model as a small dataclass (weight, optional bias, logit
scale, soft-cap) that can be shipped to the student workers, and checks the identity on a probe
input when a model is loaded, so an architecture with some other output transform fails loudly
instead of silently distilling the wrong distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn


class HeadMismatchError(RuntimeError):
    """The model's logits are not ``head(final hidden state)``."""


@dataclass
class LMHead:
    """logits = softcap(scale * (hidden @ weight.T + bias)); weight is [vocab, hidden]."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    # Multiplier on the logits (Cohere's logit_scale); 1.0 for most models.
    logit_scale: float = 1.0
    # Gemma-2 style tanh soft-capping: cap * tanh(logits / cap); None = off.
    softcap: Optional[float] = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for ``hidden`` [..., H] in the head's dtype."""
        out = nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        return self.finish(out)

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the scale and soft-cap that come after the matrix product."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def detached(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LMHead":
        """A copy that shares no autograd graph (what a teacher ships to the students)."""
        weight = self.weight.detach().to(device=device, dtype=dtype)
        bias = None if self.bias is None else self.bias.detach().to(device=device, dtype=dtype)
        return replace(self, weight=weight, bias=bias)


def lm_head_of(model: nn.Module) -> LMHead:
    """The output head of a transformers causal LM, with its architecture's logit transform."""
    linear = model.get_output_embeddings()
    if linear is None or not hasattr(linear, "weight"):
        raise HeadMismatchError(f"{type(model).__name__} has no output embedding layer")
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LMHead(
        weight=linear.weight,
        bias=getattr(linear, "bias", None),
        logit_scale=float(scale) if scale is not None else 1.0,
        softcap=float(softcap) if softcap else None,
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The base transformer whose ``last_hidden_state`` is the post-norm input of the head."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        raise HeadMismatchError(f"cannot find the decoder of {type(model).__name__}")
    return base


def multimodal_body_of(model: nn.Module) -> nn.Module:
    """The base model of a vision-language model (vision tower, projector and language model): its
    ``last_hidden_state``, given token ids and pixel inputs, is the post-norm input of the head."""
    body = model.base_model
    if body is model:
        raise HeadMismatchError(f"cannot find the base model of {type(model).__name__}")
    return body


@torch.no_grad()
def verify_lm_head(
    model: nn.Module,
    head: LMHead,
    *,
    probe_len: int = 8,
    rtol: float = 1e-3,
    probe_inputs: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Fail unless ``head(decoder(x).last_hidden_state)`` reproduces ``model(x).logits``.

    Runs one short forward pass on fixed token ids; the relative tolerance absorbs bf16 rounding.
    ``probe_inputs`` (a VLM's processor outputs: token ids with image tokens, pixel tensors) replace
    the random ids, and the hidden states then come from the whole multimodal base model, so the
    check covers the images' path into the language model too.
    """
    device = head.weight.device
    if probe_inputs is None:
        vocab = min(head.vocab_size, getattr(model.config.get_text_config(), "vocab_size", head.vocab_size))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, probe_len), generator=generator).to(device)
        reference = model(input_ids=ids).logits.float()
        hidden = decoder_of(model)(input_ids=ids).last_hidden_state
    else:
        reference = model(**probe_inputs, use_cache=False).logits.float()
        hidden = multimodal_body_of(model)(**probe_inputs, use_cache=False).last_hidden_state
    recomputed = head.logits(hidden).float()
    if recomputed.shape != reference.shape:
        raise HeadMismatchError(
            f"{type(model).__name__}: head gives logits of shape {tuple(recomputed.shape)}, "
            f"the model {tuple(reference.shape)}"
        )
    err = (recomputed - reference).abs().max().item()
    scale = reference.abs().max().item() + 1e-6
    if err > rtol * scale:
        raise HeadMismatchError(
            f"{type(model).__name__}: logits are not lm_head(final hidden state) "
            f"(max abs error {err:.3g} vs logit scale {scale:.3g}); this architecture applies an "
            "output transform kdlib does not know, so hidden-state KD would be wrong for it"
        )


def tied_head_keys(model: nn.Module) -> set[str]:
    """State-dict names of an output head that shares its weight with the input embeddings (a
    tied head): one tensor, which a saved checkpoint holds once, under the embeddings' name;
    ``from_pretrained`` ties the head to it again. Empty when the head is untied."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return set()
    return {f"{name}.weight" for name, module in model.named_modules(remove_duplicate=False) if module is head}
