"""What ``kdlib.run`` returns: the leaf type every mode fills in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RunResult:
    """Metrics and paths of one run."""

    run_dir: Path
    # Metrics of the last logged step (loss, kd_loss, ce_loss, lr, grad_norm, tokens_per_s, ...).
    metrics: dict[str, float] = field(default_factory=dict)
    # Held-out metrics before and after training (kl, ce, top1_agreement, tokens).
    eval_before: Optional[dict[str, float]] = None
    eval_after: Optional[dict[str, float]] = None
    # The final student in Hugging Face format.
    student_dir: Optional[Path] = None
    # Other files the run produced, by name (e.g. "generated" for mode=generate).
    outputs: dict[str, Path] = field(default_factory=dict)
