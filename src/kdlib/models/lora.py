"""LoRA students through peft: adapters on the decoder's linear layers, merged for every consumer.

``student.lora.r > 0`` wraps the loaded (and pruned) student with peft's ``get_peft_model``: each
targeted linear layer keeps its frozen base weight W (in the configured dtype) and gains a
trainable low-rank update, ``W x + (alpha / r) * B A x`` with B initialised to zero, so the first
forward pass is the plain model's. Only the adapters (and ``modules_to_save``) enter the optimizer.

Consumers never see peft's layout. :meth:`LoraTransform.plain_state` turns a full state dict of
the wrapped model (gathered from FSDP2 shards or not) into the plain transformers names, with each
adapted weight merged as ``W + transpose(B @ A) * scaling``, the same operations, in the same
order and dtypes, as peft's own ``merge_and_unload`` (a test checks bit equality). The rollout
engine and a self-distillation teacher receive those weights after every step; the saved
``student/`` is that merged model, and ``student_adapter/`` holds the adapter alone in peft's format
(with ``student_base/``, the pruned base it applies to, when the student was depth-pruned).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdlib.config.schema import StudentConfig
from kdlib.errors import ConfigError
from kdlib.models.head import tied_head_keys
from kdlib.models.head import decoder_of
from kdlib.models.transforms import State, StudentTransform

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter of a run
WRAPPER_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the model's own names


@dataclass(frozen=True)
class AdaptedLayer:
    """What merging one adapted linear layer needs besides its tensors."""

    scaling: float
    fan_in_fan_out: bool


class LoraTransform(StudentTransform):
    """``student.lora``: peft LoRA adapters; everything else of the student stays frozen."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__(cfg)
        self.layers: dict[str, AdaptedLayer] = {}  # peft module name -> merge facts
        self.saved_modules: list[str] = []  # peft module names of modules_to_save wrappers

    @classmethod
    def enabled(cls, cfg: StudentConfig) -> bool:
        return cfg.lora.r > 0

    @classmethod
    def check(cls, cfg: StudentConfig) -> None:
        lora = cfg.lora
        if lora.r < 0:
            raise ValueError(f"r must be >= 0 (0 = no LoRA), got {lora.r}")
        if not cls.enabled(cfg):
            return
        if lora.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {lora.alpha}")
        if not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {lora.dropout}")
        if lora.target_modules is not None and not lora.target_modules:
            raise ValueError("target_modules is empty; null adapts every linear layer of the decoder blocks")
        if importlib.util.find_spec("peft") is None:
            raise ValueError("LoRA needs the peft package: pip install 'kdlib[lora]'")

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        lora = self.cfg.lora
        targets = target_linear_names(model, lora.target_modules)
        check_saved_modules(model, lora.modules_to_save or [])
        peft_cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None, task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft reads a transformers attribute deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, peft_cfg)
        for name, module in wrapped.named_modules():
            if isinstance(module, LoraLayer):
                self.layers[name] = AdaptedLayer(float(module.scaling[ADAPTER]), bool(module.fan_in_fan_out))
            elif isinstance(module, ModulesToSaveWrapper):
                self.saved_modules.append(name)
        log.info("LoRA r=%d alpha=%g on %d linear layers (%s)%s", lora.r, lora.alpha, len(self.layers),
                 ", ".join(targets), f"; trained in full: {', '.join(lora.modules_to_save)}" if lora.modules_to_save else "")
        return wrapped

    def plain_state(self, state: State) -> State:
        """The merged weights under the plain model's names (adapters and peft wrappers gone)."""
        out: State = {}
        consumed: set[str] = set()
        for name, layer in self.layers.items():
            base_key, a_key, b_key = (f"{name}.base_layer.weight", f"{name}.lora_A.{ADAPTER}.weight",
                                      f"{name}.lora_B.{ADAPTER}.weight")
            out[_plain(f"{name}.weight")] = merged_weight(state[base_key], state[a_key], state[b_key], layer)
            consumed.update((base_key, a_key, b_key))
        for name in self.saved_modules:  # the trained copy replaces the original
            original, trained = f"{name}.original_module.", f"{name}.modules_to_save.{ADAPTER}."
            for key, tensor in state.items():
                if key.startswith(trained):
                    out[_plain(name + "." + key[len(trained):])] = tensor
                if key.startswith((original, trained)):
                    consumed.add(key)
        for key, tensor in state.items():
            if key not in consumed:
                out[_plain(key)] = tensor
        return out

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.get_base_model()

    def base_state(self, state: State) -> State:
        """The frozen base weights (adapters dropped, originals of modules_to_save) under plain names."""
        out: State = {}
        for key, tensor in state.items():
            if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key or f".modules_to_save.{ADAPTER}." in key:
                continue
            out[_plain(key.replace(".original_module.", "."))] = tensor
        return out

    def save(self, model: nn.Module, state: State, student_dir: Path) -> dict[str, Path]:
        """``student_adapter/`` in peft's format and, for a pruned student, ``student_base/``: the
        base the adapter applies to (the student.model checkpoint otherwise)."""
        from kdlib.models.loading import model_location

        outputs: dict[str, Path] = {}
        adapter_dir = student_dir.parent / "student_adapter"
        pruned = self.cfg.num_layers is not None or self.cfg.keep_layers is not None or self.cfg.prune.output
        if pruned:  # beside the adapter, not only in kdlib's cache (which a user may clear)
            base_dir = student_dir.parent / "student_base"
            plain = self.unwrap(model)
            base = self.base_state(state)
            for key in tied_head_keys(plain):  # one tensor, saved once
                base.pop(key, None)
            plain.save_pretrained(base_dir, state_dict=base)
            outputs["student_base"] = base_dir
            base_location = str(base_dir.resolve())
        else:
            base_location = model_location(self.cfg.model)
        model.peft_config[ADAPTER].base_model_name_or_path = base_location
        model.save_pretrained(adapter_dir, state_dict=state)
        outputs["student_adapter"] = adapter_dir
        return outputs


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
    """``base + transpose(B @ A) * scaling`` computed as peft's (unsafe) merge computes it: in
    float32 for bf16/fp16 adapters on the CPU, then added in place into a copy of ``base``."""
    cast = lora_b.device.type == "cpu" and lora_b.dtype in (torch.float16, torch.bfloat16)
    a, b = (lora_a.float(), lora_b.float()) if cast else (lora_a, lora_b)
    delta = b @ a
    if layer.fan_in_fan_out:
        delta = delta.T
    delta = delta * layer.scaling
    if cast:
        delta = delta.to(lora_b.dtype)
    merged = base.clone()
    merged += delta
    return merged


