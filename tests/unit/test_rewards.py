"""Rewards: the built-ins on examples, group advantages against hand-computed values, failures of a
reward function as one-line errors naming the sample, config and data errors before any model
loads, and the advantages' collation onto loss rows."""

from __future__ import annotations

import math
import sys

import pytest

import kdlib
from kdlib.errors import ConfigError, DataError, RewardError
from kdlib.rewards import REWARDS, Rollout, build_reward, score
from kdlib.rewards.advantages import group_advantages, group_std
from kdlib.rewards.builtin import last_number, normalize_answer


def _rollout(response: str, row=None, n_tokens: int = 5, finished: bool = True) -> Rollout:
    return Rollout(index=4, prompt=[{"role": "user", "content": "What is 2 plus 3?"}], response=response,
                   row=row or {"answer": "5"}, n_tokens=n_tokens, finished=finished)


def _reward(overrides: list[str]):
    return build_reward(kdlib.compose(["+recipe=onpolicy", *overrides]).reward)


def test_exact_match_compares_normalised_or_exact_text():
    reward = _reward(["reward=exact_match"])
    assert reward(_rollout("  Five.", {"answer": "five"})) == 1.0
    assert reward(_rollout("five apples", {"answer": "five"})) == 0.0
    strict = _reward(["reward=exact_match", "reward.normalize=false", "reward.column=label"])
    assert strict.columns() == ("label",)
    assert strict(_rollout("Five.", {"label": "five"})) == 0.0 and strict(_rollout("five", {"label": "five"})) == 1.0
    assert normalize_answer("  The  Answer:\nYES! ") == "the answer:\nyes".replace("\n", " ")


def test_numeric_reads_the_last_number_within_the_tolerance():
    reward = _reward(["reward=numeric"])
    assert reward(_rollout("2 + 3 = 5")) == 1.0
    assert reward(_rollout("5 is wrong, it is 6")) == 0.0  # the last number counts
    assert reward(_rollout("no number here")) == 0.0
    assert reward(_rollout("It costs 1,234.5 dollars", {"answer": "1234.5"})) == 1.0
    assert last_number("from -3 to -7.25.") == -7.25 and last_number("none") is None
    loose = _reward(["reward=numeric", "reward.tolerance=0.1"])
    assert loose(_rollout("about 5.08")) == 1.0 and loose(_rollout("about 5.2")) == 0.0
    with pytest.raises(RewardError, match=r"reward=numeric raised ValueError: column 'answer' holds no number.*row 5"):
        score(reward, _rollout("5", {"answer": "n/a"}), "data.train row 5")


def test_regex_searches_or_matches_the_whole_response():
    found = _reward(["reward=regex", "reward.pattern='\\d+ \\+ \\d+ = \\d+'"])  # quoted for Hydra
    assert found(_rollout("so 2 + 3 = 5.")) == 1.0 and found(_rollout("five")) == 0.0
    whole = _reward(["reward=regex", "reward.pattern=\\d+", "reward.full_match=true"])
    assert whole(_rollout(" 42 ")) == 1.0 and whole(_rollout("42!")) == 0.0


def test_length_penalises_tokens_beyond_the_target_and_truncation():
    reward = _reward(["reward=length", "reward.target_tokens=10", "reward.coef=0.5", "reward.truncated=-2"])
    assert reward(_rollout("x", n_tokens=8)) == 0.0
    assert reward(_rollout("x", n_tokens=13)) == -1.5
    assert reward(_rollout("x", n_tokens=13, finished=False)) == -3.5


def test_python_reward_gets_prompt_response_and_row(tmp_path, monkeypatch):
    (tmp_path / "kdlib_test_rewards.py").write_text(
        "def score(prompt, response, row):\n"
        "    return float(prompt[-1]['content'].endswith('?')) + len(response) + int(row['answer'])\n"
        "def broken(prompt, response, row):\n    raise KeyError('label')\n"
        "def text(prompt, response, row):\n    return 'high'\n"
        "def nan(prompt, response, row):\n    return float('nan')\n"
        "def yes(prompt, response, row):\n    return True\n"
        "not_callable = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a name no other test or doc module uses (sys.modules caches)
    monkeypatch.delitem(sys.modules, "kdlib_test_rewards", raising=False)
    assert _reward(["reward=python", "reward.fn=kdlib_test_rewards:score"])(_rollout("abc")) == 1.0 + 3 + 5
    for fn, pattern in [("broken", r"raised KeyError: 'label'"), ("text", r"returned str 'high', not a number"),
                        ("nan", r"returned nan, not a finite number")]:
        reward = _reward(["reward=python", f"reward.fn=kdlib_test_rewards:{fn}"])
        with pytest.raises(RewardError, match=rf"^reward=python \(fn=kdlib_test_rewards:{fn}\) {pattern}.*data.train row 5\)$"):
            score(reward, _rollout("abc"), "data.train row 5")
    assert score(_reward(["reward=python", "reward.fn=kdlib_test_rewards:yes"]), _rollout("abc"), "x") == 1.0
    for fn, pattern in [("kdlib_test_rewards", " must be module:function"), ("nowhere:score", "cannot import 'nowhere'"),
                        ("kdlib_test_rewards:missing", "has no 'missing'"), ("kdlib_test_rewards:not_callable", "is not callable")]:
        with pytest.raises(ConfigError, match=rf"^reward\.fn.*{pattern}") as err:
            kdlib.compose(["+recipe=onpolicy", "reward=python", f"reward.fn={fn}"])
        assert "\n" not in str(err.value)


def test_group_advantages_against_hand_computed_values():
    rewards = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0, 1.0]
    # groups of 4: [1,0,0,0] mean 0.25, sample std sqrt((0.5625 + 3*0.0625)/3) = 0.5
    #              [2,2,5,1] mean 2.5,  sample std sqrt((0.25+0.25+6.25+2.25)/3) = sqrt(3)
    got = group_advantages(rewards, 4, eps=1e-6)
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001,
                *(c / (math.sqrt(3) + 1e-6) for c in (-0.5, -0.5, 2.5, -1.5))]
    assert got == pytest.approx(expected, rel=1e-14, abs=0)
    dr_grpo = group_advantages(rewards, 4, scale_by_std=False)
    assert dr_grpo == pytest.approx([0.75, -0.25, -0.25, -0.25, -0.5, -0.5, 2.5, -1.5], rel=0, abs=1e-15)
    assert group_std(rewards, 4) == pytest.approx((0.5 + math.sqrt(3)) / 2, rel=1e-14)


