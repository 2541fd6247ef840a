"""The one entry point of pruning: source model + calibration tokens + :class:`PruneConfig` in,
a saved Hugging Face checkpoint out.

A run calls :func:`prune_to_directory` once, before its workers start, and every worker then loads
the saved directory like any checkpoint (instead of each re-pruning at load). The directory holds
the pruned model and its tokenizer or processor (``AutoModelForCausalLM.from_pretrained`` /
``AutoModelForImageTextToText`` load it with transformers alone), ``scores.json`` (every score,
the plan and the config), ``importance.png``, and ``prune.json`` (the :class:`PruneResult`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from kdlib.pruning.budget import count_parameters, target_sizes
from kdlib.pruning.calibration import select_calibration
from kdlib.pruning.config import PruneConfig, PrunePlan, PruneResult, Sizes
from kdlib.pruning.importance import Scores, compute_scores
from kdlib.pruning.report import plot_scores, save_scores
from kdlib.pruning.selection import check_target, make_plan
from kdlib.pruning.surgery import build_pruned, sizes_of

log = logging.getLogger(__name__)

RESULT_FILE = "prune.json"


def load_source(location: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model at ``location`` (a directory transformers loads): a VLM as image-text-to-text,
    anything else as a causal LM, in ``dtype``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(location)
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return auto.from_pretrained(location, dtype=dtype).eval()


def prune_model(model: nn.Module, calibration: Sequence[Sequence[int]], cfg: PruneConfig,
                scores: Optional[Scores] = None) -> tuple[nn.Module, PrunePlan, Scores, Sizes]:
    """The pruned copy of ``model`` (which is left unchanged), its plan, the scores it was planned
    from (computed unless given) and its sizes."""
    source = sizes_of(model.config)
    target = target_sizes(type(model), model.config, source, cfg)
    check_target(source, target)
    if scores is None:
        rows = select_calibration(calibration, cfg.calibration_tokens, cfg.seed)
        scores = compute_scores(model, rows, cfg, n_drop=source.num_layers - target.num_layers)
    plan = make_plan(scores, source, target, cfg)
    return build_pruned(model, plan, target), plan, scores, target


def prune_to_directory(
    source: str | nn.Module,
    tokenizer: Any,
    calibration: Sequence[Sequence[int]],
    cfg: PruneConfig,
    directory: str | Path,
    *,
    scores: Optional[Scores] = None,
) -> PruneResult:
    """Prune ``source`` (a model directory or a loaded model) as ``cfg`` asks, on ``calibration``
    (token id rows, e.g. the training samples' ``input_ids``), and save the pruned checkpoint with
    ``tokenizer`` (or a processor: anything with ``save_pretrained``; None: not saved), the scores
    and the plot into ``directory``. ``scores`` computed before for the same source and
    calibration (several candidates from one scoring) skip the scoring."""
    model = load_source(str(source)) if isinstance(source, (str, Path)) else source
    pruned, plan, scores, target = prune_model(model, calibration, cfg, scores)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    result = PruneResult(
        directory=str(directory),
        sizes_before=sizes_of(model.config),
        sizes_after=target,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in pruned.parameters()),
        plan=plan,
        seconds=dict(scores.seconds),
    )
    save_scores(scores, directory, config=cfg.as_dict(), plan=result.as_dict()["plan"])
    plot_scores(scores, plan, directory)
    (directory / RESULT_FILE).write_text(json.dumps(result.as_dict(), indent=1) + "\n", encoding="utf-8")
    log.info(
        "pruned %s -> %s parameters (%s layers kept: %s) into %s",
        f"{result.params_before:,}", f"{result.params_after:,}", len(plan.layers), plan.layers, directory,
    )
    return result


def parameter_budget(model: nn.Module, num_layers: int) -> int:
    """Parameters of ``model`` depth-pruned to ``num_layers`` layers (the budget of a depth-only
    student; width candidates at the same budget set ``PruneConfig.params`` to it)."""
    from dataclasses import replace

    return count_parameters(type(model), model.config, replace(sizes_of(model.config), num_layers=num_layers))



