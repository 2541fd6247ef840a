"""Registering the schema and the registry-backed group options in Hydra's ConfigStore.

Groups whose options are implementations (``loss``, ``algorithm``, ``transport``, ``launcher``,
``rollout``, ``teacher/backend``, ``reward``) get one option per registered name, typed by that entry's config
class. This runs when a config is composed, not at import, so a plugin module imported just before
composition (``plugins=[my_module]``) contributes its options like a built-in would.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from kdlib.config.schema import KDConfig
from kdlib.config.training import TransportConfig

SCHEMA_NAME = "kdlib_schema"


def registry_groups() -> dict[str, tuple[object, str]]:
    """Config group (its node at the path with ``/`` read as ``.``) -> (registry, the field of
    the node that holds the option's name)."""
    from kdlib.algorithms import ALGORITHMS
    from kdlib.backends import ROLLOUT_BACKENDS, TEACHER_BACKENDS
    from kdlib.launch import LAUNCHERS
    from kdlib.losses import LOSSES
    from kdlib.rewards import REWARDS
    from kdlib.transport import TRANSPORTS

    return {
        "algorithm": (ALGORITHMS, "name"),
        "loss": (LOSSES, "name"),
        "transport": (TRANSPORTS, "name"),
        "launcher": (LAUNCHERS, "name"),
        "rollout": (ROLLOUT_BACKENDS, "backend"),
        "teacher/backend": (TEACHER_BACKENDS, "name"),
        "reward": (REWARDS, "name"),
    }


def _for_student_model(model, value, *, _root_):
    """``value`` while the student is ``model`` and sets no depth of its own, else null."""
    student = _root_.student
    asked = student.get("num_layers") is not None or student.get("keep_layers") is not None
    return value if student.model == model and not asked else None


def register_configs() -> None:
    """(Re)store the schema and one option per registry entry, and kdlib's config resolvers;
    idempotent."""
    from omegaconf import OmegaConf

    # a sweep job's directory from its overrides: a path in a value must not make subdirectories
    OmegaConf.register_new_resolver("kdlib_dirname", lambda text: str(text).replace("/", "_"), replace=True)
    # a student preset's pruning, for the model the preset was measured on: the value while the
    # student is that model, null once the user gives a student.model of their own or a
    # student.num_layers / keep_layers (a user's model is never pruned unasked)
    OmegaConf.register_new_resolver("kdlib_for_student_model", _for_student_model, replace=True)
    global _stored
    store = ConfigStore.instance()
    groups = registry_groups()
    # what the store holds is a function of the registries' entries (Hydra deep-copies a stored
    # node on every load, so composing never changes it): stored again only when an entry was
    # added or changed (a plugin imported since), not on every composition (a quarter of its time)
    fingerprint = (store, tuple((group, entry.name, entry.config_cls) for group, (registry, _) in groups.items()
                                for entry in registry))
    if fingerprint == _stored:
        return
    store.store(name=SCHEMA_NAME, node=KDConfig)
    for group, (registry, key) in groups.items():
        for entry in registry:
            if entry.config_cls is None:
                continue
            store.store(group=group, name=entry.name, node=entry.config_cls(**{key: entry.name}))
    # transport=auto (the default) follows the launcher; resolved before the run
    store.store(group="transport", name="auto", node=TransportConfig(name="auto"))
    _stored = fingerprint


_stored: object = None  # the fingerprint of the registries last stored (see register_configs)
