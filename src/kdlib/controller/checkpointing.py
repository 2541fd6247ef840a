"""Training checkpoints as the controller drives them: write atomically, keep the newest, resume.

A checkpoint is written by several parties into one staging directory (every student rank its
DCP shards and extras, teacher rank 0 the weights of a self-distillation teacher that follows the
student, the controller ``trainer_state.json``) and then published with one rename
(:mod:`kdlib.parallel.checkpoint`). A write that fails (a full disk, a dead worker) removes its
staging directory and stops the run with a one-line :class:`~kdlib.errors.CheckpointError` naming
the checkpoint that is still intact; a write that is killed leaves only a staging directory, which
the next save removes. The final student (Hugging Face format) is published the same way.

Resuming restores the student (weights, optimizer, schedule, RNG), the data position (the step)
and, when the teacher follows the student (``teacher.ema_decay`` or ``teacher.update_freq``), the
teacher's exact weights, so a resumed run continues as the uninterrupted one would have.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdlib.errors import CheckpointError, ConfigError, first_line
from kdlib.parallel import checkpoint as ckpt
from kdlib.progress import phase
from kdlib.tracking import write_json

if TYPE_CHECKING:
    from kdlib.config.schema import KDConfig
    from kdlib.workers.groups import StudentGroup, TeacherGroup

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TEACHER_WEIGHTS = "teacher.safetensors"


@dataclass
class Resumed:
    """What :meth:`Checkpoints.resume` restored."""

    step: int  # the optimizer steps already done (0: a fresh run)
    state: dict[str, Any]  # trainer_state.json of the checkpoint
    directory: Optional[Path] = None  # the checkpoint it came from
    teacher_restored: bool = False  # the self-distillation teacher's weights came from it


class Checkpoints:
    """Writes and restores the training checkpoints of one run."""

    def __init__(
        self, cfg: "KDConfig", run_dir: Path, students: "StudentGroup", teacher: Optional["TeacherGroup"],
        total_steps: int, tokenizer: Any = None,
    ) -> None:
        """``teacher``: a self-distillation teacher that follows the student (its weights are part
        of each checkpoint), else None; ``tokenizer``: saved beside the final student."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.students = students
        self.teacher = teacher
        self.total_steps = total_steps
        self.tokenizer = tokenizer

    @property
    def root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest(self) -> Optional[Path]:
        found = ckpt.complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(self, step: int, trainer_state: Optional[dict[str, Any]] = None) -> Path:
        """Write ``step_<step>`` atomically, then drop the oldest beyond ``train.keep_checkpoints``."""
        root = self.root
        for leftover in ckpt.partial_dirs(root):
            log.warning("removing %s, left by a checkpoint write that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        final = root / f"step_{step}"
        staging = ckpt.staging_dir(final)
        state = {"step": step, "total_steps": self.total_steps, "seed": self.cfg.seed, **(trainer_state or {})}
        try:
            with phase(f"writing checkpoint step_{step}", summary=False):
                self.students.save_checkpoint(str(staging), {"step": step})
                if self.teacher is not None:
                    self.teacher.save_weights(str(staging / TEACHER_WEIGHTS))
                write_json(staging / TRAINER_STATE, state)
                ckpt.publish(staging, final)
        except Exception as exc:  # noqa: BLE001 - a full disk surfaces as OSError, WorkerError or a library's own error
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {_reason(exc)}; {self._intact()}") from None
        log.info("checkpoint saved: %s", final)
        for _, old in ckpt.complete_checkpoints(root)[: -self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> Resumed:
        """Restore ``train.resume`` (a checkpoint, or a run directory: its newest complete one)."""
        source = self.cfg.train.resume
        if not source:
            return Resumed(step=0, state={})
        path = Path(source)
        directory = path if ckpt.is_complete(path) else ckpt.latest_checkpoint(path)
        if directory is None:
            raise ConfigError(f"train.resume: no complete checkpoint in {path}")
        ckpt.verify_checkpoint(directory)  # once here, not once per rank: the files are what was written
        try:
            state = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {directory / TRAINER_STATE}: {first_line(exc)}") from None
        self.students.load_checkpoint(str(directory))
        resumed = Resumed(step=step, state=state, directory=directory)
        if self.teacher is not None:
            weights = directory / TEACHER_WEIGHTS
            if weights.exists():
                self.teacher.load_saved_weights(str(weights))
                self.students.set_teacher_head(self.teacher.lm_head())
                resumed.teacher_restored = True
            else:
                log.warning("%s holds no teacher weights (an older checkpoint): the self-distillation "
                            "teacher restarts from the resumed student", directory)
        log.info("resumed from %s (step %d%s)", directory, resumed.step,
                 ", with the self-distillation teacher" if resumed.teacher_restored else "")
        return resumed

    def save_student(self, directory: Path) -> dict[str, Path]:
        """The final student in Hugging Face format (with its tokenizer, weights in
        ``save_dtype``), published atomically, and whatever the student transforms save beside it
        (LoRA: ``student_adapter/``); returns the directories by name."""
        from kdlib.models.loading import torch_dtype

        staging = ckpt.staging_dir(directory)
        try:
            with phase("saving the student"):
                saved = self.students.save(str(staging), torch_dtype(self.cfg.save_dtype))
                outputs = {name: Path(out) for name, out in saved.items()}
                if self.tokenizer is not None:
                    for out in outputs.values():
                        self.tokenizer.save_pretrained(out)
                ckpt.publish(staging, directory, mark_complete=False)
        except Exception as exc:  # noqa: BLE001 - e.g. safetensors' own error for a full disk
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot save the student to {directory}: {_reason(exc)}") from None
        outputs["student"] = directory
        return outputs

    def _intact(self) -> str:
        latest = self.latest()
        return f"the previous checkpoint {latest} is intact" if latest else "there is no earlier checkpoint"


def _reason(exc: BaseException) -> str:
    """One line for a failed write, with a hint for the common case of a full disk."""
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"{exc.strerror or exc} [{errno.errorcode.get(exc.errno, exc.errno)}]"
    else:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text:
        text += " (free some space, or lower train.keep_checkpoints)"
    return text
