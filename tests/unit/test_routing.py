"""Routing samples to named teachers: the config rules and the data rules, one-line errors at preflight.

A route column names each row's teacher or ensemble; a row without one takes routing.default or is
an error naming its file and row; an unknown name, a bad weight column, an unknown default or
member are errors before any model loads (the named teacher's model here does not exist, so an
error that came after loading it would name it instead).
"""

from __future__ import annotations

import pytest

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl
from kdlib.errors import ConfigError, DataError
from kdlib.runner import resolved

MISSING_MODEL = "/nonexistent/coder"


def rows(tmp_path, values, name="train.jsonl", column="expert"):
    data = chat_rows(len(values), seed=0)
    for row, value in zip(data, values):
        if value is not None:
            row[column] = value
    return write_jsonl(tmp_path / name, data)


def routed(tiny_overrides, path, *extra):
    return kdlib.compose(tiny_overrides + [
        f"data.train={path}", "data.eval=null", "routing.key=expert", "+teacher@teachers.coder=smollm2",
        f"teachers.coder.model={MISSING_MODEL}", *extra,
    ])


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_a_row_without_a_route_and_no_default_names_file_and_row(tiny_overrides, tmp_path):
    path = rows(tmp_path, ["coder", None, "teacher"])
    with pytest.raises(DataError) as exc:
        resolved(routed(tiny_overrides, path, "routing.default=null"))
    assert "train.jsonl, row 2: no 'expert'" in one_line(exc)


def test_an_unknown_teacher_in_the_data_lists_the_known(tiny_overrides, tmp_path):
    path = rows(tmp_path, ["coder", "teacher", "mathematician"])
    with pytest.raises(DataError) as exc:
        resolved(routed(tiny_overrides, path))
    text = one_line(exc)
    assert "row 3: expert='mathematician' names no teacher or ensemble" in text and "teacher, coder" in text


def test_a_route_must_be_a_name(tiny_overrides, tmp_path):
    path = rows(tmp_path, ["coder", 3])
    with pytest.raises(DataError, match=r"row 2: 'expert' must name a teacher or ensemble, got int"):
        resolved(routed(tiny_overrides, path))


def test_rows_without_a_route_take_the_default(tiny_overrides, tmp_path):
    from kdlib.data.routes import check_routes

    path = rows(tmp_path, ["coder", None, "", "teacher"])
    assert check_routes(routed(tiny_overrides, path)) == {"coder": 1, "teacher": 3}
    assert check_routes(routed(tiny_overrides, path, "routing.default=coder")) == {"coder": 3, "teacher": 1}


@pytest.mark.parametrize("override, message", [
    ("routing.default=nobody", r"routing.default: unknown teacher or ensemble 'nobody'; choose one of: teacher, coder"),
    ("+routing.input_keys.nobody=hint", r"routing.input_keys.nobody: unknown teacher 'nobody'"),
])
def test_unknown_names_in_the_config_are_config_errors(tiny_overrides, tmp_path, override, message):
    path = rows(tmp_path, ["coder"])
    with pytest.raises(ConfigError, match=message) as exc:
        resolved(routed(tiny_overrides, path, override))
    one_line(exc)


def test_an_ensemble_of_an_unknown_teacher_is_refused(tiny_overrides, tmp_path):
    path = rows(tmp_path, ["coder"])
    with pytest.raises(ConfigError, match=r"routing.ensembles.both.members: unknown teacher 'nobody'"):
        resolved(routed(tiny_overrides, path, "+ensemble@routing.ensembles.both=mixture",
                        "routing.ensembles.both.members=[teacher,nobody]"))


@pytest.mark.parametrize("value, message", [
    ({"teacher": 1, "nobody": 2}, r"row 1: 'w' weighs 'nobody', which is not a member of ensemble both"),
    ([1.0], r"row 1: 'w' of ensemble both: weights must give one weight per member \(2: teacher, coder\), got 1"),
    ([-1.0, 2.0], r"row 1: 'w' of ensemble both: weights: the weight of teacher must be a finite number >= 0"),
    ([0, 0], r"row 1: 'w' of ensemble both: weights are all zero"),
    ("half", r"row 1: 'w' must be \{member: weight\} or a list of 2 weights, got str"),
])
def test_a_bad_weight_column_names_the_row(tiny_overrides, tmp_path, value, message):
    path = rows(tmp_path, [value], column="w")
    cfg = kdlib.compose(tiny_overrides + [
        f"data.train={path}", "data.eval=null", "+teacher@teachers.coder=smollm2", f"teachers.coder.model={MISSING_MODEL}",
        "+ensemble@routing.ensembles.both=product", "routing.ensembles.both.members=[teacher,coder]",
        "routing.ensembles.both.weights_key=w", "routing.default=both",
    ])
    with pytest.raises(DataError, match=message) as exc:
        resolved(cfg)
    one_line(exc)


