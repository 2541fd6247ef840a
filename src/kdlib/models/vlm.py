"""Vision-language models: loading with their processors, the image-aware forward to final hidden
states, the head check with images, depth pruning of the language model, a frozen vision side, and
the vision blocks a sharded student shards.

Whether a checkpoint is a VLM is read from its config (:func:`checkpoint_is_vision_language`);
every role that loads a model (:func:`kdlib.models.student.build_model`) takes this path for one.

The hidden-state design carries over unchanged: a VLM's multimodal base model (vision tower,
projector, language model) returns the language model's post-norm last hidden states, and its
``lm_head`` turns them into the logits, so the teacher ships hidden states at the loss positions
and the student recomputes the teacher's logits exactly as for text. :func:`verify_vlm_head`
checks that identity on a probe that holds an image, which covers how image features enter the
language model (DeepStack layers, bidirectional image attention, M-RoPE positions).

Depth pruning keeps a subset of the language model's decoder layers (:mod:`kdlib.models.pruning`);
the vision tower is untouched. Qwen3-VL adds DeepStack visual features after the first
``len(deepstack_visual_indexes)`` decoder layers; after pruning they go to the first kept layers.

A sharded (FSDP2) student gathers a vision block's parameters only when its vision tower runs; a
rank whose micro-batch has no image therefore runs the tower on a blank picture and adds 0 x the
result (the *idle pass*, :func:`vlm_final_hidden_states`), so all ranks' collectives line up.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator, Optional

import torch
from torch import nn

from kdlib.batch import TokenBatch, VisionInputs
from kdlib.config.schema import ModelConfig, Precision, StudentConfig
from kdlib.errors import ModelError, first_line
from kdlib.models.head import LMHead, decoder_of, lm_head_of, multimodal_body_of, verify_lm_head
from kdlib.models.loading import chat_template_text, load_pretrained, model_location, torch_dtype
from kdlib.models.pruning import prune_as_configured

log = logging.getLogger(__name__)


def is_vision_language(config) -> bool:
    """True for the config of a model with a vision tower (a ``vision_config`` sub-config)."""
    return getattr(config, "vision_config", None) is not None


def checkpoint_is_vision_language(cfg: ModelConfig) -> bool:
    """Whether ``cfg.model`` is a vision-language checkpoint, read from its config.json (a GGUF
    file is a text model); this decides how every role loads and feeds it."""
    return _is_vision_language_location(cfg.model, cfg.revision, cfg.trust_remote_code)


@functools.lru_cache(maxsize=32)
def _is_vision_language_location(spec: str, revision: Optional[str], trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    if spec.endswith(".gguf"):  # GGUF checkpoints are text models
        return False
    location = model_location(spec)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {spec!r}: {first_line(exc)}") from None
    return is_vision_language(config)


def decoder_layer_count(cfg: ModelConfig) -> int:
    """Decoder layers of ``cfg.model``'s (language) model, read from its config (no weights)."""
    from transformers import AutoConfig

    location = model_location(cfg.model)
    try:
        config = AutoConfig.from_pretrained(location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {cfg.model!r}: {first_line(exc)}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def load_processor(cfg: ModelConfig):
    """The model's processor (image processor + tokenizer + chat template), with the config's chat
    template and a pad token."""
    from transformers import AutoProcessor

    location = model_location(cfg.tokenizer or cfg.model)
    try:
        processor = AutoProcessor.from_pretrained(
            location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except ImportError as exc:  # transformers 5 builds video processors (Qwen-VL, SmolVLM) only with torchvision
        raise ModelError(
            f"cannot load the processor of {cfg.model!r}: {first_line(exc)} (install the torchvision "
            "build that matches your torch)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the processor of {cfg.model!r}: {first_line(exc)}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelError(f"{cfg.model!r} has no image processor and tokenizer ({type(processor).__name__})")
    if cfg.chat_template:
        processor.chat_template = chat_template_text(cfg.chat_template)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_vlm(cfg: ModelConfig, *, device: torch.device, location: Optional[str] = None) -> nn.Module:
    """A transformers image-text-to-text model in the configured dtype on ``device``."""
    from transformers import AutoModelForImageTextToText

    return load_pretrained(AutoModelForImageTextToText, cfg, device=device, location=location, what="vision-language model")


def build_vlm(cfg: ModelConfig, device: torch.device, *, dtype: Optional[Precision] = None) -> nn.Module:
    """``cfg``'s VLM on ``device``; a student config's depth pruning applies to the language model."""
    model = load_vlm(cfg, device=device)
    if isinstance(cfg, StudentConfig):
        keep = prune_as_configured(model, cfg.keep_layers, cfg.num_layers)
        deepstack = getattr(model.config.vision_config, "deepstack_visual_indexes", None) or []
        if keep is not None and len(keep) < len(deepstack):
            log.warning(
                "%d DeepStack visual features but only %d decoder layers kept: the last %d are unused",
                len(deepstack), len(keep), len(deepstack) - len(keep),
            )
    if dtype is not None:
        model.to(torch_dtype(dtype))
    return model


def vlm_final_hidden_states(model: nn.Module, tokens: TokenBatch, images: Optional[VisionInputs] = None) -> torch.Tensor:
    """Post-norm last-layer hidden states of the language model, [batch, length, hidden], with the
    images' features in place of their image tokens (``images``: the view's own by default).

    A view without images that carries ``idle_pixels`` (a sharded student) first runs the vision
    tower on them and adds 0 x their sum, so that every rank takes part in the vision blocks'
    collectives, forward and backward, in the same order whether or not its micro-batch has images.
    """
    if tokens.packed:
        raise ModelError("packed micro-batches are not supported for vision-language models; set train.packing=false")
    images = tokens.vision if images is None else images
    body = multimodal_body_of(model)
    extra: dict[str, torch.Tensor] = {}
    idle = None
    if images is not None:
        images = images.to(tokens.input_ids.device, pixel_dtype=model.dtype)
        extra = images.model_kwargs()
        if not images.has_images and images.idle_pixels is not None:
            idle = body.get_image_features(**images.idle_pixels.model_kwargs())
    out = body(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False, **extra)
    hidden = out.last_hidden_state
    if idle is not None:
        hidden = hidden + 0.0 * sum(t.sum() for t in _tensors(idle)).to(hidden.dtype)
    return hidden


def vlm_hidden_at_loss_positions(model: nn.Module, tokens: TokenBatch, images: Optional[VisionInputs] = None) -> torch.Tensor:
    """Final hidden states at ``tokens.loss_mask``, [n_loss_tokens, hidden], in (sample, position)
    order, as :func:`kdlib.models.forward.hidden_at_loss_positions` for text."""
    return vlm_final_hidden_states(model, tokens, images)[tokens.loss_mask]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a model output (nested tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def image_probe(processor, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """Processor outputs for a one-image chat (a generated 48x64 gradient), to probe a model with."""
    import numpy as np
    from PIL import Image

    ys, xs = np.mgrid[0:48, 0:64]
    pixels = np.stack([xs * 4, ys * 5, (xs + ys) * 2], axis=-1).astype("uint8")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=[[Image.fromarray(pixels, mode="RGB")]], add_special_tokens=False, return_tensors="pt")
    probe = {key: value.to(device) for key, value in out.items()}
    if dtype is not None:
        probe["pixel_values"] = probe["pixel_values"].to(dtype)
    return probe


def verify_vlm_head(model: nn.Module, processor, *, rtol: float = 1e-3) -> LMHead:
    """The model's head, after checking ``lm_head(final hidden) == logits`` on an image probe."""
    head = lm_head_of(model)
    verify_lm_head(model, head, rtol=rtol, probe_inputs=image_probe(processor, head.weight.device, model.dtype))
    return head


def vision_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters outside the language model and its head: the vision tower and its projector."""
    language = {id(p) for p in decoder_of(model).parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        language |= {id(p) for p in head.parameters()}
    return [(name, param) for name, param in model.named_parameters() if id(param) not in language]


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the vision side (the elements of every ``nn.ModuleList`` whose
    parameters all lie outside the language model: ``visual.blocks``, ``vision_model.encoder.layers``,
    Qwen3-VL's DeepStack mergers), each an FSDP2 unit of a sharded student."""
    vision = {id(param) for _, param in vision_parameters(model)}
    blocks: list[nn.Module] = []
    taken: set[int] = set()
    for _, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or id(module) in taken:
            continue
        params = [p for p in module.parameters()]
        if params and all(id(p) in vision for p in params):
            for block in module:
                if any(True for _ in block.parameters()):
                    blocks.append(block)
            taken.update(id(m) for m in module.modules())
    return blocks


def image_layout_for(cfg: ModelConfig, model: nn.Module, *, name: str):
    """The worker-side image processing of a loaded model (its processor's image side), or None
    for a text-only model."""
    if not is_vision_language(model.config):
        return None
    from kdlib.data.vision_inputs import ImageLayout

    return ImageLayout(load_processor(cfg), name=name)


def set_vision_trainable(model: nn.Module, trainable: bool) -> int:
    """Freeze (``trainable=False``, the student default) or unfreeze the vision tower and projector;
    returns how many parameter values that concerns."""
    params = vision_parameters(model)
    if not params:
        raise ModelError(f"{type(model).__name__} has no parameters outside its language model")
    for _, param in params:
        param.requires_grad_(trainable)
    return sum(param.numel() for _, param in params)
