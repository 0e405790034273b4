"""A teacher pool spread over several Ray nodes (a real multi-node Ray cluster on this host, one raylet
per node): pipeline stages of each replica land on different nodes, and the student ranks, separate
processes, reach them through the cluster's address."""

from __future__ import annotations

import json

from test_online import metrics, run_train, tiny_overrides


def test_stages_and_replicas_on_different_nodes(tiny_teacher_dir, tiny_student_dir, tmp_path):
    from ray.cluster_utils import Cluster

    # the head runs no actor; no dashboard (a web UI nothing here reads: seconds of start-up)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        run_dir = tmp_path / "run"
        proc = run_train(
            tiny_overrides(
                tiny_teacher_dir,
                tiny_student_dir,
                run_dir,
                f"ray.address={cluster.address}",
                "teacher.replicas=2",
                "teacher.stages=2",
                "teacher.cpus_per_replica=1",
                "teacher.placement_strategy=STRICT_SPREAD",  # every stage of a replica on its own node
            )
        )
        assert proc.returncode == 0
    finally:
        cluster.shutdown()

    worker_ids = {node.node_id for node in workers}
    replicas = json.loads((run_dir / "teacher_pool.json").read_text())
    assert len(replicas) == 2
    for replica in replicas:
        nodes = [stage["node"] for stage in replica["stages"]]
        assert len(set(nodes)) == 2 and set(nodes) <= worker_ids  # stage 0 and stage 1 on different nodes
    evals = [r["eval/kl"] for r in metrics(run_dir) if "eval/kl" in r]
    assert evals[-1] < evals[0] * 0.9  # the students learned from the spread-out teacher
    served = [r for r in metrics(run_dir) if "teacher/replica1/tokens_per_s" in r]
    assert served and all(r["teacher/replica0/tokens_per_s"] > 0 for r in served)  # both replicas used
    assert all(r["teacher/replica1/tokens_per_s"] > 0 for r in served)
