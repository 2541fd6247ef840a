"""What composition settles and rejects before anything loads: auto values, capabilities, loss
parameters, and the step count."""

from __future__ import annotations

import pytest

import kdlib
from kdlib.config import Precision
from kdlib.errors import ConfigError
from kdlib.hardware import Bf16Support, bf16_support


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16."""

    def set_kind(native: bool) -> None:
        reason = "CPU with AVX512_BF16" if native else "CPU without AVX-512-BF16 or AMX (AVX2)"
        monkeypatch.setattr("kdlib.hardware.bf16_support", lambda device: Bf16Support(native, reason))

    return set_kind


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(cpu_kind, native):
    cpu_kind(native)
    cfg = kdlib.compose(["device=cpu"])  # the default job: teacher dtype auto, student autocast auto
    assert cfg.teacher.dtype is (Precision.bfloat16 if native else Precision.float32)
    assert cfg.student.autocast is native
    assert cfg.student.dtype is Precision.float32  # master weights stay float32 either way
    reason = "AVX512_BF16" if native else "AVX2"
    assert reason in cfg.auto_choices["teacher.dtype"] and reason in cfg.auto_choices["student.autocast"]


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_precision_wins(cpu_kind, native):
    cpu_kind(native)
    cfg = kdlib.compose(["device=cpu", "teacher.dtype=float32", "student.autocast=true", "student.dtype=bfloat16"])
    assert (cfg.teacher.dtype, cfg.student.autocast, cfg.student.dtype) == (Precision.float32, True, Precision.bfloat16)
    assert "teacher.dtype" not in cfg.auto_choices and "student.autocast" not in cfg.auto_choices


def test_bf16_detection_reads_the_cpu_flags_and_onednn(monkeypatch):
    import torch

    bf16_support.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert not bf16_support("cpu").native
        bf16_support.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
        support = bf16_support("cpu")
        assert not support.native and "ONEDNN_MAX_CPU_ISA" in support.reason
        bf16_support.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
        assert bf16_support("cpu").native
    finally:
        bf16_support.cache_clear()


@pytest.mark.parametrize("overrides, message", [
    (["loss=jsd", "loss.beta=2.0"], "loss=jsd: jsd beta must be in [0, 1], got 2.0"),
    (["loss=akl", "loss.alpha=-0.5"], "loss=akl: akl alpha must be in [0, 1]"),
    (["loss=hrl", "loss.topk=0"], "loss=hrl: hrl topk must be >= 1"),
    (["algorithm.kd_ratio=1.5"], "algorithm.kd_ratio must be in [0, 1]"),
    (["student.autocast=maybe"], "student.autocast: expected true, false or auto"),
    (["train.packing=maybe"], "train.packing: expected true, false or auto"),
    (["+recipe=onpolicy", "onpolicy.lmbda=2"], "onpolicy.lmbda must be in [0, 1]"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0"),
])
def test_bad_values_fail_at_composition(overrides, message):
    with pytest.raises(ConfigError) as info:
        kdlib.compose(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_packing_auto_packs_text_runs_and_pads_image_runs(tiny_overrides, vlm_overrides):
    """train.packing=auto (the default) is settled when the run's models are known: packed for a
    text run, padded for a vision-language run and for an on-policy run whose attention computes
    across packed samples; an explicit value is kept as given."""
    from kdlib.config.resolve import resolve

    text = kdlib.compose([o for o in tiny_overrides if not o.startswith("train.packing=")])
    assert text.train.packing == "auto"
    resolve(text, models=True)
    assert text.train.packing is True and text.auto_choices["train.packing"].startswith("true: text models")
    image = resolve(kdlib.compose(vlm_overrides("idefics3")), models=True)
    assert image.train.packing is False and "vision-language" in image.auto_choices["train.packing"]
    onpolicy = resolve(kdlib.compose([o for o in tiny_overrides if not o.startswith("train.packing=")]
                                     + ["+recipe=onpolicy"]), models=True)
    assert onpolicy.train.packing is True  # packed_sdpa (the default) attends per sample
    plain = resolve(kdlib.compose([o for o in tiny_overrides if not o.startswith("train.packing=")]
                                  + ["+recipe=onpolicy", "student.attn_implementation=sdpa"]), models=True)
    assert plain.train.packing is False and "on-policy" in plain.auto_choices["train.packing"]
    explicit = resolve(kdlib.compose(tiny_overrides), models=True)  # train.packing=false
    assert explicit.train.packing is False and "train.packing" not in explicit.auto_choices


def test_a_user_loss_is_checked_by_running_it(monkeypatch):
    from kdlib.losses import LOSSES, register_loss

    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))

    @register_loss("picky_test_loss")
    def picky(student_logits, teacher_logits, *, sharpness: float = 1.0):
        if sharpness <= 0:
            raise ValueError(f"sharpness must be positive, got {sharpness}")
        return (student_logits - teacher_logits).pow(2).mean(-1) * sharpness

    assert kdlib.compose(["loss=picky_test_loss"]).loss.sharpness == 1.0
    with pytest.raises(ConfigError, match="loss=picky_test_loss: sharpness must be positive, got -2.0"):
        kdlib.compose(["loss=picky_test_loss", "loss.sharpness=-2"])


def test_a_missing_backend_capability_fails_at_composition(monkeypatch):
    from kdlib.backends import TEACHER_BACKENDS, TeacherCapabilities

    monkeypatch.setattr(TEACHER_BACKENDS, "_entries", dict(TEACHER_BACKENDS._entries))
    TEACHER_BACKENDS.register("frozen_test", "kdlib.backends.hf.teacher:HFTeacherBackend", info=TeacherCapabilities())
    assert kdlib.compose(["teacher.backend.name=frozen_test"]).teacher.backend.name == "frozen_test"
    with pytest.raises(ConfigError, match="pipeline.colocate needs a teacher backend that can sleep and wake"):
        kdlib.compose(["teacher.backend.name=frozen_test", "pipeline.colocate=true"])
    with pytest.raises(ConfigError, match="teacher.from_student needs a teacher backend that loads weights"):
        kdlib.compose(["teacher.backend.name=frozen_test", "+recipe=self_distill"])
    with pytest.raises(ConfigError, match="unknown teacher backend 'nope'; choose one of: frozen_test, hf"):
        kdlib.compose(["teacher.backend.name=nope"])


@pytest.mark.parametrize("overrides, message", [
    (["student.lora.r=-1"], "student.lora: r must be >= 0"),
    (["student.lora.r=4", "student.lora.alpha=0"], "student.lora: alpha must be positive"),
    (["student.lora.r=4", "student.lora.dropout=1.0"], r"student.lora: dropout must be in \[0, 1\)"),
    (["student.lora.r=4", "student.lora.target_modules=[]"], "student.lora: target_modules is empty"),
    (["student.freeze.first_layers=-1"], "student.freeze: first_layers must be >= 0"),
    (["student.freeze.embeddings=true", "student.lora.r=4"], "student.freeze: has no effect with student.lora"),
    (["student.transforms=[lora,nope]"], "unknown student transform 'nope'; choose from: freeze, lora"),
    (["student.transforms=[lora,lora]"], "lists a transform twice"),
    (["logging.trackers=[mlflow]"], "logging.trackers: unknown tracker 'mlflow'; choose from: tensorboard, wandb"),
    (["logging.trackers=[wandb,wandb]"], "logging.trackers lists a tracker twice"),
    (["logging.tracker_samples=-1"], "logging.tracker_samples must be >= 0"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode"),
])
def test_bad_transform_and_tracker_options_fail_at_composition(overrides, message):
    with pytest.raises(ConfigError, match=message):
        kdlib.compose(overrides)


@pytest.mark.parametrize("package, needed_by, message", [
    ("peft", ["student.lora.r=8"], r"student.lora: LoRA needs the peft package: pip install 'kdlib\[lora\]'"),
    ("wandb", ["logging.trackers=[tensorboard,wandb]"],
     r"logging.trackers: wandb needs the wandb package: pip install 'kdlib\[trackers\]'"),
    ("tensorboard", ["logging.trackers=[tensorboard]"], r"tensorboard needs the tensorboard package"),
])
def test_a_missing_optional_package_fails_at_composition_only_when_needed(monkeypatch, package, needed_by, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=message):
        kdlib.compose(needed_by)
    kdlib.compose([])  # the default config needs none of them
