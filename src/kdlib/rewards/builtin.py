"""The built-in rewards, none of which needs a model: answer checks, a format check, a length
penalty, and a user's function by dotted path.

- ``none``: no reward (the default; the on-policy loop is unchanged).
- ``exact_match``: 1 when the response equals the data column ``reward.column`` (with
  ``reward.normalize``: both lower-cased, stripped of surrounding punctuation and with runs of
  white space collapsed), else 0.
- ``numeric``: 1 when the last number in the response is within ``reward.tolerance`` of the
  column's number (thousands separators are dropped), else 0; no number scores 0.
- ``regex``: 1 when ``reward.pattern`` matches (``re.search``; ``reward.full_match``: the whole
  stripped response), else 0.
- ``length``: ``-reward.coef * max(0, tokens - reward.target_tokens)``, a penalty per sampled
  token beyond the target, and ``reward.truncated`` for a response cut by max_new_tokens.
- ``python``: ``reward.fn=module:function`` called as ``function(prompt, response, row)`` with
  the prompt's chat messages, the response text and the data row (a dict of every column).
"""

from __future__ import annotations

import importlib
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Optional

from kdlib.rewards.base import NO_REWARD, Reward, RewardConfig, Rollout, register_reward

# A number as it is written in text: sign, digits with optional thousands separators, decimals.
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


@register_reward(NO_REWARD)
class NoReward(Reward):
    """Scores nothing; never called (the on-policy loop skips rewards with reward=none)."""

    def __call__(self, rollout: Rollout) -> float:
        return 0.0


@dataclass
class ColumnRewardConfig(RewardConfig):
    """A reward that compares the response with a column of the data row."""

    # The data column holding the reference answer (every row of data.train and data.eval needs it).
    column: str = "answer"

    def check(self) -> None:
        super().check()
        if not self.column:
            raise ValueError("column must name a data column")


class ColumnReward(Reward):
    cfg: ColumnRewardConfig

    def columns(self) -> tuple[str, ...]:
        return (self.cfg.column,)


@dataclass
class ExactMatchConfig(ColumnRewardConfig):
    # Compare lower-cased, stripped of surrounding punctuation, white space collapsed.
    normalize: bool = True


def normalize_answer(text: str) -> str:
    """Lower case, runs of white space as one space, surrounding white space and punctuation gone."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@register_reward("exact_match", config=ExactMatchConfig)
class ExactMatch(ColumnReward):
    cfg: ExactMatchConfig

    def __call__(self, rollout: Rollout) -> float:
        answer, response = str(rollout.row[self.cfg.column]), rollout.response
        if self.cfg.normalize:
            answer, response = normalize_answer(answer), normalize_answer(response)
        return float(response == answer)


@dataclass
class NumericConfig(ColumnRewardConfig):
    # Largest absolute difference between the response's last number and the answer that scores 1.
    tolerance: float = 1e-6

    def check(self) -> None:
        super().check()
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


def last_number(text: str) -> Optional[float]:
    """The last number written in ``text`` (``1,234.5`` reads as 1234.5), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


@register_reward("numeric", config=NumericConfig)
class Numeric(ColumnReward):
    cfg: NumericConfig

    def __call__(self, rollout: Rollout) -> float:
        expected = last_number(str(rollout.row[self.cfg.column]))
        if expected is None:
            raise ValueError(f"column {self.cfg.column!r} holds no number: {rollout.row[self.cfg.column]!r:.60}")
        got = last_number(rollout.response)
        return float(got is not None and abs(got - expected) <= self.cfg.tolerance)


@dataclass
class RegexConfig(RewardConfig):
    # The regular expression (Python `re` syntax) a well-formed response matches.
    pattern: str = ""
    # Match the whole response (stripped) instead of searching in it.
    full_match: bool = False

    def check(self) -> None:
        super().check()
        if not self.pattern:
            raise ValueError("pattern must be set (reward.pattern=<regular expression>)")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None


@register_reward("regex", config=RegexConfig)
class Regex(Reward):
    cfg: RegexConfig

    def __init__(self, cfg: RegexConfig) -> None:
        super().__init__(cfg)
        self.pattern = re.compile(cfg.pattern)

    def __call__(self, rollout: Rollout) -> float:
        if self.cfg.full_match:
            return float(self.pattern.fullmatch(rollout.response.strip()) is not None)
        return float(self.pattern.search(rollout.response) is not None)


@dataclass
class LengthConfig(RewardConfig):
    # Sampled tokens that cost nothing.
    target_tokens: int = 64
    # Penalty per token beyond target_tokens.
    coef: float = 0.01
    # Added for a response cut by rollout.max_new_tokens (no end of turn); 0: nothing.
    truncated: float = 0.0

    def check(self) -> None:
        super().check()
        if self.target_tokens < 0:
            raise ValueError(f"target_tokens must be >= 0, got {self.target_tokens}")
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0, got {self.coef}")


@register_reward("length", config=LengthConfig)
class Length(Reward):
    cfg: LengthConfig

    def __call__(self, rollout: Rollout) -> float:
        over = max(0, rollout.n_tokens - self.cfg.target_tokens)
        return -self.cfg.coef * over + (0.0 if rollout.finished else self.cfg.truncated)


@dataclass
class PythonRewardConfig(RewardConfig):
    # The function, as module:function (the module importable from the working directory or
    # plugins); called as function(prompt, response, row) -> number.
    fn: str = ""

    def check(self) -> None:
        super().check()
        load_function(self.fn)


def load_function(path: str) -> Callable[..., Any]:
    """The callable ``module:attr`` names (ValueError naming the path when it cannot be had)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"fn must be module:function, got {path!r}")
    import sys

    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the user's module, next to where kdlib runs (as plugins=)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a missing module or one that fails to import
        raise ValueError(f"fn={path}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"fn={path}: module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ValueError(f"fn={path}: {attr!r} is not callable")
    return target


@register_reward("python", config=PythonRewardConfig)
class PythonReward(Reward):
    cfg: PythonRewardConfig

    def __init__(self, cfg: PythonRewardConfig) -> None:
        super().__init__(cfg)
        self.fn = load_function(cfg.fn)

    def describe(self) -> str:
        return f"reward=python (fn={self.cfg.fn})"

    def __call__(self, rollout: Rollout) -> float:
        return self.fn(rollout.prompt, rollout.response, dict(rollout.row))
