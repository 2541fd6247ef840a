"""Weight sync by broadcast: student rank 0 sends its weights straight into SGLang rollout engines.

``rollout.weight_sync=distributed`` is for engines on their own GPUs: instead of buckets
travelling through the object store, student rank 0 and every engine's tensor-parallel ranks
form one process group (student = rank 0, engine e's TP rank r = 1 + e * tp_size + r; NCCL on
GPUs, gloo on CPUs). SGLang joins it with ``init_weights_update_group`` (a TCP rendezvous at
``master_address:master_port`` under a store prefixed with the group name); this module builds
the sender's side of the same group. Each sync, the engines call
``update_weights_from_distributed(names, dtypes, shapes)`` per bucket while rank 0 broadcasts
those tensors in the same order; the bucket plan (names, dtypes, shapes) is fixed by the
student's architecture, so it is computed once when the group is set up.

:class:`DistributedWeightSync` is the controller's side (the weight-sync strategy this backend
registers): it sets the group up (both sides must enter the rendezvous at the same time, so the
calls are submitted together and then gathered) and runs one broadcast per step. It needs worker
groups that run calls concurrently (Ray). The student's and the engines' sides are worker calls
defined here (functions of the worker), so neither worker class knows about SGLang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from kdlib.backends.base import WeightSync
from kdlib.models.weights import state_buckets

GROUP_NAME = "kdlib_weight_sync"


@dataclass(frozen=True)
class BucketMeta:
    """What the receivers allocate for one broadcast bucket, in broadcast order."""

    names: list[str]
    dtypes: list[str]  # torch dtype names without the "torch." prefix, as SGLang expects
    shapes: list[list[int]]


def bucket_plan(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[BucketMeta]:
    """The buckets of ``state`` (:func:`~kdlib.models.weights.state_buckets` order)."""
    return [
        BucketMeta(
            names=list(bucket),
            dtypes=[str(t.dtype).removeprefix("torch.") for t in bucket.values()],
            shapes=[list(t.shape) for t in bucket.values()],
        )
        for bucket in state_buckets(state, bucket_bytes)
    ]


def open_sender_group(
    master_address: str, master_port: int, world_size: int, group_name: str, backend: str, timeout_s: float = 600.0
) -> Any:
    """Rank 0 of the weight-sync group (the engines join with ``init_weights_update_group``)."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = c10d._new_process_group_helper(
        world, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout,
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world)}
    return group


def broadcast_state(group: Any, state: dict[str, torch.Tensor], plan: list[BucketMeta], device: torch.device) -> int:
    """Send ``state`` bucket by bucket in ``plan`` order; bytes sent."""
    import torch.distributed as dist

    sent = 0
    for bucket in plan:
        for name, dtype, shape in zip(bucket.names, bucket.dtypes, bucket.shapes):
            tensor = state[name]
            if str(tensor.dtype).removeprefix("torch.") != dtype or list(tensor.shape) != shape:
                raise ValueError(f"weight {name} no longer matches the broadcast plan ({dtype}, {shape})")
            tensor = tensor.to(device).contiguous()
            dist.broadcast(tensor, src=0, group=group)
            sent += tensor.numel() * tensor.element_size()
    return sent


# Where a student worker keeps its side of the broadcast group between calls.
_SENDER = "sglang_broadcast"


def sender_address(worker: Any) -> tuple[str, int]:
    """Worker call (student): an address and free port on the student's node."""
    from kdlib.parallel.distributed import free_port, node_address

    return node_address(), free_port()


def open_sender(worker: Any, address: str, port: int, world_size: int, group_name: str, backend: str,
                bucket_bytes: int) -> list[BucketMeta]:
    """Worker call (every student rank, gathering is collective): rank 0 opens its side of the
    group and returns the bucket plan."""
    state = worker.export_state()
    if worker.rank != 0:
        return []
    timeout = float(os.environ.get("KDLIB_COLLECTIVE_TIMEOUT_S", 600))
    plan = bucket_plan(state, bucket_bytes)
    worker.extensions[_SENDER] = (open_sender_group(address, port, world_size, group_name, backend, timeout), plan)
    return plan


def send_weights(worker: Any) -> int:
    """Worker call (every student rank): rank 0 broadcasts the current weights; bytes sent."""
    state = worker.export_state()
    if worker.rank != 0:
        return 0
    group, plan = worker.extensions[_SENDER]
    return broadcast_state(group, state, plan, worker.device)


def join_group(worker: Any, master_address: str, master_port: int, rank_offset: int, world_size: int,
               group_name: str, backend: str) -> None:
    """Worker call (rollout): the engine joins student rank 0's broadcast group (once)."""
    worker.backend.join_weight_group(master_address, master_port, rank_offset, world_size, group_name, backend)


def receive_weights(worker: Any, plan: list[BucketMeta], group_name: str) -> None:
    """Worker call (rollout): the engine receives every bucket of ``plan`` as rank 0 sends it."""
    worker.backend.receive_weights(plan, group_name)


class DistributedWeightSync(WeightSync):
    """The controller's side of ``weight_sync=distributed``: group set-up once, a broadcast per step."""

    def __init__(self, students: Any, rollout: Any, cfg: Any) -> None:
        super().__init__(students, rollout, cfg)
        from kdlib.hardware import resolve_device_type

        self.bucket_bytes = cfg.onpolicy.sync_bucket_mb * 2**20
        self.tp_size = cfg.rollout.tp_size
        self.backend = "nccl" if resolve_device_type(cfg.device) == "cuda" else "gloo"
        self.plan: list[BucketMeta] | None = None

    def setup(self) -> None:
        """Everyone enters the rendezvous together; student rank 0 returns the bucket plan."""
        students, rollout = self.students.group, self.rollout.group
        address, port = students.call(sender_address)[0]
        world = 1 + rollout.size * self.tp_size
        student_calls = students.submit_each(
            open_sender, [(address, port, world, GROUP_NAME, self.backend, self.bucket_bytes)] * students.size
        )
        rollout_calls = rollout.submit_each(
            join_group, [(address, port, 1 + rank * self.tp_size, world, GROUP_NAME, self.backend) for rank in range(rollout.size)],
        )
        rollout.gather(rollout_calls, join_group)
        self.plan = students.gather(student_calls, open_sender)[0]

    def sync(self) -> None:
        if self.plan is None:
            self.setup()
        students, rollout = self.students.group, self.rollout.group
        student_calls = students.submit_each(send_weights, [()] * students.size)
        rollout_calls = rollout.submit_each(receive_weights, [(self.plan, GROUP_NAME)] * rollout.size)
        students.gather(student_calls, send_weights)
        rollout.gather(rollout_calls, receive_weights)
