"""Cross-tokenizer distillation through kdlib.run on tiny models, with the local launcher.

Teacher: the tiny Llama with the byte-level BPE (ChatML). Student: the same model pruned to two
layers and given the metaspace Unigram tokenizer (BOS, split digits, byte fallback) with
``student.tokenizer=...``, so its embedding and head are vocabulary-transferred when it is built:
the cross-tokenizer recipe in miniature. Every method runs end to end off-policy, one on-policy;
with identical tokenizers ``overlap`` and ``gold`` are vanilla KD step by step; resume restores
DSKD's projectors; a teacher cache (every loss row stored) serves the methods' rows.
"""

from __future__ import annotations

import json

import pytest
import torch

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl


@pytest.fixture
def repeat_data(tmp_path):
    """8 rows and a global batch of 8: every step sees the same batch, so the loss must fall."""
    return write_jsonl(tmp_path / "train8.jsonl", chat_rows(8, seed=3))


@pytest.fixture
def xtok_overrides(tiny_overrides, unigram_tokenizer_dir, repeat_data):
    return tiny_overrides + [
        f"student.tokenizer={unigram_tokenizer_dir}", f"data.train={repeat_data}", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_ratio=0", "train.lr=3e-3",
    ]


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", [
    ["algorithm=overlap"],
    ["algorithm=uld"],
    ["algorithm=uld", "algorithm.merge_groups=true", "train.packing=true", "train.max_tokens_per_micro_batch=400"],
    ["algorithm=gold", "loss=jsd"],
    ["algorithm=dskd", "algorithm.projector_lr=1e-3"],
])
def test_each_method_distils_across_tokenizers(algorithm, xtok_overrides, unigram_tokenizer_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = kdlib.run(kdlib.compose(xtok_overrides + algorithm))
    rows = _rows(result)
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(r["kd_loss"] > 0 and r["ce_loss"] > 0 for r in rows)
    before, after = result.eval_before, result.eval_after
    assert set(after) == {"ce", "top1_agreement", "bits_per_byte", "teacher_bits_per_byte", "ece", "tokens"}
    assert after["bits_per_byte"] < before["bits_per_byte"]
    assert after["teacher_bits_per_byte"] == before["teacher_bits_per_byte"] > 0
    text = (result.run_dir / "eval.txt").read_text()
    assert "student bits per byte" in text and "teacher bits per byte" in text

    # the exported student has the new vocabulary, its tokenizer, and nothing of the algorithm
    unigram = AutoTokenizer.from_pretrained(str(unigram_tokenizer_dir))
    student = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert student.config.vocab_size == len(unigram) == student.get_input_embeddings().weight.shape[0]
    assert AutoTokenizer.from_pretrained(result.student_dir).get_vocab() == unigram.get_vocab()
    assert not [k for k in load_file(result.student_dir / "model.safetensors") if "projector" in k or "algorithm" in k]
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 8 and report["train"]["unaligned_student_tokens"] == 0


@pytest.mark.parametrize("method", ["overlap", "gold", "marginal"])
def test_identical_tokenizers_reduce_to_vanilla_kd_step_by_step(method, tiny_overrides, tmp_path):
    """Same tokenizer, every group 1:1: the whole pipeline gives vanilla KD's losses and metrics."""
    common = tiny_overrides + ["train.max_steps=3", "algorithm.kd_ratio=0.5"]
    vanilla = kdlib.run(kdlib.compose(common + ["algorithm=vanilla", f"output_dir={tmp_path / 'vanilla'}"]))
    other = kdlib.run(kdlib.compose(common + [f"algorithm={method}", f"output_dir={tmp_path / method}"]))
    for a, b in zip(_rows(vanilla), _rows(other), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), key
        assert b["transport_bytes"] == a["transport_bytes"]  # every row is a 1:1 pair: all are sent
    for key in ("ce", "top1_agreement", "bits_per_byte", "teacher_bits_per_byte"):
        assert other.eval_after[key] == pytest.approx(vanilla.eval_after[key], rel=1e-5), key
    assert "kl" in vanilla.eval_after and "kl" not in other.eval_after  # per-token KL: one tokenizer only


def test_resume_restores_the_dskd_projectors(xtok_overrides, tmp_path):
    """The projectors train at their own learning rate; a resumed run continues exactly, which it
    could not if they restarted from their initialisation."""
    import torch.distributed.checkpoint as dcp

    common = xtok_overrides + [
        "algorithm=dskd", "algorithm.projector_lr=2e-2", "train.max_steps=3", "eval.before=false",
        "train.checkpoint_every=1", "train.keep_checkpoints=5",
    ]
    full = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'full'}"]))
    step_1 = full.run_dir / "checkpoints" / "step_1"
    keys = dcp.FileSystemReader(str(step_1)).read_metadata().state_dict_metadata
    assert any("algorithm_modules.dskd_projectors.t2s.weight" in k for k in keys)
    assert any("algorithm_modules.dskd_projectors.s2t.weight" in k for k in keys)
    resumed = kdlib.run(kdlib.compose(common + [f"train.resume={step_1}", f"output_dir={tmp_path / 'resumed'}"]))
    rows_full, rows_resumed = _rows(full), _rows(resumed)
    assert [r["step"] for r in rows_resumed] == [2, 3]
    for a, b in zip(rows_full[1:], rows_resumed, strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key

    # and without them the run would differ: projectors restarted from their initialisation
    fresh = kdlib.run(kdlib.compose(
        [o for o in common if not o.startswith("train.max_steps")]
        + ["train.max_steps=2", "algorithm.projector_lr=1e-12", f"output_dir={tmp_path / 'frozen'}"]
    ))
    assert _rows(fresh)[1]["kd_loss"] != pytest.approx(rows_full[1]["kd_loss"], rel=1e-4)


def test_teacher_cache_serves_every_method_its_rows(xtok_overrides, tmp_path):
    """The cache stores every teacher loss row; the student picks the rows its method reads, so a
    cached run equals the live one."""
    common = xtok_overrides + ["algorithm=gold", "train.max_steps=2"]
    live = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'live'}"]))
    cache = tmp_path / "cache"
    kdlib.run(kdlib.compose(common + ["+recipe=cache_teacher", f"teacher.cache={cache}", f"output_dir={tmp_path / 'fill'}"]))
    cached = kdlib.run(kdlib.compose(common + ["algorithm=overlap", f"teacher.cache={cache}", f"output_dir={tmp_path / 'c1'}"]))
    overlap = kdlib.run(kdlib.compose(common + ["algorithm=overlap", f"output_dir={tmp_path / 'o'}"]))
    gold_cached = kdlib.run(kdlib.compose(common + [f"teacher.cache={cache}", f"output_dir={tmp_path / 'c2'}"]))
    for live_run, cached_run in ((live, gold_cached), (overlap, cached)):
        for a, b in zip(_rows(live_run), _rows(cached_run), strict=True):
            assert b["loss"] == a["loss"] and b["kd_loss"] == a["kd_loss"]
            assert b["teacher_cached_batches"] == b["micro_batches"]
        assert cached_run.eval_after == live_run.eval_after


