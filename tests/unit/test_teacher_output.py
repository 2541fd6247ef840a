"""The teacher-output carrier: consistency checks, per-sample split and join, generic movement."""

from __future__ import annotations

import pytest
import torch

from carrier_doubles import ExampleAlignment, full_teacher_output
from kdlib.batch import TokenBatch
from kdlib.config import TransportConfig
from kdlib.teacher_output import TeacherOutput
from kdlib.transport.base import InProcessTransport


def _same(a: TeacherOutput, b: TeacherOutput) -> None:
    ta, ma = a.to_parts()
    tb, mb = b.to_parts()
    assert ma == mb and sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def test_parts_round_trip_every_field():
    output = full_teacher_output()
    tensors, meta = output.to_parts()
    assert set(tensors) == {"hidden", "row_offsets", "sample_ids", "topk_ids", "topk_logprobs",
                            "alignment.teacher_rows", "alignment.student_rows", "alignment.weights"}
    assert meta["types"]["alignment"] == "example_alignment"  # a registered name, not a module path
    back = TeacherOutput.from_parts(tensors, meta)
    assert isinstance(back.alignment, ExampleAlignment)
    _same(back, output)
    assert output.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_in_process_transport_hands_over_every_field():
    """The in-process transport hands the object itself over (no copy), every field intact, and
    counts what a remote transport would move; a copy made before publishing is the reference, so
    the comparison is not of an object with itself."""
    output = full_teacher_output()
    reference = TeacherOutput.from_parts(*[{k: v.clone() for k, v in output.to_parts()[0].items()},
                                           output.to_parts()[1]])
    transport = InProcessTransport(TransportConfig(name="inprocess"))
    fetched = transport.fetch(transport.publish(output))
    assert fetched is output  # no copy in one process
    _same(fetched, reference)
    assert transport.stats.take().bytes == 2 * reference.nbytes > 0  # publish and fetch both counted
    moved = output.to("cpu")  # .to() builds a new carrier with every field (here: nothing to move)
    assert moved is not output
    _same(moved, reference)
    with pytest.raises(TypeError, match="same transport"):
        transport.fetch(object())


def test_inconsistent_outputs_are_refused():
    hidden = torch.randn(5, 4)
    with pytest.raises(ValueError, match="row_offsets must run from 0 to 5"):
        TeacherOutput(hidden, row_offsets=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="3 sample ids for 2 samples"):
        TeacherOutput(hidden, row_offsets=torch.tensor([0, 2, 5]), sample_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="topk_ids has 4 rows"):
        TeacherOutput(hidden, topk_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sent 5 hidden-state rows for 6 loss tokens"):
        TeacherOutput(hidden).check_rows(6)


def test_split_into_samples_and_join_back():
    output = full_teacher_output()
    output.alignment = None  # alignments are recomputed from data, never split
    parts = [output.sample_rows(i) for i in range(output.n_samples)]
    assert [p.n_rows for p in parts] == [4, 0, 5]
    _same(TeacherOutput.concat(parts), output)


def test_loss_rows_per_sample_padded_and_packed():
    loss = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    padded = TokenBatch(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), loss)
    assert padded.loss_rows_per_sample().tolist() == [2, 1]
    packed = TokenBatch(
        torch.ones(1, 7, dtype=torch.long), None,
        torch.tensor([[0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool),
        position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
    )
    assert packed.loss_rows_per_sample().tolist() == [2, 1]
