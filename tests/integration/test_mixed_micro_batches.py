"""Micro-batches holding the samples of several teachers (routing.mix_micro_batches, kdlib.routing.MixedRoute).

The student runs one forward over a mixed micro-batch and each part (the samples of one teacher or
ensemble) gets its own loss on its own rows. In float64 that must be the sum of the parts trained
as micro-batches of their own: the same loss and the same gradients, to rounding. A run mixing
routes also makes fewer micro-batches than one that does not, and trains the same (float32: close).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import kdlib
from kdlib.algorithms import ALGORITHMS
from kdlib.algorithms.routed import RoutedLoss, TeacherSide
from kdlib.controller.teachers import routed_data
from kdlib.models.head import lm_head_of
from kdlib.routing import MixedRoute, route_parts
from kdlib.runner import resolved
from kdlib.teacher_output import TeacherOutput

ROUTES = ("teacher", "coder", "both")


@pytest.fixture
def three_routes(tmp_path):
    from kdlib.demo.text import chat_rows, write_jsonl

    rows = chat_rows(24, seed=0)
    for i, row in enumerate(rows):
        row["expert"] = ROUTES[i % 3]
    return write_jsonl(tmp_path / "three" / "train.jsonl", rows)


def _overrides(tiny_overrides, tiny_qwen3, train) -> list[str]:
    return tiny_overrides + [
        f"data.train={train}", "data.eval=null", "routing.key=expert",
        "+teacher@teachers.coder=smollm2", f"teachers.coder.model={tiny_qwen3}", "teachers.coder.dtype=float32",
        "+ensemble@routing.ensembles.both=mixture", "routing.ensembles.both.members=[teacher,coder]",
        "routing.ensembles.both.weights=[0.3,0.7]", "routing.mix_micro_batches=true",
    ]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
def test_a_mixed_micro_batch_is_the_sum_of_its_parts_in_float64(packing, tiny_overrides, tiny_llama, tiny_qwen3,
                                                                three_routes):
    cfg = resolved(kdlib.compose(_overrides(tiny_overrides, tiny_qwen3, three_routes) + [f"train.packing={packing}"]))
    data = routed_data(cfg, prompts=False, responses=True)
    assert data.mix_routes
    plan, batches = data.step_batches(data.train[:8], cfg.train, 1)
    mixed = [b for b in batches if isinstance(b.route, MixedRoute)]
    assert mixed and {t for b in mixed for t in b.route.targets} == set(ROUTES)

    student = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    heads = {
        "teacher": lm_head_of(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float64)).detached(),
        "coder": lm_head_of(AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float64)).detached(),
    }
    routes = RoutedLoss(cfg.algorithm, cfg.loss, {n: TeacherSide(h) for n, h in heads.items()}, student)

    def output(part, member) -> TeacherOutput:  # random teacher hidden states (never all zeros)
        rows = part.route.view(part, member).n_loss_tokens
        return TeacherOutput(hidden=torch.randn(rows, heads[member].hidden_size, generator=generator,
                                                dtype=torch.float64))

    def outputs(part):
        route = part.route
        return {m: output(part, m) for m in route.members} if route.is_ensemble else output(part, route.teacher)

    normaliser = float(sum(b.n_loss_tokens for b in batches))
    for batch in mixed:
        teacher = [outputs(part) for part in route_parts(batch)]
        student.zero_grad()
        parts = routes.part_losses(student, batch, teacher, normaliser)
        total = sum(terms.loss for _, terms in parts)
        total.backward()
        together = _grads(student)
        assert [t for t, _ in parts] == batch.route.targets

        student.zero_grad()
        alone = [routes.compute_loss(student, part, out, normaliser) for part, out in zip(batch.route.parts, teacher)]
        sum(terms.loss for terms in alone).backward()
        apart = _grads(student)

        for (_, terms), own in zip(parts, alone):
            torch.testing.assert_close(terms.loss, own.loss, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(terms.kd_sum, own.kd_sum, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(terms.ce_sum, own.ce_sum, rtol=1e-12, atol=1e-12)
        assert together.keys() == apart.keys() and together
        for name in together:
            torch.testing.assert_close(together[name], apart[name], rtol=1e-10, atol=1e-13, msg=name)


def _metrics(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_mixing_routes_makes_fewer_micro_batches_and_trains_the_same(tiny_overrides, tiny_qwen3, three_routes,
                                                                          tmp_path):
    common = _overrides(tiny_overrides, tiny_qwen3, three_routes) + ["train.max_steps=1", "train.micro_batch_size=4"]
    runs = {mix: kdlib.run(kdlib.compose(common + [f"routing.mix_micro_batches={str(mix).lower()}",
                                                    f"output_dir={tmp_path / str(mix)}"]))
            for mix in (True, False)}
    mixed, apart = (_metrics(runs[mix])[0] for mix in (True, False))
    assert mixed["micro_batches"] < apart["micro_batches"]  # 8 samples in 4s: 2 against one per route and part
    for key in ["loss", "kd_loss", "grad_norm", *(f"routed/{t}/{m}" for t in ROUTES for m in ("loss", "samples"))]:
        assert mixed[key] == pytest.approx(apart[key], rel=1e-5), key
    for member in ("teacher", "coder"):
        assert mixed[f"teacher/{member}/tokens"] == apart[f"teacher/{member}/tokens"]


def test_an_algorithm_class_without_a_loss_is_refused_and_one_with_compute_loss_only_never_mixes():
    from kdlib.algorithms import Algorithm

    with pytest.raises(TypeError, match="must override loss_of or compute_loss"):
        type("NoLoss", (Algorithm,), {})

    class WholeLoss(Algorithm):  # a plugin's algorithm computing its loss in compute_loss alone
        def compute_loss(self, student, batch, teacher, normaliser):
            raise AssertionError("never runs")

    assert not WholeLoss.shares_forward()
    assert all(ALGORITHMS.get(name).shares_forward() for name in ALGORITHMS.names())