def test_onpolicy_across_tokenizers(tiny_overrides, unigram_tokenizer_dir):
    """The student samples in its own tokens; the teacher scores the text in its own tokens."""
    result = kdlib.run(kdlib.compose(tiny_overrides + [
        "+recipe=onpolicy", "algorithm=overlap", f"student.tokenizer={unigram_tokenizer_dir}", "train.max_steps=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=12", "rollout.print_every=0",
    ]))
    rows = _rows(result)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["on_policy"] == 1.0 and "rollout_unaligned_tokens" in r for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["kd_loss"] > 0 for r in rows)
    assert {"bits_per_byte", "teacher_bits_per_byte", "top1_agreement"} <= set(result.eval_after)
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8


@pytest.mark.slow
def test_the_cross_tokenizer_recipe_on_smollm2(tmp_path):
    """+recipe=cross_tokenizer in a few steps: SmolLM2 teaches its pruned copy that reads the demo
    tokenizer (vocabulary transferred when the student is built)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = kdlib.run(kdlib.compose([
        "+recipe=cross_tokenizer", "train.max_steps=2", "data.max_samples=16", "data.eval_max_samples=4",
        "logging.progress=false", f"output_dir={tmp_path / 'run'}",
    ]))
    before, after = result.eval_before, result.eval_after
    assert after["bits_per_byte"] < before["bits_per_byte"]
    assert 0 < after["teacher_bits_per_byte"] < after["bits_per_byte"]
    student = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert student.config.vocab_size == 4096 and student.config.num_hidden_layers == 20  # the default preset, pruned by importance
    assert len(AutoTokenizer.from_pretrained(result.student_dir)) == 4096