def test_equal_rewards_or_one_sample_give_zero_advantage():
    assert group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3) == [0.0] * 6  # exactly, no rounding residue
    assert group_advantages([0.3, 0.9], 1) == [0.0, 0.0]
    assert group_std([0.3, 0.9], 1) == 0.0
    with pytest.raises(ValueError, match="do not form groups of 4"):
        group_advantages([1.0, 2.0, 3.0], 4)


def test_unknown_reward_name_is_one_line_with_the_choices():
    with pytest.raises(ConfigError, match=r"^unknown reward 'f1'; choose one of: .*numeric.*python") as err:
        kdlib.compose(["+recipe=onpolicy", "reward=f1"])
    assert "\n" not in str(err.value)
    assert {"none", "exact_match", "numeric", "regex", "length", "python"} <= set(REWARDS.names())


@pytest.mark.parametrize("overrides, message", [
    (["reward=numeric"], r"^reward=numeric scores on-policy rollouts: it needs mode=onpolicy"),
    (["+recipe=onpolicy", "algorithm=reward_kd"], r"^algorithm.reward_weight=1.0 needs a reward"),
    (["+recipe=onpolicy", "algorithm=opd", "loss.temperature=2"], r"^algorithm=opd compares log-probabilities at temperature 1"),
    (["+recipe=onpolicy", "reward=numeric", "reward.eps=0"], r"^reward.eps must be > 0"),
    (["+recipe=onpolicy", "reward=regex"], r"^reward.pattern must be set"),
    (["+recipe=onpolicy", "reward=numeric", "algorithm=reward_kd", "algorithm.is_clip=0"], r"^algorithm.is_clip must be > 0"),
])
def test_reward_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        kdlib.compose(overrides)
    assert "\n" not in str(err.value)


def test_a_missing_answer_column_fails_before_any_model_loads(tmp_path, monkeypatch):
    from kdlib.demo.text import chat_rows, write_jsonl
    from kdlib.runner import resolved

    rows = [{**row, "answer": str(i)} for i, row in enumerate(chat_rows(5, seed=3))]
    del rows[3]["answer"]  # row 4 has none (a JSONL column absent in one row reads as None)
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    def forbid(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", forbid)
    cfg = kdlib.compose(["+recipe=onpolicy", "reward=numeric", f"data.train={train}", "data.eval=null"])
    with pytest.raises(DataError, match=rf"^data.train: {train}, row 4: no value in column 'answer', which "
                                        r"reward=numeric reads") as err:
        resolved(cfg)
    assert "\n" not in str(err.value)


def test_advantages_are_collated_onto_each_samples_loss_rows():
    import torch

    from kdlib.data.batching import collate
    from kdlib.data.samples import Sample, Sequence

    samples = [Sample(0, Sequence([1, 2, 3, 4, 5], 3), advantage=0.5),  # 2 loss tokens
               Sample(1, Sequence([1, 2, 3], 1), advantage=-1.25),  # 2 loss tokens
               Sample(2, Sequence([1, 2, 3, 4], 1), advantage=0.0)]  # 3 loss tokens
    for packing in (False, True):
        batch = collate(samples, student_pad_id=0, packing=packing)
        assert batch.advantages.dtype == torch.float32
        assert batch.advantages.tolist() == [0.5, 0.5, -1.25, -1.25, 0.0, 0.0, 0.0]
        assert batch.advantages.shape[0] == batch.n_loss_tokens
    assert collate([Sample(0, Sequence([1, 2, 3], 1))], student_pad_id=0).advantages is None


def test_a_user_registers_a_reward_with_typed_options():
    from dataclasses import dataclass

    from kdlib.rewards import Reward, RewardConfig, register_reward

    @dataclass
    class KeywordConfig(RewardConfig):
        word: str = "please"

    @register_reward("unit_test_keyword", config=KeywordConfig)
    class Keyword(Reward):
        def __call__(self, rollout):
            return float(self.cfg.word in rollout.response)

    reward = _reward(["reward=unit_test_keyword", "reward.word=thanks"])
    assert isinstance(reward, Keyword) and reward(_rollout("thanks!")) == 1.0 and reward(_rollout("please")) == 0.0
    with pytest.raises(TypeError, match=r"reward 'unit_test_bad' must subclass kdlib.rewards.Reward"):
        register_reward("unit_test_bad")(KeywordConfig)
    with pytest.raises(TypeError, match=r"config must subclass RewardConfig"):
        register_reward("unit_test_bad", config=dict)(Keyword)