def target_linear_names(model: nn.Module, names: list[str] | None) -> list[str]:
    """The last name parts of the decoder blocks' linear layers to adapt (all of them for None);
    a name that is not a linear layer of the decoder blocks is a one-line error."""
    linear = sorted({n.rsplit(".", 1)[-1] for layer in decoder_of(model).layers
                     for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
    if names is None:
        if not linear:
            raise ConfigError(f"student.lora: {type(model).__name__} has no linear layer in its decoder blocks")
        return linear
    unknown = [n for n in names if n not in linear]
    if unknown:
        raise ConfigError(
            f"student.lora.target_modules: {unknown} are not linear layers of the decoder blocks "
            f"(those are: {', '.join(linear)}); train other modules in full with student.lora.modules_to_save"
        )
    return list(names)


def check_saved_modules(model: nn.Module, names: list[str]) -> None:
    """modules_to_save must exist; a head tied to the embeddings cannot be trained apart from them."""
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(f"student.lora.modules_to_save: no module named {missing} in {type(model).__name__}")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embeddings.weight:
        tied = {n for n, m in model.named_modules() if m is head or m is embeddings}
        if any(name.rsplit(".", 1)[-1] in names for name in tied):
            raise ConfigError(
                "student.lora.modules_to_save: the student's head is tied to its input embeddings, so "
                "neither can be trained apart from the other"
            )


def _plain(key: str) -> str:
    """A peft state-dict key under the plain model's name."""
    if key.startswith(WRAPPER_PREFIX):
        key = key[len(WRAPPER_PREFIX):]
    return key.replace(".base_layer.", ".")
