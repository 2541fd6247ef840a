"""A real two-node Ray cluster on one machine: `ray start --head` plus `ray start --address=...`,
each node with its own custom resource. The teacher is placed on node A and the FSDP2 students on
node B (hidden states cross between the two nodes' object stores); the run equals the local one.
Stopping node B mid-run ends the run with an error naming the role and the node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import kdlib
from kdlib.errors import WorkerError
from kdlib.parallel.distributed import free_port
from kdlib.runner import built

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class LocalNode:
    """One `ray start --block` process (and what it spawns), stopped by process id."""

    def __init__(self, temp_dir: str, resources: dict, head_port: int, head: bool) -> None:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        args = [
            ray, "start", "--block", "--num-cpus=2", f"--resources={json.dumps(resources)}",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]
        if head:
            args += ["--head", f"--port={head_port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
        else:
            args += [f"--address=127.0.0.1:{head_port}"]
        name = "head" if head else "node_b"
        self.log = open(os.path.join(temp_dir, f"{name}.log"), "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGKILL the node: its `ray start` process and every process below it (raylet, workers)."""
        for pid in _process_tree(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        self.log.close()


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@pytest.fixture(scope="module")
def two_nodes():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    nodes = {"a": LocalNode(temp_dir, {"node_a": 8}, port, head=True)}
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.time() > deadline:
                    raise
                time.sleep(1)
        nodes["b"] = LocalNode(temp_dir, {"node_b": 8}, port, head=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(1)
        yield {"address": address, "nodes": nodes}
    finally:
        ray.shutdown()
        for node in reversed(list(nodes.values())):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


RAY = ["launcher=ray", "transport=ray", "student.num_workers=2", "eval.before=false"]
# (a dict option of a structured config is filled with `+`: Hydra's struct mode refuses new keys otherwise)
SPLIT = RAY + ["+launcher.teacher.resources={node_a: 1}", "+launcher.student.resources={node_b: 1}"]


def _losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_teacher_on_node_a_students_on_node_b_equal_the_local_run(two_nodes, tiny_overrides, tmp_path):
    local = kdlib.run(kdlib.compose(tiny_overrides + ["eval.before=false", f"output_dir={tmp_path / 'local'}"]))
    cfg = kdlib.compose(tiny_overrides + SPLIT + [f"launcher.address={two_nodes['address']}"])
    run_dir = tmp_path / "two_nodes"
    run_dir.mkdir()
    with built(cfg, run_dir=run_dir) as loop:
        assert all("[node_a]" in node for node in loop.pipeline.teacher.group.nodes), loop.pipeline.teacher.group.nodes
        assert all("[node_b]" in node for node in loop.pipeline.students.group.nodes), loop.pipeline.students.group.nodes
        assert set(loop.pipeline.teacher.group.node_ids).isdisjoint(loop.pipeline.students.group.node_ids)
        result = loop.run()
    for a, b in zip(_losses(local.run_dir), _losses(run_dir), strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert _losses(run_dir)[-1]["transport_bytes"] > 0  # hidden states crossed from node A to node B
    assert result.eval_after["kl"] == pytest.approx(local.eval_after["kl"], rel=1e-4)


def test_a_role_the_cluster_cannot_place_fails_with_what_it_asked_for(two_nodes, tiny_overrides):
    from kdlib.errors import ConfigError

    cfg = kdlib.compose(tiny_overrides + RAY + ["+launcher.student.resources={node_c: 1}",
                                                "launcher.placement_timeout_s=3"])
    with pytest.raises(ConfigError, match=r"launcher.student: 2 student worker\(s\) asking for .*'node_c': 1\.0.* "
                                          r"could not be placed in 3 s; the cluster's nodes have .*node_b"):
        built(cfg, run_dir=None)


def test_colocated_students_share_the_teachers_bundles(two_nodes, tiny_overrides, tmp_path):
    """launcher.student.colocate_with=teacher: student i runs in teacher i's bundle, which
    reserves both (with fractional GPUs: one teacher engine and one student rank per GPU)."""
    from ray.util import placement_group_table

    cfg = kdlib.compose(tiny_overrides + RAY + [
        "teacher.num_workers=2", "+launcher.teacher.resources={node_a: 1}", "launcher.student.colocate_with=teacher",
        "launcher.student.cpus_per_worker=0.25", "train.max_steps=1",
    ])
    with built(cfg, run_dir=None) as loop:
        assert loop.pipeline.students.group.node_ids == loop.pipeline.teacher.group.node_ids
        assert all("[node_a]" in node for node in loop.pipeline.students.group.nodes)
        tables = [t for t in placement_group_table().values() if t["state"] == "CREATED"]
        assert [t["bundles"] for t in tables] == [{0: {"CPU": 0.75, "node_a": 1.0}, 1: {"CPU": 0.75, "node_a": 1.0}}]
        assert loop.step(next(loop.sample_batches()))["loss"] > 0


def test_a_stopped_node_ends_the_run_naming_the_role_and_the_node(two_nodes, tiny_overrides, tmp_path):
    """Runs last in this module: it stops node B."""
    cfg = kdlib.compose(tiny_overrides + SPLIT + ["train.max_steps=3"])
    with built(cfg, run_dir=tmp_path) as loop:
        batches = loop.sample_batches()
        loop.step(next(batches))
        two_nodes["nodes"]["b"].stop()
        started = time.perf_counter()
        with pytest.raises(WorkerError, match=r"student worker \d \(pid \d+\) failed in StudentWorker\.train_step\(\): its node "
                                              r"\S+ \[node_b\] \(id [0-9a-f]{8}\) stopped"):
            loop.step(next(batches))
        assert time.perf_counter() - started < 120
