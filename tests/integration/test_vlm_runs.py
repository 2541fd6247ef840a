"""Image+text distillation through the whole pipeline (local launcher): off-policy and on-policy runs,
the teacher worker and transport against full-logit KD, the teacher cache, the saved student, and
the one-line errors of bad images and impossible combinations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import kdlib
from kdlib.config import DataConfig, StudentConfig
from kdlib.controller.assembly import uncached_samples
from kdlib.data.formats import detect_format
from kdlib.data.images import open_image
from kdlib.data.multimodal import data_root, row_to_vision_conversation
from kdlib.data.sources import load_rows
from kdlib.errors import ConfigError
from kdlib.models.vlm import build_vlm, image_probe, vision_parameters
from kdlib.runner import built
from kdlib.workers.student import StudentShare
from kdlib.demo.text import write_jsonl
from kdlib.demo.vlm import make_image

FAMILIES = ["idefics3", "gemma3"]


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _option(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def _initial_student(overrides: list[str]):
    return build_vlm(StudentConfig(model=_option(overrides, "student.model"), num_layers=2), torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_offpolicy_run_learns_and_the_saved_student_loads_with_its_processor_and_generates(family, vlm_overrides):
    overrides = vlm_overrides(family)
    result = kdlib.run(kdlib.compose(overrides + ["algorithm.kd_ratio=1.0", "train.max_steps=4", "train.lr=3e-3"]))
    rows = _rows(result)
    assert len(rows) == 4 and all(r["loss"] > 0 and r["transport_bytes"] > 0 for r in rows)
    assert result.eval_after["kl"] < result.eval_before["kl"]

    # the student directory loads as a real checkpoint: AutoProcessor (the student's own image
    # settings, not the teacher's) and AutoModelForImageTextToText, and it generates about an image
    processor = AutoProcessor.from_pretrained(result.student_dir)
    own = AutoProcessor.from_pretrained(_option(overrides, "student.tokenizer" if family == "idefics3" else "student.model"))
    teacher = AutoProcessor.from_pretrained(_option(overrides, "teacher.model"))
    assert processor.image_processor.to_dict() == own.image_processor.to_dict() != teacher.image_processor.to_dict()
    model = AutoModelForImageTextToText.from_pretrained(result.student_dir).eval()
    assert model.config.get_text_config().num_hidden_layers == 2
    # student.freeze_vision (the default): the vision side is the initial one, the language model moved
    initial = _initial_student(overrides)
    for (name, saved), (_, start) in zip(vision_parameters(model), vision_parameters(initial), strict=True):
        assert torch.equal(saved, start), name
    assert not torch.equal(model.get_output_embeddings().weight, initial.get_output_embeddings().weight)
    probe = image_probe(processor)
    with torch.no_grad():
        out = model.generate(**probe, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, probe["input_ids"].shape[1] + 5)
    assert isinstance(processor.decode(out[0, probe["input_ids"].shape[1]:]), str)


def _chats(data_file: str, indices: list[int]):
    """The conversations and opened images of rows ``indices``, parsed independently of kdlib's batching."""
    cfg = DataConfig(train=data_file)
    source = load_rows(data_file, split="train", key="data.train")
    fmt = detect_format(list(source.rows.column_names), cfg, "x")
    chats = [row_to_vision_conversation(source.rows[i], fmt, cfg, data_root(source.name), "x") for i in indices]
    return chats, [[open_image(ref, "x") for ref in chat.images] for chat in chats]


