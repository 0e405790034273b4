"""Start (driver) or find (student ranks) the named teacher actors of a run."""

from __future__ import annotations

import logging
import os

import ray

from distill.teacher.actor import TeacherActor

log = logging.getLogger(__name__)


def connect_ray(address: str | None, namespace: str = "distill", num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one in-process when it is None.

    Token authentication (Ray's default) stays on: processes of one user on one machine share the
    token file Ray writes under ~/.ray, and cluster nodes are given it by the launcher.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address is None:
        ray.init(
            namespace=namespace,
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level="WARNING",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    else:
        ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False)


def actor_name(run_tag: str, index: int) -> str:
    return f"{run_tag}/teacher-{index}"


class TeacherPool:
    """The replicas of one teacher, addressed by name: `<run tag>/teacher-<i>` in the `distill` namespace."""

    def __init__(self, actors: list):
        self.actors = actors

    @classmethod
    def start(
        cls,
        run_tag: str,
        model_dir: str,
        replicas: int,
        dtype: str,
        attn_implementation: str,
        threads: int,
        cpus_per_replica: float,
        gpus_per_replica: float,
    ) -> TeacherPool:
        remote_cls = ray.remote(TeacherActor)
        actors = [
            remote_cls.options(
                name=actor_name(run_tag, i),
                num_cpus=cpus_per_replica,
                num_gpus=gpus_per_replica,
                max_concurrency=1,
            ).remote(model_dir, dtype, attn_implementation, threads)
            for i in range(replicas)
        ]
        pool = cls(actors)
        infos = pool.info()  # wait until every replica has loaded its model (errors surface here)
        log.info("teacher pool ready: %d replica(s) of %s on %s", replicas, model_dir, infos[0]["device"])
        return pool

    @classmethod
    def attach(cls, run_tag: str, replicas: int) -> TeacherPool:
        return cls([ray.get_actor(actor_name(run_tag, i)) for i in range(replicas)])

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
