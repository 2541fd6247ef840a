"""Several teachers in one run, as the pipeline builds them: views of the data, caches, groups, heads.

For a routed run (``teachers`` / ``routing``, see docs/multi_teacher.md) :func:`routed_data` loads
the data with each teacher's view of it (its tokenizer and template, its privileged prompt, the
byte-offset aligner of cross-tokenizer algorithms; a teacher's tokenizer is loaded the first time a
row routes to it, and a tokenizer that cannot be compared with the student's is a one-line error
naming the teacher, before any model loads). :meth:`Teachers.build` then gives every teacher that
some sample is routed to its teacher cache (``teachers.<name>.cache``: opened, refused and served
exactly like ``teacher.cache``), its own worker group (on Ray, placed by that teacher's resources)
unless its cache covers every sample it scores, its head (from a worker, or from the checkpoint
files) and its matched vocabulary. Teachers no sample is routed to are never loaded.

With ``routing.take_turns`` one teacher is loaded at a time: the others' workers stay up but hold
no model (:meth:`TeacherWorker.unload`), and :meth:`Teachers.turn` unloads the resident teacher
before loading the next, so a machine holds the largest teacher, not their sum. Which teacher is
resident is part of a checkpoint; a resumed run starts with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from kdlib.algorithms.routed import TeacherSide
from kdlib.config.schema import KDConfig
from kdlib.config.teachers import config_key, named_teachers
from kdlib.controller import assembly, modality
from kdlib.controller.mode import Needs, TeacherNeed
from kdlib.data.encoding import ChatEncoder
from kdlib.data.routed import RoutedDataBundle, TeacherView
from kdlib.data.routes import Router
from kdlib.errors import ConfigError
from kdlib.launch import Launcher
from kdlib.models.loading import load_tokenizer
from kdlib.workers.groups import TeacherGroup

if TYPE_CHECKING:
    from kdlib.cache.store import TeacherCache

log = logging.getLogger(__name__)


def routed_data(cfg: KDConfig, *, prompts: bool, responses: bool) -> RoutedDataBundle:
    """The run's samples and prompts, each routed and seen by the teachers of its route."""
    from kdlib.algorithms import ALGORITHMS

    modality.require_text_model(cfg.student, "student", "several teachers (teachers / routing)")
    student = ChatEncoder(load_tokenizer(cfg.student), apply_chat_template=cfg.data.apply_chat_template, name="student")
    configs = named_teachers(cfg)
    across = assembly.cross_tokenizer(cfg)

    def make_view(name: str) -> TeacherView:
        teacher, key = configs[name], config_key(name)
        input_key = cfg.routing.input_keys.get(name, cfg.data.teacher_input_key)
        try:
            encoder = assembly.teacher_encoder(cfg, teacher, student, privileged=bool(input_key), name=key)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        aligner = assembly.response_aligner(cfg, student, encoder, teacher, name=key) if across else None
        return TeacherView(encoder, aligner, input_key)

    bundle = RoutedDataBundle(
        student_pad_id=student.pad_id, teacher_pad_id=None, student_encoder=student, router=Router.of(cfg),
        make_view=make_view, combine={name: e.combine.value for name, e in cfg.routing.ensembles.items()},
    )
    algorithm = ALGORITHMS.get(cfg.algorithm.name)
    bundle.mix_routes = cfg.routing.mix_micro_batches and algorithm.shares_forward()
    if across:
        bundle.row_kind = algorithm.teacher_row_kind(cfg.algorithm)
    return assembly.fill_bundle(cfg, bundle, prompts=prompts, responses=responses)


def teacher_keys(data: RoutedDataBundle, name: str) -> list[str]:
    """The teacher-cache keys of every sample teacher ``name`` scores (its own view of each)."""
    keys = []
    for sample in [*data.train, *data.eval]:
        route = sample.route
        if name in route.members:
            keys.append((sample if name == route.teacher else route.others[name]).teacher_key())
    return keys


@dataclass
class Teachers:
    """The teachers a routed run uses, by name."""

    cfg: KDConfig
    launcher: Launcher
    names: list[str]  # the teachers some sample or prompt is routed to, in the router's order
    caches: dict[str, Optional["TeacherCache"]]
    groups: dict[str, TeacherGroup] = field(default_factory=dict)  # started groups (loaded or not)
    sides: dict[str, TeacherSide] = field(default_factory=dict)  # what every student gets of each
    loaded: set[str] = field(default_factory=set)  # teachers whose model is in memory
    resident: Optional[str] = None  # with take_turns: the one loaded teacher
    turns: int = 0  # teacher loads after the start (take_turns)

    @property
    def take_turns(self) -> bool:
        return self.cfg.routing.take_turns

    @classmethod
    def build(cls, cfg: KDConfig, launcher: Launcher, data: RoutedDataBundle, needs: Needs) -> "Teachers":
        """Caches, groups and heads of the teachers ``data`` routes samples to (module docstring)."""
        configs = named_teachers(cfg)
        names = data.needed_teachers()
        unused = [n for n in configs if n not in names]
        if unused:
            log.info("no sample is routed to %s: not loaded", ", ".join(unused))
        caches = {}
        for name in names:
            teacher = configs[name]
            encoder = data.view(name).encoder or data.student_encoder
            caches[name] = assembly.open_teacher_cache(cfg, encoder, teacher=teacher) if teacher.cache else None
        teachers = cls(cfg, launcher, names, caches)
        for name in names:
            if teachers._needs_workers(name, needs, data):
                group = teachers.start(name)
                head = group.lm_head()
            else:
                from kdlib.models.checkpoint_head import load_lm_head

                head = load_lm_head(configs[name])
            aligner = data.view(name).aligner
            teachers.sides[name] = TeacherSide(head, None if aligner is None else aligner.vocab_match())
        return teachers

    def _needs_workers(self, name: str, needs: Needs, data: RoutedDataBundle) -> bool:
        cache = self.caches[name]
        if cache is None or needs.teacher is TeacherNeed.always:
            return True
        keys = teacher_keys(data, name)
        missing = len(cache.verified_missing(keys))
        if missing:
            log.info("teacher %s: cache %s lacks %d of %d samples; the teacher computes and stores them",
                     name, cache.root, missing, len(keys))
        else:
            log.info("teacher %s: cache %s covers all %d samples: its model is not loaded", name, cache.root, len(keys))
        return missing > 0

    def start(self, name: str) -> TeacherGroup:
        """Start ``name``'s worker group (loading its model; with take_turns, after unloading the
        resident teacher)."""
        if self.take_turns:
            self._unload_resident()
        group = assembly.start_teacher(self.cfg, self.launcher, self.caches[name], name)
        self.groups[name] = group
        self.loaded.add(name)
        self.resident = name
        return group

    def turn(self, name: str) -> TeacherGroup:
        """``name``'s group, its model loaded (with take_turns: the only one loaded)."""
        if name not in self.groups:
            self.turns += int(self.take_turns and self.resident is not None)
            return self.start(name)
        if name not in self.loaded:
            self._unload_resident()
            self.groups[name].load()
            self.loaded.add(name)
            self.turns += 1
        self.resident = name
        return self.groups[name]

    def _unload_resident(self) -> None:
        for name in list(self.loaded):
            self.groups[name].unload()
            self.loaded.discard(name)

    def order(self, names: list[str]) -> list[str]:
        """The order in which ``names`` get their turn: the resident teacher first."""
        ordered = [n for n in self.names if n in names]
        if self.resident in ordered:
            ordered.remove(self.resident)
            ordered.insert(0, self.resident)
        return ordered
