"""Bad inputs not covered elsewhere, each a one-line kdlib error before any model loads.

docs/reliability.md lists every class of bad input with its message and the test that proves it;
this file holds the rows that no other test held (placement rules, checkpoint options, resume
paths, data files that exist but hold nothing usable).
"""

from __future__ import annotations

import pytest

import kdlib
from kdlib.config import DataConfig
from kdlib.data.preflight import check_data_files
from kdlib.errors import ConfigError, DataError


@pytest.mark.parametrize("overrides, message", [
    (["pipeline.colocate=true", "pipeline.prefetch=1"],
     "pipeline.colocate=true needs pipeline.prefetch=0: colocated teacher and students take turns on the devices"),
    (["+recipe=onpolicy", "pipeline.prefetch=1"],
     "mode=onpolicy needs pipeline.prefetch=0: each rollout needs the student's latest weights"),
    (["teacher.ema_decay=0.9"],
     "teacher.update_freq / teacher.ema_decay need teacher.from_student=true (self-distillation)"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1, got 0"),
    (["train.max_bad_steps=-1"], "train.max_bad_steps must be positive, got -1"),
    (["train.resume=/no/such/run"], "train.resume: /no/such/run does not exist"),
])
def test_bad_options_fail_at_composition_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as caught:
        kdlib.compose(overrides)
    assert str(caught.value) == message


def test_resume_from_a_directory_without_a_complete_checkpoint(tmp_path):
    partial = tmp_path / "run" / "checkpoints" / ".step_2.partial-1-abc"  # a killed write
    partial.mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        kdlib.compose([f"train.resume={tmp_path / 'run'}"])
    assert str(caught.value).startswith(f"train.resume: no complete checkpoint in {tmp_path / 'run'} (")


@pytest.mark.parametrize("content, message", [
    ("", "has no rows"),
    ('{"prompt": "a", "response": ""}\n{"prompt": "b", "response": "  "}\n', "none of its 2 rows has a non-empty message"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n',
     "data.jsonl, line 2: invalid JSON"),
])
def test_data_files_that_parse_but_hold_nothing_usable(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        check_data_files(DataConfig(train=str(path)))
    assert message in str(caught.value) and str(caught.value).startswith("data.train: ")
    assert "\n" not in str(caught.value)


def test_a_model_path_that_does_not_exist_fails_before_any_model_loads(tiny_overrides, monkeypatch):
    import kdlib.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad path was reported")

    monkeypatch.setattr(loading, "load_causal_lm", no_loading)
    from kdlib.errors import ModelError

    with pytest.raises(ModelError) as caught:
        kdlib.run(kdlib.compose(tiny_overrides + ["teacher.model=/no/such/teacher"]))
    assert str(caught.value) == "model directory not found: /no/such/teacher"
