"""Student transforms: LoRA through peft (merged export == peft's own merge, bit for bit; only
adapters train; base weights untouched), freezing, the head lookup, a plugin transform (the
composition checks of their options are in test_composition_checks.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from kdlib.config import FreezeConfig, LoraConfig, StudentConfig
from kdlib.errors import ConfigError
from kdlib.models.head import decoder_of, lm_head_of, verify_lm_head
from kdlib.models.student import build_model, build_student

pytest.importorskip("peft")


def _student_cfg(model_dir, **lora) -> StudentConfig:
    return StudentConfig(model=str(model_dir), num_layers=3, lora=LoraConfig(**lora))


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero; give every adapter weight a non-zero value so merging does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _peft_merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's own merge of a copy: the reference for what consumers must receive."""
    return copy.deepcopy(model).merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_weights_equal_peft_merge_bit_for_bit(tiny_llama, dtype):
    cfg = _student_cfg(tiny_llama, r=4, alpha=8.0, modules_to_save=["lm_head"])
    cfg.dtype = dtype
    student = build_student(cfg, torch.device("cpu"))
    _randomise_adapters(student.model)
    state = {k: v.detach() for k, v in student.model.state_dict().items()}
    exported = student.plain_state(state)
    reference = _peft_merged_state(student.model)
    assert sorted(exported) == sorted(reference)
    changed = 0
    for key, tensor in reference.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
        changed += int(key.endswith("_proj.weight"))
    assert changed == 3 * 7  # every projection of the 3 kept layers is a merged weight
    # the names are the plain model's: a model built without LoRA takes them as they are
    plain = build_model(cfg, torch.device("cpu"))
    assert sorted(plain.state_dict()) == sorted(exported)


def test_only_adapters_train_and_base_weights_keep_their_dtype(tiny_llama):
    cfg = _student_cfg(tiny_llama, r=2)
    cfg.dtype = "bfloat16"
    student = build_student(cfg, torch.device("cpu"))
    trainable = {n: p for n, p in student.model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in student.model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())  # base weights as configured
    # r * (in + out) per adapted linear: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128,
    # down 128+64 = 1024 per layer; r = 2, 3 layers
    assert sum(p.numel() for p in trainable.values()) == 2 * 1024 * 3
    from kdlib.optim import build_optimizer
    from kdlib.config import TrainConfig

    optimizer = build_optimizer(student.model, TrainConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}


def test_zero_initialised_adapters_change_nothing(tiny_llama):
    cfg = _student_cfg(tiny_llama, r=4, dropout=0.1)
    student = build_student(cfg, torch.device("cpu"))
    plain = build_model(cfg, torch.device("cpu"))
    state = {k: v.detach() for k, v in student.model.state_dict().items()}
    exported = student.plain_state(state)
    for key, tensor in plain.state_dict().items():
        assert torch.equal(exported[key], tensor), key
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    student.model.eval()
    assert torch.equal(student.model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_head_lookup_and_decoder_work_through_peft(tiny_llama):
    student = build_student(_student_cfg(tiny_llama, r=4, modules_to_save=["lm_head"]), torch.device("cpu"))
    _randomise_adapters(student.model)
    model = student.model
    head = lm_head_of(model)
    trained_head = dict(model.named_parameters())["base_model.model.lm_head.modules_to_save.default.weight"]
    assert head.weight is trained_head  # the copy that trains, not the frozen original
    assert len(decoder_of(model).layers) == 3
    model.eval()
    verify_lm_head(model, head, rtol=1e-5)  # lm_head(final hidden) == logits with adapters active


def test_lora_targets_are_checked_against_the_model(tiny_llama, tiny_qwen3):
    device = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"\['lm_head'\] are not linear layers of the decoder blocks"):
        build_student(_student_cfg(tiny_llama, r=4, target_modules=["q_proj", "lm_head"]), device)
    with pytest.raises(ConfigError, match="no module named \\['nope'\\]"):
        build_student(_student_cfg(tiny_llama, r=4, modules_to_save=["nope"]), device)
    with pytest.raises(ConfigError, match="tied to its input embeddings"):
        build_student(_student_cfg(tiny_qwen3, r=4, modules_to_save=["lm_head"]), device)
    student = build_student(_student_cfg(tiny_llama, r=4, target_modules=["q_proj", "v_proj"]), device)
    adapted = {n.split(".")[-1] for n, p in student.model.named_parameters() if p.requires_grad}
    assert adapted == {"weight"} and sum(p.requires_grad for p in student.model.parameters()) == 3 * 2 * 2


def test_freeze_transform_freezes_embeddings_and_first_layers(tiny_qwen3):
    cfg = StudentConfig(model=str(tiny_qwen3), freeze=FreezeConfig(embeddings=True, first_layers=2))
    student = build_student(cfg, torch.device("cpu"))
    model = student.model
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad  # tied to the embeddings
    layers = decoder_of(model).layers
    assert all(not p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[2:] for p in layer.parameters())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    assert student.plain_state(state).keys() == state.keys()
    with pytest.raises(ConfigError, match="first_layers=9, but the student has 4 decoder layers"):
        build_student(StudentConfig(model=str(tiny_qwen3), freeze=FreezeConfig(first_layers=9)), torch.device("cpu"))


def test_a_plugin_transform_runs_in_the_listed_order(tiny_llama):
    from kdlib.models.transforms import StudentTransform, register_student_transform

    seen = []

    @register_student_transform("test_freeze_norms")
    class FreezeNorms(StudentTransform):
        def apply(self, model):
            seen.append(sorted(n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)[:1])
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.requires_grad_(False)
            return model

    cfg = _student_cfg(tiny_llama, r=2)
    cfg.transforms = ["lora", "test_freeze_norms"]
    from kdlib.models.transforms import check_transforms

    check_transforms(cfg)  # a registered name passes the composition check
    student = build_student(cfg, torch.device("cpu"))
    assert seen and seen[0]  # it ran after LoRA: the adapters existed
    assert [type(t).__name__ for t in student.transforms] == ["LoraTransform", "FreezeNorms"]
    assert not any(p.requires_grad for n, p in student.model.named_parameters() if "norm" in n)


def test_modules_to_save_match_by_the_end_of_the_name_and_export_plainly(tiny_llama):
    """docs/lora.md's ``modules_to_save=[norm]``: peft wraps the final norm and every
    ``*_layernorm``; all of them train and the export is the plain model's, values included."""
    student = build_student(_student_cfg(tiny_llama, r=2, modules_to_save=["norm"]), torch.device("cpu"))
    _randomise_adapters(student.model)
    trained = [n for n, p in student.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert len(trained) == 1 + 2 * 3  # model.norm, and input/post-attention norms of 3 layers
    exported = student.plain_state({k: v.detach() for k, v in student.model.state_dict().items()})
    reference = _peft_merged_state(student.model)
    assert sorted(exported) == sorted(reference)
    assert all(torch.equal(exported[k], v) for k, v in reference.items())
    wrapped = dict(student.model.named_parameters())["base_model.model.model.norm.modules_to_save.default.weight"]
    assert torch.equal(exported["model.norm.weight"], wrapped.detach())
