"""Where each role's Ray actors go: per-role resources, one placement group per role, node names.

A multi-node layout is expressed with Ray's own means. Each role (teacher, student, rollout) has a
:class:`RolePlacement` under ``launcher.<role>``: the CPUs and GPUs each worker asks for and any
custom resources, such as ``{node_b: 1}`` for a node started with
``ray start --resources='{"node_b": 64}'``. The workers of a role are reserved together as one
placement group (one bundle per worker, strategy PACK by default), so a role that cannot be placed
fails at start with what it asked for and what the cluster has, instead of waiting forever; the
students of one group land together, and the teacher engines and students can be pinned to
different nodes. A role can instead share another role's bundles (``colocate_with``): worker i of
both runs in bundle i, which reserves what both ask for, so with fractional GPUs a teacher engine,
a rollout engine and a student rank share each GPU (KDFlow's colocated layout; Ray would otherwise
pack two fractional workers of the same role onto one GPU). Actors record the node they run on, so
a failure names the role, the worker and its node, and says whether the node itself left the
cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from kdlib.config.node import ConfigNode
from kdlib.errors import ConfigError

# The order in which the modes start their roles; a role can only share the bundles of an earlier one.
ROLE_ORDER = ("teacher", "rollout", "student")
# Resources Ray defines itself; the rest of a node's resources are the names users gave it.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "accelerator_type:", "node:")


class PlacementStrategy(str, Enum):
    """Ray placement-group strategies for the bundles (workers) of one role."""

    PACK = "PACK"  # as few nodes as possible
    STRICT_PACK = "STRICT_PACK"  # all on one node
    SPREAD = "SPREAD"  # across nodes where possible
    STRICT_SPREAD = "STRICT_SPREAD"  # each worker on its own node


@dataclass
class RolePlacement(ConfigNode):
    """Where the workers of one role run on a Ray cluster."""

    # Custom Ray resources each worker asks for, e.g. {node_b: 1} to run only on nodes started
    # with --resources='{"node_b": N}' (N workers fit there); empty: any node.
    resources: dict[str, float] = field(default_factory=dict)
    # CPUs each worker asks for (null: launcher.cpus_per_worker).
    cpus_per_worker: Optional[float] = None
    # GPUs each worker asks for (null: launcher.gpus_per_worker; a tensor-parallel engine's tp_size on GPUs).
    gpus_per_worker: Optional[float] = None
    # How the role's workers are packed onto nodes (one placement group per role).
    strategy: PlacementStrategy = PlacementStrategy.PACK
    # Share the bundles of a role started earlier (teacher, then rollout, then student): worker i
    # runs in that role's bundle i, which also reserves this role's resources (null: own bundles).
    colocate_with: Optional[str] = None


def check_colocation(placements: dict[str, RolePlacement]) -> None:
    """``colocate_with`` names an earlier role that has its own bundles."""
    for role, placement in placements.items():
        host = placement.colocate_with
        if host is None:
            continue
        if host not in ROLE_ORDER or ROLE_ORDER.index(host) >= ROLE_ORDER.index(role):
            earlier = [r for r in ROLE_ORDER[: ROLE_ORDER.index(role)]] or ["none"]
            raise ValueError(f"{role}.colocate_with={host}: choose a role started before {role}: {', '.join(earlier)}")
        if placements[host].colocate_with is not None:
            raise ValueError(f"{role}.colocate_with={host}, which itself shares the bundles of {placements[host].colocate_with}")


def worker_bundle(placement: RolePlacement, cpus: float, gpus: float) -> dict[str, float]:
    """What one worker asks for, as a Ray resource dict."""
    bundle = {"CPU": float(cpus), **{k: float(v) for k, v in placement.resources.items()}}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


def combined(*bundles: dict[str, float]) -> dict[str, float]:
    """One bundle holding all of ``bundles`` (colocated workers)."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def reserve(role: str, strategy: PlacementStrategy, n_workers: int, bundle: dict[str, float], timeout_s: float) -> Any:
    """A ready placement group of ``n_workers`` copies of ``bundle`` for ``role``; a ConfigError
    naming ``launcher.<role>`` when the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(bundle) for _ in range(n_workers)], strategy=strategy.value)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ConfigError(
            f"launcher.{role}: {n_workers} {role} worker(s) asking for {bundle} each "
            f"({strategy.value}) could not be placed in {timeout_s:.0f} s; the cluster's nodes have "
            f"{'; '.join(node_summaries())} (set launcher.{role}.resources, cpus_per_worker or gpus_per_worker)"
        ) from None
    return group


def node_summaries() -> list[str]:
    """One line per alive node: its name and its total resources."""
    import ray

    return [f"{describe(node)}: {_resources(node)}" for node in ray.nodes() if node.get("Alive")]


def node_names() -> dict[str, str]:
    """Node id -> a readable name: address, custom resources and the id's first characters."""
    import ray

    return {node["NodeID"]: describe(node) for node in ray.nodes()}


def describe(node: dict[str, Any]) -> str:
    custom = sorted(k for k in node.get("Resources", {}) if not k.startswith(_BUILTIN_RESOURCES))
    tags = f" [{', '.join(custom)}]" if custom else ""
    return f"{node.get('NodeManagerAddress', '?')}{tags} (id {node['NodeID'][:8]})"


def node_alive(node_id: str) -> bool:
    import ray

    return any(node["NodeID"] == node_id and node.get("Alive") for node in ray.nodes())


def _resources(node: dict[str, Any]) -> str:
    keep = {k: v for k, v in node.get("Resources", {}).items() if not k.startswith(("node:", "accelerator_type:"))
            and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
