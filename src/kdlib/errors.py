"""Errors a user can fix: bad config, bad data, a model kdlib cannot distil.

They carry a one-line message naming the key, file or row at fault; the command line prints that
line alone (no traceback), while other exceptions are bugs and keep their traceback.
"""


class KdlibError(Exception):
    """Base of the user-facing errors."""


class ConfigError(KdlibError, ValueError):
    """A key, type or value of the composed config is wrong."""


class FrozenConfigError(ConfigError):
    """Something tried to change a run's config after it was resolved and written to config.yaml."""


class DataError(KdlibError, ValueError):
    """A dataset file, column or row cannot be used."""


class RewardError(KdlibError, ValueError):
    """A reward function failed on a rollout (it raised, or returned no finite number); the message
    names the reward, its function and the sample's data row."""


class ModelError(KdlibError, RuntimeError):
    """A model or tokenizer cannot be loaded or used as configured."""


class TeacherUnavailable(ModelError):
    """A teacher kdlib does not run (a served teacher) cannot be reached or answers wrongly after
    its retries: the students are intact, so a run that stops on it checkpoints its last step."""


class WorkerError(KdlibError, RuntimeError):
    """A worker process failed or died; the message names it."""


class CheckpointError(KdlibError, RuntimeError):
    """A checkpoint or the final student could not be written (a full disk, no permission); the
    message names the directory and the complete checkpoint that is still intact."""


class TrainingError(KdlibError, RuntimeError):
    """Training cannot go on (the loss or the gradients stayed non-finite for too many steps)."""


class Interrupted(KdlibError):
    """The run stopped on SIGINT or SIGTERM after writing a checkpoint it can resume from.

    ``exit_code`` follows the shell convention (128 + signal number); ``resume_dir`` is what
    ``train.resume`` takes to continue (None when nothing was trained yet); the command line sets
    ``command`` to the exact command that resumes."""

    def __init__(self, message: str, *, signal_number: int, resume_dir: "str | None") -> None:
        super().__init__(message)
        self.what = message
        self.signal_number = signal_number
        self.resume_dir = resume_dir
        self.command: "str | None" = None
        self.exit_code = 128 + signal_number

    def __str__(self) -> str:
        if self.resume_dir is None:
            return self.what
        return f"{self.what}; resume with: {self.command or f'train.resume={self.resume_dir}'}"


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none): what a
    one-line error or log message quotes of a library's multi-line error."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__