def test_per_sample_weights_from_a_column(tiny_overrides, tmp_path):
    from kdlib.data.routes import Router

    cfg = kdlib.compose(tiny_overrides + [
        "+teacher@teachers.coder=smollm2", "+ensemble@routing.ensembles.both=mixture",
        "routing.ensembles.both.members=[teacher,coder]", "routing.ensembles.both.weights=[3,1]",
        "routing.ensembles.both.weights_key=w", "routing.default=both",
    ])
    router = Router.of(cfg)
    assert router.route({}, "r1") == ("both", (0.75, 0.25))
    assert router.route({"w": {"coder": 1}}, "r2") == ("both", (0.0, 1.0))
    assert router.route({"w": [1, 1]}, "r3") == ("both", (0.5, 0.5))


def test_one_teacher_configs_are_unchanged(tiny_overrides):
    from kdlib.config.teachers import several_teachers

    cfg = kdlib.compose(tiny_overrides)
    assert not several_teachers(cfg) and cfg.teachers == {}
    assert not several_teachers(kdlib.compose(tiny_overrides + ["teacher=smollm2"]))


@pytest.mark.parametrize("override, message", [
    ("teachers.coder.num_workers=2", r"teachers.coder.num_workers=2 needs launcher=ray"),
    ("teachers.coder.from_student=true teachers.coder.update_freq=1", r"teachers.coder: only the run's own teacher can follow the student"),
])
def test_named_teacher_rules(tiny_overrides, tmp_path, override, message):
    path = rows(tmp_path, ["coder"])
    with pytest.raises(ConfigError, match=message):
        resolved(routed(tiny_overrides, path, *override.split()))


def test_a_named_teacher_whose_vocabulary_differs_is_refused_before_loading(tiny_overrides, tiny_llama,
                                                                           unigram_tokenizer_dir, tmp_path):
    from kdlib.controller.teachers import routed_data

    path = rows(tmp_path, ["coder"])
    cfg = routed(tiny_overrides, path, f"teachers.coder.model={tiny_llama}",
                 f"teachers.coder.tokenizer={unigram_tokenizer_dir}")
    with pytest.raises(ConfigError, match=r"^teachers.coder: ") as exc:
        routed_data(resolved(cfg), prompts=False, responses=True)
    one_line(exc)


def test_a_placement_for_an_unknown_teacher_is_refused(tiny_overrides, tmp_path):
    path = rows(tmp_path, ["coder"])
    with pytest.raises(ConfigError, match=r"launcher.teachers.nobody: no teacher is named 'nobody' \(teachers: coder\)"):
        resolved(routed(tiny_overrides, path, "launcher=ray", "+placement@launcher.teachers.nobody=default"))


def test_several_teachers_refuse_a_vision_language_student(vlm_overrides, tiny_vlm):
    from kdlib.controller.teachers import routed_data

    cfg = kdlib.compose(vlm_overrides("idefics3") + [
        "+teacher@teachers.other=smollm2", f"teachers.other.model={tiny_vlm('idefics3', hires=True)}",
        "teachers.other.dtype=float32", "routing.key=expert",
    ])
    with pytest.raises(ConfigError, match=r"several teachers \(teachers / routing\) does not support vision-language"):
        routed_data(resolved(cfg), prompts=False, responses=True)


def test_column_values_mapped_to_teachers(tiny_overrides, tmp_path):
    from kdlib.data.routes import check_routes

    path = rows(tmp_path, ["code", "math", "coder", None, "chat"])
    cfg = routed(tiny_overrides, path, "+routing.map.code=coder", "+routing.map.math=coder", "+routing.map.chat=teacher")
    assert check_routes(cfg) == {"coder": 3, "teacher": 2}
    path = rows(tmp_path, ["code", "poetry"], name="unmapped.jsonl")
    with pytest.raises(DataError, match=r"unmapped.jsonl, row 2: expert='poetry' names no teacher or ensemble; choose "
                                        r"one of: teacher, coder or a value of routing.map \(code\)") as exc:
        resolved(routed(tiny_overrides, path, "+routing.map.code=coder"))
    one_line(exc)


@pytest.mark.parametrize("override, message", [
    (["+routing.map.code=nobody"], r"routing.map.code: unknown teacher or ensemble 'nobody'"),
    (["+routing.map.code=coder", "routing.key=null"], r"routing.map needs routing.key"),
])
def test_a_bad_map_is_a_config_error(tiny_overrides, tmp_path, override, message):
    path = rows(tmp_path, ["coder"])
    with pytest.raises(ConfigError, match=message):
        resolved(routed(tiny_overrides, path, *override))
