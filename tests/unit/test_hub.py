"""A hub that cannot be reached costs one connection attempt: a one-line error naming the keys, or
the cached copies used offline."""

from __future__ import annotations

import pytest

import kdlib
from kdlib.errors import ModelError
from kdlib.models import hub


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return constants


def test_only_hub_ids_are_checked(tiny_llama):
    cfg = kdlib.compose([f"teacher.model={tiny_llama}", "student.model=Qwen/Qwen3-0.6B", "student.tokenizer=./tok"])
    assert hub.hub_models(cfg) == {"student.model": ("Qwen/Qwen3-0.6B", None)}
    assert hub.hub_models(kdlib.compose([])) == {}  # the embedded teacher is a pkg:// file


def test_unreachable_hub_and_no_cached_copy_is_one_line(online, monkeypatch):
    monkeypatch.setattr(hub, "_reachable", lambda endpoint, timeout: False)
    cfg = kdlib.compose(["teacher.model=Qwen/Qwen3-8B", "student.model=Qwen/Qwen3-0.6B"])
    with pytest.raises(ModelError) as caught:
        hub.check_hub(cfg)
    message = str(caught.value)
    assert "\n" not in message and "teacher.model=Qwen/Qwen3-8B, student.model=Qwen/Qwen3-0.6B" in message
    assert message.startswith(f"cannot reach {online.ENDPOINT}")


def test_unreachable_hub_with_cached_copies_runs_offline(online, monkeypatch):
    monkeypatch.setattr(hub, "_reachable", lambda endpoint, timeout: False)
    monkeypatch.setattr(hub, "_cached", lambda repo, revision: True)
    hub.check_hub(kdlib.compose(["teacher.model=Qwen/Qwen3-8B", "student.model=Qwen/Qwen3-0.6B"]))
    assert online.is_offline_mode()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_reachable_hub_changes_nothing(online, monkeypatch):
    monkeypatch.setattr(hub, "_reachable", lambda endpoint, timeout: True)
    hub.check_hub(kdlib.compose(["teacher.model=Qwen/Qwen3-8B"]))
    assert not online.is_offline_mode()


def test_reachability_is_one_connection_attempt():
    assert not hub._reachable("https://127.0.0.1:9", timeout=1.0)  # nothing listens on port 9


def test_named_teachers_are_checked_too(tmp_path):
    from kdlib.config.schema import KDConfig, TeacherConfig
    from kdlib.models.hub import hub_models

    cfg = KDConfig()
    cfg.teacher.model, cfg.student.model = str(tmp_path), str(tmp_path)
    cfg.teachers = {"coder": TeacherConfig(model="someone/coder-7b")}
    assert hub_models(cfg) == {"teachers.coder.model": ("someone/coder-7b", None)}
