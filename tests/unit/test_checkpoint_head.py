"""The teacher head read from checkpoint files equals the loaded model's head, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kdlib.config import ModelConfig, Precision
from kdlib.models.checkpoint_head import load_lm_head
from kdlib.models.head import lm_head_of
from kdlib.models.loading import load_causal_lm


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])  # untied head, tied embeddings
@pytest.mark.parametrize("dtype", [Precision.float32, Precision.bfloat16])
def test_head_from_files_equals_the_loaded_models_head(fixture, dtype, request):
    cfg = ModelConfig(model=str(request.getfixturevalue(fixture)), dtype=dtype)
    model = load_causal_lm(cfg, device=torch.device("cpu"))
    expected = lm_head_of(model)
    got = load_lm_head(cfg)
    assert got.weight.dtype == expected.weight.dtype
    assert torch.equal(got.weight, expected.weight.detach())
    assert got.bias is None and expected.bias is None
    assert (got.logit_scale, got.softcap) == (expected.logit_scale, expected.softcap)


def test_a_sharded_checkpoint_is_read_through_its_index(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    got = load_lm_head(ModelConfig(model=str(tmp_path)))
    assert torch.equal(got.weight, model.lm_head.weight.detach())


def test_missing_head_is_a_clear_error(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from kdlib.errors import ModelError

    for name in ("config.json",):
        (tmp_path / name).write_bytes((tiny_llama / name).read_bytes())
    state = load_file(tiny_llama / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="lm_head.weight"):
        load_lm_head(ModelConfig(model=str(tmp_path)))