def _full_logits(model_dir: str, processor_dir: str, chats, images, tokens, student: bool, overrides) -> torch.Tensor:
    """float64 logits at the loss positions from the model's own processor over the whole chats."""
    model = (_initial_student(overrides) if student else AutoModelForImageTextToText.from_pretrained(model_dir)).double()
    processor = AutoProcessor.from_pretrained(processor_dir)
    texts = [processor.apply_chat_template(chat.template_messages(), tokenize=False) for chat in chats]
    inputs = processor(text=texts, images=images, add_special_tokens=False, padding=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    length = tokens.input_ids.shape[1]
    assert torch.equal(inputs["input_ids"][:, :length] * tokens.attention_mask, tokens.input_ids * tokens.attention_mask)
    with torch.no_grad():
        return model.eval()(**inputs).logits[:, :length][tokens.loss_mask]


@pytest.mark.parametrize("family", FAMILIES)
def test_kd_through_the_teacher_worker_and_transport_equals_full_logit_kd(family, vlm_overrides):
    """The micro-batch leaves the controller with image references; the teacher worker lays out its
    own pixels (higher resolution), scores and publishes hidden states; the student worker lays out
    its pixels and recomputes the teacher's logits with the teacher's head. The held-out KL it sums
    equals KL between the two models' full logits on their processors' own batched calls."""
    overrides = vlm_overrides(family) + ["transport.dtype=float32"]
    with built(kdlib.compose(overrides), run_dir=None) as loop:
        samples = loop.pipeline.data.train[:4]  # one image, two images, text only, two turns
        batch = loop.pipeline.data.collate(samples)
        assert batch.teacher is not None and batch.teacher.input_ids.shape[1] > batch.student.input_ids.shape[1]
        assert batch.student.images.count == 4  # references travel, pixels do not
        assert batch.student.vision is None or not batch.student.vision.has_images
        (result,) = loop.pipeline.teacher.gather_forward(loop.pipeline.teacher.submit_forward([[batch]]))
        (evaluated,) = loop.pipeline.students.evaluate([StudentShare([batch], result.handles, [1.0])])
        sums = evaluated.sums
    chats, images = _chats(_option(overrides, "data.train"), [s.index for s in samples])
    teacher_dir = _option(overrides, "teacher.model")
    student_dir = _option(overrides, "student.model")
    student_processor = _option(overrides, "student.tokenizer") if family == "idefics3" else student_dir
    t = _full_logits(teacher_dir, teacher_dir, chats, images, batch.teacher, False, overrides)
    s = _full_logits(student_dir, student_processor, chats, images, batch.student, True, overrides)
    log_t, log_s = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    reference = (log_t.exp() * (log_t - log_s)).sum().item()
    assert sums.tokens == batch.n_loss_tokens and reference > 1.0
    assert sums.kl == pytest.approx(reference, rel=1e-5)


def test_onpolicy_run_samples_answers_about_the_images(vlm_overrides):
    overrides = vlm_overrides("gemma3") + [
        "+recipe=onpolicy", "rollout.max_new_tokens=6", "train.max_steps=2", "eval.before=false",
    ]
    result = kdlib.run(kdlib.compose(overrides))
    rows = _rows(result)
    assert [r["on_policy"] for r in rows] == [1.0, 1.0] and all(r["loss"] > 0 for r in rows)
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 and all(0 < r["response_tokens"] <= 6 for r in rollouts)
    assert any("<image>" in m["content"] for r in rollouts for m in r["prompt"])  # prompts about pictures


def test_teacher_cache_on_vlm_samples_is_bit_identical_to_the_live_teacher(vlm_overrides, tmp_path):
    from safetensors.torch import load_file

    common = vlm_overrides("idefics3") + ["teacher.dtype=bfloat16"]  # bf16 teacher and wire: what a real cache holds
    live = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'live'}"]))
    cached = common + [f"teacher.cache={tmp_path / 'cache'}"]
    kdlib.run(kdlib.compose(cached + ["+recipe=cache_teacher", f"output_dir={tmp_path / 'fill'}"]))
    cfg = kdlib.compose(cached + [f"output_dir={tmp_path / 'read'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        assert loop.pipeline.teacher is None  # every sample covered: no teacher model, no teacher-side images
    reading = kdlib.run(cfg)
    for a, b in zip(_rows(live), _rows(reading), strict=True):
        assert b["teacher_cached_batches"] == b["micro_batches"]
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert a[key] == b[key], key
    assert live.eval_before == reading.eval_before and live.eval_after == reading.eval_after
    wa, wb = load_file(live.student_dir / "model.safetensors"), load_file(reading.student_dir / "model.safetensors")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)

    # the same chats with one picture changed: those samples are new keys, computed by the teacher
    data = Path(_option(common, "data.train"))
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in data.parent.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    make_image(64, 48, seed=99).save(changed / "img0.png")
    eval_data = Path(_option(common, "data.eval"))
    moved = [o for o in cached if not o.startswith(("data.train", "data.eval"))]
    cfg = kdlib.compose(moved + [f"data.train={changed / data.name}", f"data.eval={changed / eval_data.name}"])
    with built(cfg, run_dir=tmp_path / "probe2") as loop:
        samples = loop.pipeline.data.train + loop.pipeline.data.eval
        users = sum(any(ref.path.name == "img0.png" for ref in s.images) for s in samples)
        assert 0 < users < len(samples)
        assert uncached_samples(loop.pipeline.cache, loop.pipeline.data) == users  # exactly the samples that show the changed picture
        assert loop.pipeline.teacher is not None


def test_bad_image_through_the_cli_is_one_line(vlm_overrides, vlm_images, tmp_path):
    rows = [json.loads(line) for line in Path(_option(vlm_overrides("idefics3"), "data.train")).read_text().splitlines()]
    rows[1]["messages"][1]["content"][0]["image"] = "missing.png"
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    for path in vlm_images.values():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    overrides = [o for o in vlm_overrides("idefics3") if not o.startswith(("data.", "output_dir"))]
    command = [sys.executable, "-m", "kdlib.cli", *overrides, f"data.train={data}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("kdlib: error:")]
    assert lines == [f"kdlib: error: data.train: {data}, row 2: image file not found: {tmp_path / 'missing.png'}"]
    dropped = kdlib.run(kdlib.compose(overrides + [f"data.train={data}", "data.bad_images=drop", "train.max_steps=1",
                                                   "data.eval=null", f"output_dir={tmp_path / 'drop'}"]))
    report = json.loads((dropped.run_dir / "data_report.json").read_text())["train"]
    assert report["dropped"] == {"image not found": 1} and report["kept"] == len(rows) - 1


def test_impossible_combinations_are_one_line_config_errors(vlm_overrides, tiny_llama, tmp_path):
    overrides = vlm_overrides("idefics3")
    cases = {
        "is a vision-language model but student.model=.* is text-only": [f"student.model={tiny_llama}", "student.tokenizer=null"],
        "is text-only but student.model=.* is a vision-language model": [f"teacher.model={tiny_llama}"],
        r"train.packing=true is not supported for vision-language models": ["train.packing=true"],
        r"data.teacher_input_key \(privileged context\) is not supported": ["data.teacher_input_key=hint"],
        r"mode=generate does not support vision-language models yet": ["+recipe=generate"],
    }
    for message, extra in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            kdlib.run(kdlib.compose(overrides + extra))
        assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_the_vlm_quickstart_recipe_runs_and_the_student_learns_its_teacher(tmp_path):
    """``kdlib +recipe=vlm_quickstart`` as shipped: assets built on first use, 30 steps of pure KD;
    the training KD loss and the held-out KL(teacher || student) fall by a quarter at least."""
    result = kdlib.run(kdlib.compose(["+recipe=vlm_quickstart", "logging.progress=false", f"output_dir={tmp_path / 'demo'}"]))
    kd = [row["kd_loss"] for row in _rows(result)]
    assert len(kd) == 30 and sum(kd[-5:]) < 0.75 * sum(kd[:5])
    assert result.eval_after["kl"] < 0.75 * result.eval_before["kl"]
    assert (result.run_dir / "plots" / "loss.png").is_file()


def test_gradient_checkpointing_of_a_vlm_student_changes_nothing(vlm_overrides, tmp_path):
    common = vlm_overrides("gemma3") + ["data.shuffle=false", "eval.before=false", "train.max_steps=2"]
    plain = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'plain'}"]))
    checkpointed = kdlib.run(kdlib.compose(common + ["student.gradient_checkpointing=true", f"output_dir={tmp_path / 'gc'}"]))
    for a, b in zip(_rows(plain), _rows(checkpointed), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
