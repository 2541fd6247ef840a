"""Files and messages from elsewhere cannot run code, import a module or touch a file outside
their directory: a crafted checkpoint, teacher cache or carrier message is refused in one line
(docs/reliability.md, "What is trusted")."""

from __future__ import annotations

import pytest
import torch

from carrier_doubles import ExampleAlignment, full_teacher_output
from kdlib.teacher_output import CARRIER_TYPES, CarrierError, TeacherOutput
from kdlib.parallel import checkpoint_files as ckpt_files

# ----------------------------------------------------------------------------------------------
# The carrier builds only registered types


def _message_naming(type_name: str, **values):
    tensors, meta = full_teacher_output().to_parts()
    meta["types"]["alignment"] = type_name
    if values:
        meta["values"] = values
    return tensors, meta


def _refused(tensors, meta, type_name: str) -> None:
    with pytest.raises(CarrierError) as caught:
        TeacherOutput.from_parts(tensors, meta)
    assert str(caught.value) == (
        f"teacher output message: unknown field type {type_name!r}; choose one of: {', '.join(CARRIER_TYPES.names())}"
    )


@pytest.mark.parametrize("type_name", ["os:system", "builtins:eval", "kdlib.demo.text:ExampleAlignment"])
def test_a_carrier_naming_a_callable_is_refused_without_calling_it(type_name, monkeypatch):
    import builtins
    import os

    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(("system", a, k)))
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: called.append(("eval", a, k)))
    _refused(*_message_naming(type_name, **{"alignment.command": "touch /tmp/owned"}), type_name)
    assert called == []


def test_a_carrier_naming_a_module_does_not_import_it(tmp_path, monkeypatch):
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "carrier_trap_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass Payload:\n    def __init__(self, **kw): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _refused(*_message_naming("carrier_trap_module:Payload"), "carrier_trap_module:Payload")
    assert not marker.exists() and "carrier_trap_module" not in sys.modules


def test_a_registered_type_with_unexpected_or_missing_fields_is_refused():
    tensors, meta = full_teacher_output().to_parts()
    tensors["alignment.command"] = torch.tensor([1.5, -2.0])
    with pytest.raises(CarrierError, match=r"example_alignment takes the fields \['student_rows', 'teacher_rows', "
                                           r"'weights'\], not \['command'\]$"):
        TeacherOutput.from_parts(tensors, meta)
    tensors, meta = full_teacher_output().to_parts()
    del tensors["alignment.weights"]
    with pytest.raises(CarrierError, match=r"missing \['weights'\]$"):
        TeacherOutput.from_parts(tensors, meta)


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: t.update({"__class__": torch.ones(2)}), "unexpected field '__class__'"),
    (lambda t, m: m["values"].update({"hidden": "x"}) if "values" in m else m.update({"values": {"hidden": "x"}}),
     "unexpected field 'hidden'"),
    (lambda t, m: m.update({"values": {"alignment.weights": object()}}), "field 'alignment.weights' holds a object"),
    (lambda t, m: m.update({"code": "print(1)"}), "unexpected metadata"),
    (lambda t, m: m["types"].update({"sample_ids": "sent_rows"}), "unexpected field 'sample_ids'"),
])
def test_other_crafted_messages_are_refused_in_one_line(edit, message):
    tensors, meta = full_teacher_output().to_parts()
    edit(tensors, meta)
    with pytest.raises(CarrierError) as caught:
        TeacherOutput.from_parts(tensors, meta)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_registered_types_travel_by_name():
    from kdlib.xtok.groups import SentRows

    rows = torch.tensor([0, 2, 3, 7])
    output = TeacherOutput(torch.randn(4, 8), alignment=SentRows(teacher_rows=rows))
    tensors, meta = output.to_parts()
    assert meta["types"] == {"alignment": "sent_rows"}
    back = TeacherOutput.from_parts(tensors, meta)
    assert isinstance(back.alignment, SentRows) and torch.equal(back.alignment.teacher_rows, rows)
    assert isinstance(TeacherOutput.from_parts(*full_teacher_output().to_parts()).alignment, ExampleAlignment)


def test_an_unregistered_type_cannot_be_sent():
    from dataclasses import dataclass

    @dataclass
    class Unregistered:
        rows: torch.Tensor

    with pytest.raises(TypeError, match="Unregistered is not a registered teacher output field type"):
        TeacherOutput(torch.randn(2, 4), alignment=Unregistered(torch.tensor([0, 1]))).to_parts()


