"""The data columns a reward reads, checked at preflight, before any model loads.

Every row of data.train (and of data.eval when the held-out reward uses it) must hold the columns
the configured reward reads (:meth:`kdlib.rewards.Reward.columns`), so that a missing answer
column is a one-line error naming the key, the file and the row, not a failure at the first
rollout. The rules across the config live with the other config checks
(:mod:`kdlib.config.reward_checks`).
"""

from __future__ import annotations

from typing import Any

from kdlib.errors import DataError


def check_reward_columns(cfg: Any) -> None:
    """Every row the reward will score has the columns it reads; DataError naming key, file, row."""
    from kdlib.data.samples import load_split
    from kdlib.rewards.base import build_reward

    if not cfg.reward.enabled:
        return
    columns = build_reward(cfg.reward).columns()
    if not columns:
        return
    splits = ["train"] + (["eval"] if cfg.data.eval and cfg.reward.eval_prompts else [])
    for split in splits:
        source = load_split(cfg.data, split)
        present = set(source.rows.column_names)
        for i, row in enumerate(source.rows):
            for column in columns:
                if column not in present or row[column] is None:
                    raise DataError(f"{source.key}: {source.where(i)}: no value in column {column!r}, which "
                                    f"reward={cfg.reward.name} reads (reward.column names it)")
