"""Files and messages from elsewhere cannot run code, import a module or touch a file outside
their directory: a crafted checkpoint, teacher cache or carrier message is refused in one line
(docs/reliability.md, "What is trusted")."""

from __future__ import annotations

import pytest
import torch

from carrier_doubles import ExampleAlignment, full_teacher_output
from kdlib.teacher_output import CARRIER_TYPES, CarrierError, TeacherOutput

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


@pytest.mark.parametrize("type_name", ["os:system", "builtins:eval", "kdlib.testing:ExampleAlignment"])
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
