"""Several teachers in the other modes: per-teacher caches, teachers taking turns, privileged
prompts per teacher, a self-distillation teacher, cross-tokenizer routing and ensembles, on-policy.

Each is checked against the one-teacher run it must equal where one exists (every sample routed to
one teacher), bit for bit.
"""

from __future__ import annotations

import json

import pytest

import kdlib
from kdlib.demo.text import write_jsonl
from kdlib.runner import built

from test_multi_teacher import losses, named, routed_rows, same_run


def rows_of(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def mixed(tmp_path):
    """Train and held-out rows, every third routed to ``coder``, the rest to the default."""
    train = write_jsonl(tmp_path / "mixed" / "train.jsonl", routed_rows(16, 0, lambda i: "coder" if i % 3 == 0 else None))
    held = write_jsonl(tmp_path / "mixed" / "eval.jsonl", routed_rows(6, 1, lambda i: "coder" if i % 3 == 0 else None))
    return [f"data.train={train}", f"data.eval={held}", "routing.key=expert", "train.max_steps=2"]


def test_each_teacher_fills_and_reads_its_own_cache(tiny_overrides, tiny_qwen3, mixed, tmp_path):
    common = tiny_overrides + mixed + named("coder", tiny_qwen3)
    caches = [f"teacher.cache={tmp_path / 'cache_a'}", f"teachers.coder.cache={tmp_path / 'cache_b'}"]
    live = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'live'}"]))
    filled = kdlib.run(kdlib.compose(common + caches + ["mode=cache", f"output_dir={tmp_path / 'fill'}"]))
    assert filled.metrics["samples_computed"] == 22
    cfg = kdlib.compose(common + caches + [f"output_dir={tmp_path / 'read'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        assert loop.pipeline.teachers.groups == {}  # both caches cover their samples: no model loaded
    read = kdlib.run(cfg)
    same_run(live, read)
    assert live.eval_after == read.eval_after
    assert all(r["teacher_cached_batches"] == r["micro_batches"] for r in rows_of(read))
    # a cache made by another teacher is refused, as for one teacher
    wrong = [f"teacher.cache={tmp_path / 'cache_b'}", f"teachers.coder.cache={tmp_path / 'cache_a'}"]
    with pytest.raises(kdlib.errors.ConfigError, match="cache"):
        kdlib.run(kdlib.compose(common + wrong + [f"output_dir={tmp_path / 'wrong'}"]))


def test_teachers_taking_turns_train_as_teachers_held_together(tiny_overrides, tiny_qwen3, mixed, tmp_path):
    common = tiny_overrides + mixed + named("coder", tiny_qwen3)
    together = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'together'}"]))
    cfg = kdlib.compose(common + ["routing.take_turns=true", f"output_dir={tmp_path / 'turns'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        teachers = loop.pipeline.teachers
        assert len(teachers.loaded) == 1  # one model in memory at a time
        loop.start(1)
        loop.step(next(loop.sample_batches()), 1)
        assert len(teachers.loaded) == 1 and teachers.turns >= 1
    turns = kdlib.run(cfg)
    same_run(together, turns)
    assert together.eval_after == turns.eval_after


def test_privileged_prompt_per_teacher(tiny_overrides, tiny_llama, tiny_qwen3, tmp_path):
    data = routed_rows(16, 0, lambda i: "coder")
    for row in data:
        row["hint"] = "Answer in one short sentence: " + [m for m in row["messages"] if m["role"] == "user"][-1]["content"]
    path = write_jsonl(tmp_path / "hinted.jsonl", data)
    common = tiny_overrides + [f"data.train={path}", "data.eval=null", "train.max_steps=2"]
    single = kdlib.run(kdlib.compose(common + ["data.teacher_input_key=hint", f"output_dir={tmp_path / 'single'}"]))
    routed = kdlib.run(kdlib.compose(common + [
        f"teacher.model={tiny_qwen3}", "routing.key=expert", *named("coder", tiny_llama), "+routing.input_keys.coder=hint",
        f"output_dir={tmp_path / 'routed'}",
    ]))
    same_run(single, routed)
    plain = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'plain'}"]))
    assert losses(plain) != losses(single)  # the hint does reach the teacher


def test_a_self_distillation_teacher_among_others(tiny_overrides, mixed, tmp_path):
    result = kdlib.run(kdlib.compose(tiny_overrides + mixed + [
        "+teacher@teachers.coder=smollm2", "teachers.coder.from_student=true", "teachers.coder.dtype=float32",
        "teachers.coder.model=${student.model}",
    ]))
    assert result.eval_after["teacher/coder/kl"] >= 0 and result.eval_after["teacher/teacher/kl"] > 0


@pytest.fixture
def xtok(tiny_overrides, unigram_tokenizer_dir):
    return tiny_overrides + [f"student.tokenizer={unigram_tokenizer_dir}", "algorithm=marginal", "train.max_steps=2",
                             "eval.before=false"]


def test_cross_tokenizer_ensemble_weighing_one_teacher_is_that_teacher(xtok, tiny_qwen3, tmp_path):
    single = kdlib.run(kdlib.compose(xtok + [f"output_dir={tmp_path / 'single'}"]))
    ensemble = kdlib.run(kdlib.compose(xtok + [
        *named("other", tiny_qwen3), "+ensemble@routing.ensembles.both=mixture",
        "routing.ensembles.both.members=[teacher,other]", "routing.ensembles.both.weights=[1,0]",
        "routing.default=both", f"output_dir={tmp_path / 'ensemble'}",
    ]))
    same_run(single, ensemble)


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_an_ensemble_of_a_teacher_with_itself_is_that_teacher(combine, xtok, tiny_overrides, tiny_llama, tmp_path):
    """Members on the same rows with the same distribution: any weights give the teacher's target
    (up to rounding), off the student's tokens and on them."""
    for name, common in (("xtok", xtok), ("same", tiny_overrides + ["train.max_steps=2", "eval.before=false"])):
        single = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / name / 'single'}"]))
        ensemble = kdlib.run(kdlib.compose(common + [
            *named("twin", tiny_llama), f"+ensemble@routing.ensembles.both={combine}",
            "routing.ensembles.both.members=[teacher,twin]", "routing.ensembles.both.weights=[0.3,0.7]",
            "routing.default=both", f"output_dir={tmp_path / name / 'ensemble'}",
        ]))
        assert losses(ensemble) == pytest.approx(losses(single), rel=1e-5), name


def test_cross_tokenizer_routing_of_two_teachers(xtok, tiny_qwen3, mixed, tmp_path):
    result = kdlib.run(kdlib.compose(xtok + mixed + named("coder", tiny_qwen3) + ["eval.before=true"]))
    for name in ("teacher", "coder"):  # each teacher's own held-out rows, before and after
        key = f"teacher/{name}/bits_per_byte"
        assert result.eval_after[key] < result.eval_before[key]
    assert result.eval_after["teacher/teacher/tokens"] + result.eval_after["teacher/coder/tokens"] == \
        result.eval_after["tokens"]


def test_onpolicy_routing_scores_each_rollout_with_its_prompts_teacher(tiny_overrides, tiny_llama, tiny_qwen3, tmp_path):
    def onpolicy(route, extra):
        prompts = write_jsonl(tmp_path / f"prompts_{len(extra)}.jsonl", routed_rows(4, 7, route))
        return kdlib.compose(tiny_overrides + [
            "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.epochs=2",
            "train.max_steps=2", "rollout.max_new_tokens=8", "rollout.temperature=0", "eval.before=false", *extra,
        ])

    single = kdlib.run(onpolicy(lambda i: "coder", [f"output_dir={tmp_path / 'single'}"]))
    routed = kdlib.run(onpolicy(lambda i: "coder", [
        f"teacher.model={tiny_qwen3}", "routing.key=expert", *named("coder", tiny_llama), f"output_dir={tmp_path / 'r'}",
    ]))
    same_run(single, routed)
    mixed = kdlib.run(onpolicy(lambda i: "coder" if i % 2 else None, [
        "routing.key=expert", *named("coder", tiny_qwen3), f"output_dir={tmp_path / 'mixed'}",
    ]))
    assert all(r["routed/coder/samples"] == 2 and r["routed/teacher/samples"] == 2 for r in rows_of(mixed))


@pytest.mark.ray
def test_ray_routed_run_matches_local(tiny_overrides, tiny_qwen3, mixed, tmp_path):
    """A worker group per teacher and two FSDP2 students on Ray == the local routed run."""
    import os

    import ray
    import torch
    from safetensors.torch import load_file

    common = tiny_overrides + mixed + named("coder", tiny_qwen3) + ["eval.before=false"]
    local = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'local'}"]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        on_ray = kdlib.run(kdlib.compose(common + [
            "launcher=ray", "transport=ray", "student.num_workers=2", f"output_dir={tmp_path / 'ray'}",
        ]))
        # each teacher is placed by its own resources: the coder's cannot be met on this cluster
        with pytest.raises(kdlib.errors.ConfigError, match=r"^launcher.teachers.coder: 1 teachers.coder worker"):
            kdlib.run(kdlib.compose(common + [
                "launcher=ray", "+placement@launcher.teachers.coder=default", "+launcher.teachers.coder.resources={absent: 1}",
                "launcher.placement_timeout_s=1", f"output_dir={tmp_path / 'unplaced'}",
            ]))
    finally:
        ray.shutdown()
    for a, b in zip(rows_of(local), rows_of(on_ray), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "routed/coder/loss", "routed/teacher/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        for key in ("routed/coder/samples", "routed/teacher/loss_tokens", "teacher/coder/tokens"):
            assert b[key] == a[key], key
    for name in ("teacher", "coder"):
        assert on_ray.eval_after[f"teacher/{name}/kl"] == pytest.approx(local.eval_after[f"teacher/{name}/kl"], rel=1e-4)
    wa, wb = load_file(local.student_dir / "model.safetensors"), load_file(on_ray.student_dir / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_resume_restores_the_resident_teacher(tiny_overrides, tiny_qwen3, mixed, tmp_path):
    common = tiny_overrides + mixed + named("coder", tiny_qwen3) + [
        "routing.take_turns=true", "train.max_steps=3", "eval.before=false", "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
    ]
    full = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'full'}"]))
    step_1 = full.run_dir / "checkpoints" / "step_1"
    saved = json.loads((step_1 / "trainer_state.json").read_text())["resident_teacher"]
    assert saved in ("teacher", "coder")
    cfg = kdlib.compose(common + [f"train.resume={step_1}", f"output_dir={tmp_path / 'resumed'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        teachers = loop.pipeline.teachers
        teachers.turn("teacher" if saved == "coder" else "coder")  # another teacher resident before resuming
        assert loop.resume() == 1
        assert teachers.resident == saved and teachers.loaded == {saved}
    resumed = kdlib.run(cfg)
    assert losses(resumed) == losses(full)[1:]


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_an_ensemble_across_two_tokenizer_families_trains(combine, tiny_overrides, tiny_llama, unigram_tokenizer_dir,
                                                           tmp_path):
    """A byte-level BPE teacher and a metaspace Unigram teacher, combined on a BPE student's tokens
    where their byte-aligned groups start: the loss falls on a repeated batch, and each teacher's
    held-out bits per byte of the student fall."""
    from kdlib.demo.text import build_model

    metaspace = tmp_path / "meta_teacher"
    build_model(metaspace, arch="llama", tokenizer_dir=unigram_tokenizer_dir, num_layers=2, seed=5)
    data = write_jsonl(tmp_path / "train8.jsonl", routed_rows(8, 3, lambda i: None))
    result = kdlib.run(kdlib.compose(tiny_overrides + [
        "algorithm=marginal", f"data.train={data}", "train.global_batch_size=8", "train.max_steps=3",
        "train.warmup_ratio=0", "train.lr=3e-3", *named("meta", metaspace),
        f"+ensemble@routing.ensembles.both={combine}", "routing.ensembles.both.members=[teacher,meta]",
        "routing.default=both",
    ]))
    steps = losses(result)
    assert steps[0] > steps[1] > steps[2]
    for name in ("teacher", "meta"):
        key = f"teacher/{name}/bits_per_byte"
        assert result.eval_after[key] < result.eval_before[key]


def test_a_refreshed_self_teacher_among_others(tiny_overrides, tiny_qwen3, tmp_path):
    """The run's own teacher follows the student (update_freq) while samples are routed: with
    every sample on it, the run is the one-teacher run; mixed with a named teacher, it runs."""
    refreshed = ["teacher.from_student=true", "teacher.update_freq=1", "train.max_steps=3", "eval.before=false"]

    def routed_data(route) -> list[str]:
        path = write_jsonl(tmp_path / f"train_{len(list(tmp_path.iterdir()))}.jsonl", routed_rows(24, 0, route))
        return [f"data.train={path}", "data.eval=null"]

    data = routed_data(lambda i: None)
    single = kdlib.run(kdlib.compose(tiny_overrides + data + refreshed + [f"output_dir={tmp_path / 'single'}"]))
    routed = kdlib.run(kdlib.compose(tiny_overrides + data + refreshed + [
        "routing.key=expert", *named("coder", tiny_qwen3), f"output_dir={tmp_path / 'routed'}",
    ]))
    same_run(single, routed)
    assert all(r["teacher_update_seconds"] > 0 for r in rows_of(routed))
    mixed = kdlib.run(kdlib.compose(tiny_overrides + routed_data(lambda i: "coder" if i % 2 else None) + refreshed + [
        "routing.key=expert", *named("coder", tiny_qwen3), f"output_dir={tmp_path / 'mixed'}",
    ]))
    assert all(r["routed/coder/samples"] > 0 and r["routed/teacher/samples"] > 0 for r in rows_of(mixed))


def test_colocated_teachers_sleep_and_wake_without_changing_the_run(tiny_overrides, tiny_qwen3, mixed, tmp_path):
    common = tiny_overrides + mixed + named("coder", tiny_qwen3) + ["eval.before=false"]
    plain = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'plain'}"]))
    colocated = kdlib.run(kdlib.compose(common + ["pipeline.colocate=true", f"output_dir={tmp_path / 'colocated'}"]))
    same_run(plain, colocated)


def test_onpolicy_ensemble_weighing_one_teacher_is_that_teacher(tiny_overrides, tiny_qwen3, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", routed_rows(4, 7, lambda i: None))
    common = tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.epochs=2",
        "train.max_steps=2", "rollout.max_new_tokens=8", "rollout.temperature=0", "eval.before=false",
    ]
    single = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'single'}"]))
    ensemble = kdlib.run(kdlib.compose(common + [
        *named("other", tiny_qwen3), "+ensemble@routing.ensembles.both=product",
        "routing.ensembles.both.members=[teacher,other]", "routing.ensembles.both.weights=[1,0]",
        "routing.default=both", f"output_dir={tmp_path / 'ensemble'}",
    ]))
    same_run(single, ensemble)
    mixed = kdlib.run(kdlib.compose(common + [
        *named("other", tiny_qwen3), "+ensemble@routing.ensembles.both=mixture",
        "routing.ensembles.both.members=[teacher,other]", "routing.default=both", f"output_dir={tmp_path / 'mixed'}",
    ]))
    assert all(r["routed/both/samples"] == 4 and r["teacher/other/tokens"] > 0 for r in rows_of(mixed))


@pytest.mark.parametrize("algorithm", [["algorithm=reward_kd", "algorithm.reward_weight=1"], ["algorithm=opd"]])
def test_rewards_with_routed_teachers(tiny_overrides, tiny_llama, tiny_qwen3, tmp_path, algorithm):
    """The reward objectives with several teachers: every prompt routed to one teacher is the
    one-teacher run bit for bit (OPD's dense advantage is the routed teacher's log-ratio), and a
    mixed routing trains with each teacher's loss on its own prompts' rollouts."""
    def run(route, extra, name):
        prompts = write_jsonl(tmp_path / f"prompts_{name}.jsonl", routed_rows(8, 7, route))
        return kdlib.run(kdlib.compose(tiny_overrides + [
            "+recipe=onpolicy", "loss=rkl", f"data.train={prompts}", "data.eval=null", "train.global_batch_size=4",
            "train.micro_batch_size=2", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
            "rollout.temperature=1.0", "train.max_steps=2", "eval.before=false", *algorithm,
            "reward=length", "reward.target_tokens=2", "reward.coef=0.25", *extra, f"output_dir={tmp_path / name}",
        ]))

    single = run(lambda i: "coder", [], "single")
    routed = run(lambda i: "coder", [f"teacher.model={tiny_qwen3}", "routing.key=expert", *named("coder", tiny_llama)],
                 "routed")
    same_run(single, routed)
    mixed = run(lambda i: "coder" if i % 2 else None, ["routing.key=expert", *named("coder", tiny_qwen3)], "mixed")
    for row in rows_of(mixed):
        assert row["routed/coder/samples"] == 2 and row["routed/teacher/samples"] == 2
        assert row["pg_loss"] != 0 and "reward_mean" in row
        # each teacher's objective includes its rows' policy-gradient term, not only the KD term
        assert row["routed/coder/loss"] != row["routed/coder/kd_loss"] or row["routed/teacher/loss"] != \
            row["routed/teacher/kd_loss"]
