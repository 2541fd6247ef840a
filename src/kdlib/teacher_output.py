"""The teacher-output carrier: everything a teacher sends for one micro-batch, as one typed object.

The core of it is the teacher's post-norm last-layer hidden states at the rows the loss needs,
``[n_rows, hidden]`` in the wire dtype (bf16 by default, never fp16). Around them it carries what
particular methods need: per-sample row offsets (sample i owns rows ``row_offsets[i]:row_offsets[i+1]``),
the dataset ids of those samples, top-k log-probabilities when an inference engine returns them,
and an optional alignment object for cross-tokenizer methods. Algorithms read the extra fields;
the fused loss only ever sees ``hidden`` (its 1:1 rows contract is unchanged).

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


@dataclass
class TeacherOutput:
    """What a teacher sends for one micro-batch (rows in (sample, position) order)."""

    # Post-norm last-layer hidden states at the loss rows, [n_rows, hidden], wire dtype.
    hidden: torch.Tensor
    # [n_samples + 1] int64 cumulative row counts: sample i owns rows offsets[i]:offsets[i + 1].
    row_offsets: Optional[torch.Tensor] = None
    # [n_samples] int64 dataset row ids of the samples, in order.
    sample_ids: Optional[torch.Tensor] = None
    # [n_rows, k] int64 / float32: an engine's top-k token ids and log-probabilities per row.
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    # A dataclass of tensors describing cross-tokenizer alignment (or any per-row side data a
    # method defines); moved generically, interpreted only by the algorithm that asked for it.
    alignment: Optional[Any] = None

    def __post_init__(self) -> None:
        rows = self.hidden.shape[0]
        if self.hidden.dim() != 2:
            raise ValueError(f"teacher hidden states must be [rows, hidden], got {tuple(self.hidden.shape)}")
        if self.row_offsets is not None:
            offsets = self.row_offsets
            if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != rows:
                raise ValueError(f"row_offsets must run from 0 to {rows} rows, got {offsets.tolist()}")
            if self.sample_ids is not None and self.sample_ids.numel() != offsets.numel() - 1:
                raise ValueError(f"{self.sample_ids.numel()} sample ids for {offsets.numel() - 1} samples")
        for name in ("topk_ids", "topk_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != rows:
                raise ValueError(f"{name} has {value.shape[0]} rows, hidden states {rows}")

    @property
    def n_rows(self) -> int:
        return self.hidden.shape[0]

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
            raise ValueError(f"the teacher sent {self.n_rows} hidden-state rows for {expected} {what}")

    def to(self, device: torch.device | str) -> "TeacherOutput":
        """A copy with every tensor on ``device`` (dtypes unchanged; no copy when already there)."""
        tensors, meta = self.to_parts()
        return TeacherOutput.from_parts({k: v.to(device) for k, v in tensors.items()}, meta)

    def sample_rows(self, index: int) -> "TeacherOutput":
        """The rows of sample ``index`` as an output of one sample (views, no copy)."""
        if self.row_offsets is None:
            raise ValueError("this teacher output has no per-sample row offsets")
        start, stop = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        if self.alignment is not None:
            raise ValueError("cannot split an output that carries an alignment; recompute it from the data")
        return TeacherOutput(
            hidden=self.hidden[start:stop],
            row_offsets=torch.tensor([0, stop - start], dtype=torch.long),
            sample_ids=None if self.sample_ids is None else self.sample_ids[index : index + 1],
            topk_ids=None if self.topk_ids is None else self.topk_ids[start:stop],
            topk_logprobs=None if self.topk_logprobs is None else self.topk_logprobs[start:stop],
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
            hidden=torch.cat([o.hidden for o in outputs]),
            row_offsets=offsets,
            sample_ids=joined("sample_ids"),
            topk_ids=joined("topk_ids"),
            topk_logprobs=joined("topk_logprobs"),
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
