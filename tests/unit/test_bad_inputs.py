"""Bad inputs not covered elsewhere, each a one-line kdlib error before any model loads.

docs/reliability.md lists every class of bad input with its message and the test that proves it;
this file holds the rows that no other test held (placement rules, checkpoint options, resume
paths, data files that exist but hold nothing usable, damaged model, tokenizer, GGUF and template
files, plugins that raise), and the one failure that is not one line: a bug in kdlib.
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


# ----------------------------------------------------------------------------------------------
# Damaged model, tokenizer, template and plugin files: one line naming the file


def _copy_model(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_truncated_weight_file_is_named_before_any_model_loads(tiny_overrides, tiny_llama, tmp_path, monkeypatch):
    import kdlib.models.loading as loading
    from kdlib.errors import ModelError

    broken = _copy_model(tiny_llama, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded first"))
    for role in ("teacher", "student"):
        with pytest.raises(ModelError) as caught:
            kdlib.run(kdlib.compose(tiny_overrides + [f"{role}.model={broken}"]))
        assert str(caught.value) == (f"{weights} is incomplete or damaged (Error while deserializing header: incomplete "
                                     "metadata, file not fully covered); download or copy it again")


def test_a_shard_index_that_names_a_missing_file_or_is_not_json(tiny_llama, tmp_path):
    import json

    from kdlib.errors import ModelError
    from kdlib.models.loading import model_location

    broken = _copy_model(tiny_llama, tmp_path / "sharded")
    index = broken / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match=r"model-00002-of-00002.safetensors is missing \(listed in "
                                         r"model.safetensors.index.json\); download it again$"):
        model_location(str(broken))
    index.write_text('{"weight_map": ')
    with pytest.raises(ModelError, match=r"index.json is not a safetensors index \(Expecting value: line 1"):
        model_location(str(broken))


@pytest.mark.parametrize("damage, message", [
    ("cut", "tokenizer.json is not valid JSON (Expecting"),
    ("wrong", "KeyError: 'added_tokens' (a file of the tokenizer is not what transformers expects)"),
])
def test_a_damaged_tokenizer_file_is_one_line(damage, message, tiny_llama, tmp_path):
    from kdlib.config import ModelConfig
    from kdlib.errors import ModelError
    from kdlib.models.loading import load_tokenizer

    broken = _copy_model(tiny_llama, tmp_path / "tok")
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 3] if damage == "cut" else '{"model": {"type": "BPE"}}')
    with pytest.raises(ModelError) as caught:
        load_tokenizer(ModelConfig(model=str(broken)))
    assert str(caught.value).startswith(f"cannot load tokenizer {str(broken)!r}: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_gguf_file_is_one_line(tiny_llama, tmp_path, monkeypatch):
    from kdlib.errors import ModelError
    from kdlib.models.loading import model_location

    pytest.importorskip("gguf")
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "kdlib_cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\x07")  # the magic and a version, then the file ends
    with pytest.raises(ModelError) as caught:
        model_location(str(path))
    assert str(caught.value).startswith(f"cannot read {path}: ")
    assert str(caught.value).endswith("the file looks incomplete or damaged (download it again)")
    path.write_bytes(b"PK\x03\x04 a zip file, not a GGUF file at all")
    with pytest.raises(ModelError, match=r"does not start with the GGUF magic bytes, so it is not a GGUF file\.$"):
        model_location(str(path))


def test_chat_template_files_that_cannot_be_used(tmp_path):
    from kdlib.errors import ModelError
    from kdlib.models.loading import chat_template_text

    with pytest.raises(ModelError, match=r"^chat_template file not found: /no/such/template.jinja"):
        chat_template_text("/no/such/template.jinja")
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{# menu #}\n{{ 'caf\xe9' }}")
    with pytest.raises(ModelError, match=r"latin.jinja, line 2: not UTF-8 text \(byte 0xe9: invalid continuation "
                                         r"byte\); save the file as UTF-8$"):
        chat_template_text(str(latin))
    assert chat_template_text("{{ messages }}") == "{{ messages }}"  # inline text stays inline


def test_a_plugin_that_raises_while_importing_is_one_line(tmp_path, monkeypatch):
    from kdlib.config.compose import import_plugins

    plugin = tmp_path / "raising_plugin_xyz.py"
    plugin.write_text("import os\n\nSETTING = os.environ['KDLIB_TEST_NO_SUCH_VARIABLE']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        import_plugins(["raising_plugin_xyz"])
    with pytest.raises(ConfigError) as through_compose:  # kdlib.compose says the same
        kdlib.compose(["plugins=[raising_plugin_xyz]"])
    assert str(through_compose.value) == str(caught.value)
    assert str(caught.value) == (
        f"plugins: importing 'raising_plugin_xyz' raised KeyError: 'KDLIB_TEST_NO_SUCH_VARIABLE' ({plugin}, line 3); "
        "`python -c 'import raising_plugin_xyz'` shows the traceback"
    )


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_bug_report(tiny_overrides, tmp_path):
    """A bug (here: a plugin replaces kdlib.runner.run with one that raises) is not a user error."""
    import subprocess
    import sys

    from kdlib.cli import BUG_REPORT

    (tmp_path / "buggy_run_plugin.py").write_text(
        "import kdlib.runner\n\ndef run(*args, **kwargs):\n    raise RuntimeError('an internal failure')\n\n"
        "kdlib.runner.run = run\n"
    )
    args = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    out = subprocess.run([sys.executable, "-m", "kdlib", *args, "plugins=[buggy_run_plugin]",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback (most recent call last):" in lines and "RuntimeError: an internal failure" in lines
    assert lines[-1] == BUG_REPORT and "kdlib: error:" not in out.stderr


def test_images_that_are_a_directory_or_not_an_image(tmp_path):
    from kdlib.data.images import BadImageError, ImageRef, open_image

    (tmp_path / "photo.png").mkdir()
    with pytest.raises(BadImageError, match=r"^w: image .*photo.png is a directory, not an image file$"):
        open_image(ImageRef(path=tmp_path / "photo.png"), "w")
    with pytest.raises(BadImageError) as caught:
        open_image(ImageRef(data=b"GIF89a but then nothing"), "data.train: d.jsonl, row 3")
    assert str(caught.value) == ("data.train: d.jsonl, row 3: cannot read image inline image (23 bytes): not an image "
                                 "format Pillow reads (or a damaged file)")