# ----------------------------------------------------------------------------------------------
# Checkpoints: nothing in them is executed


class _Payload:
    """Unpickling this touches ``marker``: what a crafted pickle would do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def _saved_checkpoint(directory, extra=None):
    """A real checkpoint of a small model after one AdamW step, published as kdlib publishes one."""
    import json

    from kdlib.parallel import checkpoint as ckpt


    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    staging = ckpt.staging_dir(directory)
    ckpt.save_checkpoint(staging, model, optimizer, extra if extra is not None else {"step": 1, "rng": ckpt.rng_state()})
    (staging / "trainer_state.json").write_text(json.dumps({"step": 1}))
    ckpt.publish(staging, directory)
    return model, optimizer


def _fresh_model():
    torch.manual_seed(11)  # other weights than the saved ones
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "checkpoints" / "step_1"
    _saved_checkpoint(directory)
    return directory


def test_extra_state_is_plain_data_and_restores_every_generator_exactly(tmp_path):
    import json
    import random

    import numpy as np
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from kdlib.parallel import checkpoint as ckpt

    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.gauss(0, 1), np.random.standard_normal(), torch.rand(3)  # mid-stream, gauss values cached
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=9, min_lr_rate=0.1)
    for _ in range(3):
        optimizer.step(), scheduler.step()
    state = {"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "step": 3,
             "odd": {1: (2.5, float("inf"), None), "nested": [np.int64(-4), np.arange(6, dtype=np.float32).reshape(2, 3)]}}
    ckpt_files.save_extra_state(tmp_path, 0, state)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), torch.rand(4).tolist())

    document = json.loads((tmp_path / "extra_rank0.json").read_text())  # JSON, readable by anyone
    assert document["format"] == "kdlib-checkpoint-extra/1" and not list(tmp_path.glob("*.pt"))
    loaded = ckpt_files.load_extra_state(tmp_path, 0)
    assert loaded["scheduler"] == scheduler.state_dict() and loaded["step"] == 3
    assert loaded["odd"][1] == (2.5, float("inf"), None) and loaded["odd"]["nested"][0] == np.int64(-4)
    assert np.array_equal(loaded["odd"]["nested"][1], state["odd"]["nested"][1])
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), torch.rand(4).tolist()) == expected
    with pytest.raises(TypeError, match=r"cannot store state.bad \(a _Payload\) in a checkpoint: not plain data"):
        ckpt_files.save_extra_state(tmp_path, 1, {"bad": _Payload(tmp_path / "x")})


def test_a_resumed_checkpoint_restores_model_and_optimizer(checkpoint):
    from kdlib.parallel import checkpoint as ckpt

    torch.manual_seed(3)
    saved = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).state_dict()
    model, optimizer = _fresh_model()
    assert not torch.equal(model[0].weight, saved["0.weight"])
    extra = ckpt.load_checkpoint(checkpoint, model, optimizer)
    assert extra["step"] == 1 and "rng" in extra
    assert optimizer.state[model[0].weight]["exp_avg"].abs().sum() > 0 and optimizer.param_groups[0]["lr"] == 1e-2


def test_a_checkpoint_with_pickled_state_is_refused_without_loading_it(checkpoint, tmp_path):
    import pickle

    from kdlib.errors import CheckpointError
    from kdlib.parallel import checkpoint as ckpt

    marker = tmp_path / "owned"
    for name in ("extra_rank0.json", "extra_rank0.safetensors", ckpt_files.MANIFEST):
        (checkpoint / name).unlink()
    (checkpoint / "extra_rank0.pt").write_bytes(pickle.dumps({"step": 1, "rng": _Payload(marker)}))
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(checkpoint, *_fresh_model())
    assert str(caught.value) == (
        f"{checkpoint} was written by an older kdlib: its state extra_rank0.pt is a pickle, which can run code when "
        f"loaded, so it is not read; if you trust it, convert it once with `python -m kdlib.parallel.checkpoint_files "
        f"convert {checkpoint}`"
    )
    assert not marker.exists()


def test_an_old_checkpoint_you_trust_converts_and_resumes(checkpoint):
    import subprocess
    import sys

    from kdlib.parallel import checkpoint as ckpt

    extra = ckpt_files.load_extra_state(checkpoint, 0)
    for name in ("extra_rank0.json", "extra_rank0.safetensors", ckpt_files.MANIFEST):
        (checkpoint / name).unlink()
    torch.save(extra, checkpoint / "extra_rank0.pt")  # as older versions wrote it
    out = subprocess.run([sys.executable, "-m", "kdlib.parallel.checkpoint_files", "convert", str(checkpoint)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "converted extra_rank0.pt" in out.stdout, out.stderr
    assert not (checkpoint / "extra_rank0.pt").exists()
    loaded = ckpt.load_checkpoint(checkpoint, *_fresh_model())
    assert loaded["step"] == 1 and torch.equal(loaded["rng"]["torch"], extra["rng"]["torch"])


def test_crafted_dcp_metadata_is_refused_before_dcp_unpickles_it(checkpoint, tmp_path):
    import pickle

    from kdlib.errors import CheckpointError
    from kdlib.parallel import checkpoint as ckpt

    marker = tmp_path / "owned"
    (checkpoint / ckpt_files.METADATA).write_bytes(pickle.dumps(_Payload(marker)))
    ckpt_files.write_manifest(checkpoint)  # whoever crafted it rewrote the checksums too
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(checkpoint, *_fresh_model())
    assert str(caught.value) == (f"cannot read {checkpoint / ckpt_files.METADATA}: it names pathlib.Path.touch, which "
                                 "checkpoint metadata never holds; refused")
    assert not marker.exists()


def test_non_tensor_values_of_the_shards_pass_the_weights_only_loader(tmp_path):
    import io
    import pickle
    from types import SimpleNamespace

    from kdlib.errors import CheckpointError
    from kdlib.parallel.checkpoint_files import plain_data_planner as _plain_data_planner

    marker = tmp_path / "owned"
    planner = _plain_data_planner()
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))
    with pytest.raises(CheckpointError, match=r"^the value optim.param_groups.0.lr is not plain data \("):
        planner.load_bytes(item, io.BytesIO(pickle.dumps(_Payload(marker))))
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ("flip", "__0_0.distcp differs from its checksum in checksums.sha256; the checkpoint was damaged or changed after it was written, refused"),
    ("add", "extra_rank1.json is not listed in checksums.sha256; the checkpoint was changed after it was written, refused"),
    ("remove", "trainer_state.json is missing (listed in checksums.sha256)"),
])
def test_a_checkpoint_that_differs_from_its_checksums_is_refused(change, message, checkpoint):
    import shutil

    from kdlib.errors import CheckpointError
    from kdlib.parallel import checkpoint as ckpt

    if change == "flip":
        data = bytearray((checkpoint / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0x10
        (checkpoint / "__0_0.distcp").write_bytes(bytes(data))
    elif change == "add":
        shutil.copy(checkpoint / "extra_rank0.json", checkpoint / "extra_rank1.json")
    else:
        (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(checkpoint, *_fresh_model())
    assert str(caught.value) == f"{checkpoint}: {message}"


def test_damaged_checkpoint_files_are_one_line(tmp_path):
    from kdlib.errors import CheckpointError

    directory = tmp_path / "step_1"
    _saved_checkpoint(directory)
    (directory / "trainer_state.json").write_text('{"step": ')
    ckpt_files.write_manifest(directory)  # damaged before it was published: the checksums agree
    with pytest.raises(CheckpointError) as caught:
        ckpt_files.verify_checkpoint(directory)
    assert str(caught.value) == f"cannot read {directory / 'trainer_state.json'}: Expecting value: line 1 column 10 (char 9)"
    (directory / "trainer_state.json").write_text('{"step": 1}')
    (directory / ckpt_files.METADATA).unlink()
    (directory / ckpt_files.MANIFEST).unlink()  # a checkpoint copied without its checksums
    with pytest.raises(CheckpointError) as caught:
        ckpt_files.verify_checkpoint(directory)
    assert str(caught.value) == f"{directory}: .metadata is missing; it is not a complete checkpoint"


def test_the_checksums_are_those_sha256sum_checks(checkpoint):
    import shutil
    import subprocess

    if shutil.which("sha256sum") is None:
        pytest.skip("needs sha256sum")
    out = subprocess.run(["sha256sum", "--strict", "-c", "checksums.sha256"], cwd=checkpoint, capture_output=True, text=True)
    assert out.returncode == 0 and "__0_0.distcp: OK" in out.stdout and ".metadata: OK" in out.stdout


# ----------------------------------------------------------------------------------------------
# The teacher cache: names from disk stay inside it


def _namespace():
    from kdlib.cache.fingerprint import FORMAT, CacheNamespace

    return CacheNamespace(FORMAT, "w", "t", "bfloat16", "hf", "sdpa", "cpu", "tok", "bfloat16")


def _sample(seed: int, rows: int = 3) -> TeacherOutput:
    g = torch.Generator().manual_seed(seed)
    return TeacherOutput(torch.randn(rows, 8, generator=g).bfloat16(), row_offsets=torch.tensor([0, rows]))


KEY_A, KEY_B = "a" * 32, "0123456789abcdef" * 2


@pytest.mark.parametrize("shard_name", ["../../victim", "../victim", "/abs/victim", "../../victim.safetensors"])
def test_a_crafted_index_cannot_reach_outside_the_cache(shard_name, tmp_path, caplog):
    import json

    from kdlib.cache.store import TeacherCache

    root, victim = tmp_path / "cache", tmp_path / "victim"
    victim.write_text("precious")
    if shard_name.startswith("/abs/"):
        shard_name = str(victim)
    TeacherCache.open(root, _namespace()).write({KEY_A: _sample(1)})
    (root / "index.json").write_text(json.dumps({shard_name: {KEY_B: [3, "f" * 32]}}))
    with caplog.at_level("WARNING"):
        cache = TeacherCache.open(root, _namespace())
        assert cache.verified_missing([KEY_A, KEY_B]) == [KEY_B]
        assert cache.fetch([KEY_B]).unserved == {KEY_B: "missing"}
    assert victim.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "victim"]
    assert "index.json is not usable" in caplog.text
    assert torch.equal(cache.read([KEY_A]).hidden, _sample(1).hidden)  # the shards' own headers were read


def test_links_in_the_cache_are_not_followed_nor_moved(tmp_path, caplog):
    from kdlib.cache.store import TeacherCache
    from kdlib.errors import ConfigError

    root, victim = tmp_path / "cache", tmp_path / "victim.bin"
    victim.write_bytes(b"not a shard at all")
    TeacherCache.open(root, _namespace()).write({KEY_A: _sample(1)})
    link = root / "shards" / ("b" * 32 + ".safetensors")
    link.symlink_to(victim)  # a valid shard name, pointing outside
    with caplog.at_level("WARNING"):
        cache = TeacherCache.open(root, _namespace())
    assert len(cache) == 1 and link.is_symlink() and victim.read_bytes() == b"not a shard at all"
    assert f"ignoring shards/{link.name}" in caplog.text

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    other = tmp_path / "other_cache"
    other.mkdir()
    (other / "shards").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"shards/ leads outside the cache directory .*; refused$"):
        TeacherCache.open(other, _namespace())


def test_a_crafted_shard_header_is_damage_and_only_the_shard_is_moved_aside(tmp_path, caplog):
    from safetensors.torch import save_file

    from kdlib.cache.fingerprint import FORMAT
    from kdlib.cache.store import TeacherCache

    root = tmp_path / "cache"
    TeacherCache.open(root, _namespace()).write({KEY_A: _sample(1)})
    crafted = root / "shards" / ("c" * 32 + ".safetensors")
    save_file({"x": torch.ones(2)}, str(crafted), metadata={"format": FORMAT, "samples": '{"../../victim": [2, "x"]}'})
    with caplog.at_level("WARNING"):
        cache = TeacherCache.open(root, _namespace())
    assert len(cache) == 1 and not crafted.exists() and crafted.with_suffix(".corrupt").exists()
    assert "is damaged (its sample list is not the one kdlib writes)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_cache_manifest_that_is_not_json_is_one_line(tmp_path):
    from kdlib.cache.store import TeacherCache
    from kdlib.errors import ConfigError

    root = tmp_path / "cache"
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_text("{half a manifest")
    for open_it in (lambda: TeacherCache.open(root, _namespace()), lambda: TeacherCache.for_reading(root)):
        with pytest.raises(ConfigError) as caught:
            open_it()
        assert str(caught.value).startswith(f"teacher.cache={root}: manifest.json is not JSON (Expecting property name")
        assert str(caught.value).endswith("it is not a kdlib teacher cache, or it was damaged: use another directory")


def test_keys_that_are_not_sample_keys_are_not_written(tmp_path):
    from kdlib.cache.store import TeacherCache

    cache = TeacherCache.open(tmp_path / "cache", _namespace())
    with pytest.raises(ValueError, match="is not a sample key"):
        cache.write({KEY_A[:-1] + ".topk_ids": _sample(1)})
