"""What a run reports: the progress bar, metrics lines, plots, and experiment trackers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from kdlib.config.node import ConfigNode


class WandbMode(str, Enum):
    """Where a Weights & Biases run goes."""

    online = "online"  # to the W&B server as the run goes
    offline = "offline"  # a local run directory that `wandb sync` uploads later
    disabled = "disabled"  # nowhere (the calls do nothing)


@dataclass
class WandbConfig(ConfigNode):
    """Options of the Weights & Biases tracker (logging.trackers=[wandb])."""

    # Project the runs go to.
    project: str = "kdlib"
    # Team or user; null = the account's default entity.
    entity: Optional[str] = None
    # online, offline or disabled; null = W&B's own choice (WANDB_MODE, else online).
    mode: Optional[WandbMode] = None
    # Runs shown together; null = the Hydra sweep of a -m run (none for a single run).
    group: Optional[str] = None
    # Tags of the run.
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig(ConfigNode):
    """What the run reports."""

    # Show a progress bar over steps.
    progress: bool = True
    # Write a metrics line (and update the progress bar) every this many steps.
    log_every: int = 1
    # Draw loss curves into plots/loss.png at the end.
    plot: bool = True
    # Experiment trackers (registry `tracker`: wandb, tensorboard) that receive every metrics
    # line, the resolved config, the eval table, the loss plot and on-policy rollout samples;
    # metrics.jsonl is written either way.
    trackers: list[str] = field(default_factory=list)
    # Options of the W&B tracker.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # On-policy: rollouts of each logged step sent to the trackers as samples (all of them go to
    # rollouts.jsonl).
    tracker_samples: int = 4

    def check(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be positive, got {self.log_every}")
        if self.tracker_samples < 0:
            raise ValueError(f"tracker_samples must be >= 0, got {self.tracker_samples}")
