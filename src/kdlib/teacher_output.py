"""The teacher-output carrier: everything a teacher sends for one micro-batch, as one typed object.

Its core is the teacher's signal at the rows the loss needs, one of (see ``teacher.signal``):

- ``hidden``: post-norm last-layer hidden states ``[n_rows, hidden]`` in the wire dtype (bf16 by
  default, never fp16); the student recomputes the teacher's logits with the teacher's head;
- ``topk_ids`` / ``topk_logprobs`` ``[n_rows, k]``: the teacher's k most probable tokens and their
  log-probabilities (normalised over the whole vocabulary), with ``topk_tail`` ``[n_rows]``, the
  log of the mass outside them, when the tail bucket is sent;
- ``sampled_ids`` / ``sampled_logprobs`` ``[n_rows, k]``: k tokens drawn per row and the teacher's
  log-probability of each, with ``sampled_proposal`` (the log-probability the drawing
  distribution gave each) when the draws did not come from the teacher's own distribution.

Token ids travel as uint16 when the vocabulary fits (int32 otherwise) and log-probabilities as
float32. Around the signal: per-sample row offsets (sample i owns rows
``row_offsets[i]:row_offsets[i+1]``), the dataset ids of those samples, and an optional alignment
object for cross-tokenizer methods. :meth:`TeacherOutput.check_values` is the signal's own
validation (ids in range, no NaN); the constructor checks shapes and dtypes.

Transports and the teacher cache move a carrier generically through :meth:`TeacherOutput.to_parts`
and :meth:`TeacherOutput.from_parts`: a flat ``{name: tensor}`` dict plus small JSON-able metadata.
A new tensor field (or a tensor field of a dataclass-valued field such as ``alignment``) travels
through every transport without any transport knowing about it.

The metadata comes from another process (or, through a transport, another machine), so it names a
dataclass-valued field's type by a name registered in :data:`CARRIER_TYPES`, never by a module
path: rebuilding a carrier imports nothing the message names, and a name that is not registered,
or fields the registered type does not have, are refused with one line (:class:`CarrierError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch

from kdlib.registry import Registry

# The dataclass types a carrier field may hold, by name (what travels in a message). kdlib's own
# are registered here, lazily, so that a receiving process knows them without importing them
# first; a plugin or a test registers its own with CARRIER_TYPES.register(name, cls).
CARRIER_TYPES: Registry[type] = Registry("teacher output field type")
CARRIER_TYPES.register("sent_rows", "kdlib.xtok.groups:SentRows")


_PLAIN = (bool, int, float, str, type(None))  # the non-tensor values a message may carry


class CarrierError(ValueError):
    """A teacher-output message names a type or fields kdlib does not build."""


# The fields of each signal (the first one of each is always present when the signal is sent).
SIGNAL_FIELDS = {
    "hidden": ("hidden",),
    "topk": ("topk_ids", "topk_logprobs", "topk_tail"),
    "sampled": ("sampled_ids", "sampled_logprobs", "sampled_proposal"),
}
# Every field with one entry per row: what splitting, joining and row selection act on.
ROW_FIELDS = tuple(name for names in SIGNAL_FIELDS.values() for name in names)
_ID_DTYPES = (torch.uint16, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float64)


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest dtype token ids of a ``vocab_size`` vocabulary travel in."""
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


