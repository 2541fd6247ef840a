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


SIGNAL_TENSORS = {"hidden": {"hidden"}, "topk": {"topk_ids", "topk_logprobs", "topk_tail"},
                  "sampled": {"sampled_ids", "sampled_logprobs", "sampled_proposal"}}


@pytest.mark.parametrize("signal", ["hidden", "topk", "sampled"])
def test_parts_round_trip_every_field(signal):
    output = full_teacher_output(signal)
    assert output.signal == signal
    tensors, meta = output.to_parts()
    assert set(tensors) == {"row_offsets", "sample_ids", "alignment.teacher_rows", "alignment.student_rows",
                            "alignment.weights"} | SIGNAL_TENSORS[signal]
    assert meta["types"]["alignment"] == "example_alignment"  # a registered name, not a module path
    back = TeacherOutput.from_parts(tensors, meta)
    assert isinstance(back.alignment, ExampleAlignment)
    _same(back, output)
    assert output.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("signal", ["hidden", "topk", "sampled"])
def test_in_process_transport_hands_over_every_field(signal):
    """The in-process transport hands the object itself over (no copy), every field intact, and
    counts what a remote transport would move; a copy made before publishing is the reference, so
    the comparison is not of an object with itself."""
    output = full_teacher_output(signal)
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
    with pytest.raises(ValueError, match=r"exactly one signal .* got \['hidden', 'topk'\]"):
        TeacherOutput(hidden, topk_ids=torch.zeros(5, 2, dtype=torch.long), topk_logprobs=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="exactly one signal .* got none"):
        TeacherOutput(row_offsets=torch.tensor([0]))
    with pytest.raises(ValueError, match="sent 5 hidden-state rows for 6 loss tokens"):
        TeacherOutput(hidden).check_rows(6)
    ids = torch.zeros(5, 2, dtype=torch.uint16)
    with pytest.raises(ValueError, match=r"topk_ids \(5, 2\) and topk_logprobs \(4, 2\) must both be \[rows, k\]"):
        TeacherOutput(topk_ids=ids, topk_logprobs=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="must be uint16/int32/int64 and topk_logprobs float32"):
        TeacherOutput(topk_ids=ids.float(), topk_logprobs=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"topk_tail must be \[5\] float32"):
        TeacherOutput(topk_ids=ids, topk_logprobs=torch.zeros(5, 2), topk_tail=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"sampled_proposal must be \[5, 2\] float32"):
        TeacherOutput(sampled_ids=ids, sampled_logprobs=torch.zeros(5, 2), sampled_proposal=torch.zeros(5))
    with pytest.raises(ValueError, match="sent 5 top-k rows for 6 loss tokens"):
        TeacherOutput(topk_ids=ids, topk_logprobs=torch.zeros(5, 2)).check_rows(6)


def test_signal_values_are_checked():
    """check_values names what is wrong: non-finite hidden states, log-probabilities that are NaN
    or above 0, ids outside the vocabulary; sound values pass."""
    assert TeacherOutput(torch.randn(3, 4)).check_values() is None
    assert "not finite" in TeacherOutput(torch.tensor([[0.0, float("nan")]])).check_values()
    good = full_teacher_output("topk")
    assert good.check_values(vocab_size=1000) is None
    assert "outside the vocabulary [0, 10)" in good.check_values(vocab_size=10)
    bad = TeacherOutput(sampled_ids=good.topk_ids, sampled_logprobs=-good.topk_logprobs)
    assert "sampled_logprobs that are NaN or above 0" in bad.check_values()


@pytest.mark.parametrize("signal", ["hidden", "topk", "sampled"])
def test_split_into_samples_and_join_back(signal):
    output = full_teacher_output(signal)
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