@dataclass
class TeacherOutput:
    """What a teacher sends for one micro-batch (rows in (sample, position) order): exactly one
    signal (``hidden``, ``topk_*`` or ``sampled_*``) and its bookkeeping."""

    # Post-norm last-layer hidden states at the loss rows, [n_rows, hidden], wire dtype.
    hidden: Optional[torch.Tensor] = None
    # [n_samples + 1] int64 cumulative row counts: sample i owns rows offsets[i]:offsets[i + 1].
    row_offsets: Optional[torch.Tensor] = None
    # [n_samples] int64 dataset row ids of the samples, in order.
    sample_ids: Optional[torch.Tensor] = None
    # [n_rows, k] token ids (uint16 / int32) and float32 log-probabilities of the teacher's top k,
    # most probable first; [n_rows] float32 log of the probability outside them (-inf: none).
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    topk_tail: Optional[torch.Tensor] = None
    # [n_rows, k] token ids drawn per row (with replacement) and the teacher's log-probability of
    # each; sampled_proposal: the drawing distribution's log-probability of each (None: the
    # teacher's own distribution, so every draw weighs 1/k).
    sampled_ids: Optional[torch.Tensor] = None
    sampled_logprobs: Optional[torch.Tensor] = None
    sampled_proposal: Optional[torch.Tensor] = None
    # A dataclass of tensors describing cross-tokenizer alignment (or any per-row side data a
    # method defines); moved generically, interpreted only by the algorithm that asked for it.
    alignment: Optional[Any] = None

    def __post_init__(self) -> None:
        sent = [kind for kind, names in SIGNAL_FIELDS.items() if getattr(self, names[0]) is not None]
        if len(sent) != 1:
            raise ValueError(f"a teacher output carries exactly one signal (hidden, topk or sampled), got {sent or 'none'}")
        self._check_shapes(sent[0])
        rows = self.n_rows
        if self.row_offsets is not None:
            offsets = self.row_offsets
            if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != rows:
                raise ValueError(f"row_offsets must run from 0 to {rows} rows, got {offsets.tolist()}")
            if self.sample_ids is not None and self.sample_ids.numel() != offsets.numel() - 1:
                raise ValueError(f"{self.sample_ids.numel()} sample ids for {offsets.numel() - 1} samples")

    def _check_shapes(self, kind: str) -> None:
        """The fields of ``kind`` agree in rows, width and dtype; no field of another signal."""
        names = SIGNAL_FIELDS[kind]
        first = getattr(self, names[0])
        if kind == "hidden":
            if first.dim() != 2:
                raise ValueError(f"teacher hidden states must be [rows, hidden], got {tuple(first.shape)}")
            return
        ids, values, extra = (getattr(self, name) for name in names)
        if ids.dim() != 2 or values is None or values.shape != ids.shape:
            shape = None if values is None else tuple(values.shape)
            raise ValueError(f"{names[0]} {tuple(ids.shape)} and {names[1]} {shape} must both be [rows, k]")
        if ids.dtype not in _ID_DTYPES or values.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{names[0]} must be uint16/int32/int64 and {names[1]} float32, got {ids.dtype}, {values.dtype}")
        want = (ids.shape[0],) if kind == "topk" else tuple(ids.shape)
        if extra is not None and (tuple(extra.shape) != want or extra.dtype not in _FLOAT_DTYPES):
            raise ValueError(f"{names[2]} must be {list(want)} float32, got {tuple(extra.shape)} {extra.dtype}")

    @property
    def signal(self) -> str:
        """The signal this output carries: hidden, topk or sampled."""
        return next(kind for kind, names in SIGNAL_FIELDS.items() if getattr(self, names[0]) is not None)

    @property
    def device(self) -> torch.device:
        return getattr(self, SIGNAL_FIELDS[self.signal][0]).device

    @property
    def n_rows(self) -> int:
        return getattr(self, SIGNAL_FIELDS[self.signal][0]).shape[0]

    @property
    def n_samples(self) -> int:
        return 0 if self.row_offsets is None else self.row_offsets.numel() - 1

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor carried (what a remote transport moves)."""
        tensors, _ = self.to_parts()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def check_rows(self, expected: int, what: str = "loss tokens") -> None:
        """The one check that teacher and student agree on the number of rows."""
        if self.n_rows != expected:
            label = {"hidden": "hidden-state", "topk": "top-k"}.get(self.signal, self.signal)
            raise ValueError(f"the teacher sent {self.n_rows} {label} rows for {expected} {what}")

    def check_values(self, vocab_size: Optional[int] = None) -> Optional[str]:
        """What is wrong with the signal's values, in a few words (None: nothing): hidden states
        and log-probabilities must not be NaN or +inf (log-probabilities not above 0, a little
        rounding aside), ids must be in the vocabulary."""
        kind = self.signal
        if kind == "hidden":
            bad = ~torch.isfinite(self.hidden).all(dim=-1)
            return f"hidden states that are not finite (NaN or inf) at {int(bad.sum())} of {bad.numel()} loss positions" if bad.any() else None
        for name in SIGNAL_FIELDS[kind][1:]:
            values = getattr(self, name)
            if values is not None and bool((torch.isnan(values) | (values > 1e-3)).any()):
                return f"{name} that are NaN or above 0 (not log-probabilities)"
        ids = getattr(self, SIGNAL_FIELDS[kind][0]).long()
        if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
            return f"{kind}_ids outside the vocabulary [0, {vocab_size})"
        return None

    def to(self, device: torch.device | str) -> "TeacherOutput":
        """A copy with every tensor on ``device`` (dtypes unchanged; no copy when already there)."""
        tensors, meta = self.to_parts()
        return TeacherOutput.from_parts({k: v.to(device) for k, v in tensors.items()}, meta)

    def select_rows(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """``{field: rows of it}`` for every per-row field present (views for a slice)."""
        return {name: getattr(self, name)[rows] for name in ROW_FIELDS if getattr(self, name) is not None}

    def sample_rows(self, index: int) -> "TeacherOutput":
        """The rows of sample ``index`` as an output of one sample (views, no copy)."""
        if self.row_offsets is None:
            raise ValueError("this teacher output has no per-sample row offsets")
        start, stop = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        if self.alignment is not None:
            raise ValueError("cannot split an output that carries an alignment; recompute it from the data")
        return TeacherOutput(
            row_offsets=torch.tensor([0, stop - start], dtype=torch.long),
            sample_ids=None if self.sample_ids is None else self.sample_ids[index : index + 1],
            **self.select_rows(slice(start, stop)),
        )

    @staticmethod
    def concat(outputs: Sequence["TeacherOutput"]) -> "TeacherOutput":
        """Outputs of consecutive samples joined into one (offsets shifted, ids appended)."""
        if not outputs:
            raise ValueError("nothing to concatenate")
        if any(o.row_offsets is None for o in outputs):
            raise ValueError("only outputs with per-sample row offsets can be concatenated")
        if any(o.alignment is not None for o in outputs):
            raise ValueError("outputs that carry an alignment cannot be concatenated")
        counts = torch.cat([torch.diff(o.row_offsets) for o in outputs])
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=offsets[1:])

        def joined(name: str) -> Optional[torch.Tensor]:
            values = [getattr(o, name) for o in outputs]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"some outputs carry {name} and others do not")
            return torch.cat(values)

        return TeacherOutput(
            row_offsets=offsets, sample_ids=joined("sample_ids"), **{name: joined(name) for name in ROW_FIELDS},
        )

    # ------------------------------------------------------------------------------------------
    # Generic movement: a flat dict of tensors plus JSON-able metadata

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``({field or field.subfield: tensor}, metadata)``; None fields are left out."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"types": {}}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value
            elif dataclasses.is_dataclass(value):
                meta["types"][f.name] = carrier_type_name(type(value))
                for sub in fields(value):
                    item = getattr(value, sub.name)
                    if isinstance(item, torch.Tensor):
                        tensors[f"{f.name}.{sub.name}"] = item
                    else:
                        meta.setdefault("values", {})[f"{f.name}.{sub.name}"] = item
            else:
                raise TypeError(f"teacher output field {f.name!r} holds a {type(value).__name__}, not a tensor or dataclass")
        return tensors, meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "TeacherOutput":
        """Inverse of :meth:`to_parts`; builds only :class:`TeacherOutput` and the registered
        :data:`CARRIER_TYPES`, with exactly their fields (else :class:`CarrierError`)."""
        if not isinstance(meta, dict) or not set(meta) <= {"types", "values"}:
            raise CarrierError(f"teacher output message: unexpected metadata {_short(meta)}")
        types, values = meta.get("types", {}), meta.get("values", {})
        if not isinstance(types, dict) or not isinstance(values, dict):
            raise CarrierError(f"teacher output message: unexpected metadata {_short(meta)}")
        own = {f.name for f in fields(cls)}
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(values.items()):
            name, dot, sub = str(key).partition(".")
            if name not in own or bool(dot) != (name in types) or (not dot and not isinstance(value, torch.Tensor)):
                raise CarrierError(f"teacher output message: unexpected field {str(key)[:80]!r}")
            if not isinstance(value, (torch.Tensor, *_PLAIN)):
                raise CarrierError(f"teacher output message: field {str(key)[:80]!r} holds a {type(value).__name__}")
            if dot:
                nested.setdefault(name, {})[sub] = value
            else:
                top[name] = value
        for name, type_name in types.items():
            if name not in own:
                raise CarrierError(f"teacher output message: unexpected field {str(name)[:80]!r}")
            top[name] = _build(type_name, nested.get(name, {}))
        return cls(**top)


def carrier_type_name(cls: type) -> str:
    """The registered name of a dataclass a carrier field holds (TypeError if there is none)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    for entry in CARRIER_TYPES:
        if entry.target is cls or entry.target == path:
            return entry.name
    raise TypeError(f"{cls.__qualname__} is not a registered teacher output field type; register it with "
                    "kdlib.teacher_output.CARRIER_TYPES.register(name, cls)")


def _build(type_name: Any, values: dict[str, Any]) -> Any:
    """An instance of the registered type ``type_name`` from exactly its fields."""
    if not isinstance(type_name, str) or type_name not in CARRIER_TYPES:
        raise CarrierError(f"teacher output message: unknown field type {str(type_name)[:80]!r}; "
                           f"choose one of: {', '.join(CARRIER_TYPES.names())}")
    cls = CARRIER_TYPES.get(type_name)
    expected = {f.name for f in fields(cls) if f.init}
    if set(values) != expected:
        unexpected, absent = sorted(set(values) - expected), sorted(expected - set(values))
        raise CarrierError(
            f"teacher output message: {type_name} takes the fields {sorted(expected)}"
            + (f", not {[u[:40] for u in unexpected]}" if unexpected else "")
            + (f"; missing {absent}" if absent else "")
        )
    return cls(**values)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
