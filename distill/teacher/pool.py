"""Start (driver) or find (student ranks) the named teacher actors of a run."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ray

from distill.placement import ray_gpu_options
from distill.teacher.actor import TeacherActor
from distill.teacher.pipeline import PipelineTeacher, named_actor

log = logging.getLogger(__name__)


def connect_ray(
    address: str | None,
    namespace: str = "distill",
    num_cpus: int | None = None,
    gpus: Sequence[str] | None = None,
) -> None:
    """Join the Ray cluster at `address`, or start a local one in-process when it is None.

    `gpus` (local runtime only): the GPU ids the teachers may use (`distill.placement.split_gpus`); the
    runtime is started seeing exactly those (`CUDA_VISIBLE_DEVICES` while it starts, `num_gpus`), so Ray
    hands the replicas and stages GPUs the student ranks do not have. None: Ray's own detection.

    Token authentication (Ray's default) stays on: processes of one user on one machine share the
    token file Ray writes under ~/.ray, and cluster nodes are given it by the launcher.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address is None:
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is not None:  # the raylet and its workers inherit the environment ray.init starts them with
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        try:
            ray.init(
                address="local",  # a new runtime, never a cluster another process left on this machine
                namespace=namespace,
                num_cpus=num_cpus,
                num_gpus=None if gpus is None else len(gpus),
                include_dashboard=False,
                logging_level="WARNING",
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
            )
        finally:
            if gpus is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
    else:
        ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False)


def pool_tag(run_tag: str, teacher: str) -> str:
    """The run tag of one named teacher's pool in a several-teacher run."""
    return f"{run_tag}.{teacher}"


def actor_name(run_tag: str, index: int) -> str:
    return f"{run_tag}/teacher-{index}"


class ActorReplica:
    """A whole-model replica: one `TeacherActor`. Same submit interface as `PipelineTeacher`."""

    def __init__(self, handle):
        self.handle = handle

    def submit_topk(
        self,
        request_id,
        input_ids,
        k,
        values_dtype="float16",
        hidden_layers=None,
        codec="none",
        sparsifier=None,
    ):
        return self.handle.topk.remote(
            request_id, input_ids, k, values_dtype, hidden_layers, codec, sparsifier
        )

    def submit_full_log_probs(self, input_ids, start: int = 0):
        return self.handle.full_log_probs.remote(input_ids, start)

    def submit_generate(self, prompts, seeds, sampling, topk=0):
        return self.handle.generate.remote(prompts, seeds, sampling, topk)

    def info(self):
        return self.handle.info.remote()

    def shutdown(self) -> None:
        ray.kill(self.handle)


class TeacherPool:
    """The replicas of one teacher, addressed by name (`<run tag>/teacher-<i>[/stage-<s>]` in the
    `distill` namespace) so student ranks in other processes or on other nodes can attach to them.

    A replica is either one actor holding the whole model (`stages=1`, `tensor_parallel=1`) or a
    `PipelineTeacher` of `stages` stages each holding a block of layers, each stage one actor or, with
    `tensor_parallel` N > 1, N actors holding 1/N of its layers each. Ray restarts a replica actor that dies
    (up to `max_restarts` times) and re-runs the requests it had in flight; a tensor-parallel replica that
    loses an actor is not restarted: it fails as a dead replica and the stream drops it.
    """

    def __init__(self, actors: list):
        self.actors = actors  # ActorReplica | PipelineTeacher, each with submit_topk / submit_full_log_probs

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
        stages: int = 1,
        placement_strategy: str = "PACK",
        max_restarts: int = 3,
        document_isolation: bool = False,
        tensor_parallel: int = 1,
    ) -> TeacherPool:
        if stages > 1 or tensor_parallel > 1:
            pool = cls(
                [
                    PipelineTeacher.start(
                        model_dir,
                        stages,
                        dtype,
                        threads,
                        cpus_per_replica / stages,
                        gpus_per_replica / stages,
                        placement_strategy,
                        actor_name(run_tag, i),
                        max_restarts,
                        document_isolation,
                        tensor_parallel,
                    )
                    for i in range(replicas)
                ]
            )
        else:
            remote_cls = ray.remote(TeacherActor)
            pool = cls(
                [
                    ActorReplica(
                        remote_cls.options(
                            name=actor_name(run_tag, i),
                            num_cpus=cpus_per_replica,
                            **ray_gpu_options(gpus_per_replica),  # its GPUs, or none visible at all
                            max_concurrency=1,
                            max_restarts=max_restarts,
                            max_task_retries=-1 if max_restarts else 0,
                        ).remote(model_dir, dtype, attn_implementation, threads, document_isolation)
                    )
                    for i in range(replicas)
                ]
            )
        pool.info()  # wait until every replica has loaded its model (errors surface here)
        log.info(
            "teacher pool ready: %d replica(s) x %d stage(s) x %d tensor-parallel rank(s) of %s",
            replicas,
            stages,
            tensor_parallel,
            model_dir,
        )
        return pool

    @classmethod
    def attach(
        cls, run_tag: str, replicas: int, stages: int = 1, tensor_parallel: int | None = None
    ) -> TeacherPool:
        """The running pool `run_tag`. `tensor_parallel` None: found from the actor names Ray knows (a
        one-stage replica that is not a single whole-model actor is a tensor-parallel stage group)."""

        def replica(i: int):
            name = actor_name(run_tag, i)
            if stages == 1 and tensor_parallel in (None, 1):
                whole = ray.get_actor(name) if tensor_parallel == 1 else named_actor(name)
                if whole is not None:
                    return ActorReplica(whole)
            return PipelineTeacher.attach(name, stages, tensor_parallel)

        return cls([replica(i) for i in range(replicas)])

    def info(self) -> list:
        return ray.get([replica.info() for replica in self.actors])

    def shutdown(self) -> None:
        for replica in self.actors:
            replica.shutdown()


class TeacherPools:
    """The pools of several named teachers of one run or curriculum phase (`<run tag>.<name>` each)."""

    def __init__(self, pools: dict[str, TeacherPool], names: list[str]):
        self.pools, self.names = pools, names  # names: every actor of every pool, to check the release

    @classmethod
    def start(cls, run_tag: str, teachers: dict[str, tuple[str, object]], start_one) -> TeacherPools:
        """`teachers[name] = (model dir, teacher config)`; `start_one(tag, dir, config)` starts one pool."""
        pools, names = {}, []
        try:
            for name, (model_dir, tc) in teachers.items():
                tag = pool_tag(run_tag, name)
                pools[name] = start_one(tag, model_dir, tc)
                for i in range(tc.replicas):
                    base = actor_name(tag, i)
                    if tc.stages == 1 and tc.tensor_parallel == 1:
                        names.append(base)
                    else:
                        names += PipelineTeacher.actor_names(base, tc.stages, tc.tensor_parallel)
        except BaseException:
            cls(pools, names).shutdown()
            raise
        return cls(pools, names)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Kill every actor and wait until Ray no longer knows any of them (their memory is free again)."""
        import time

        for pool in self.pools.values():
            pool.shutdown()
        deadline = time.monotonic() + timeout_s
        for name in self.names:
            while True:
                try:
                    ray.get_actor(name)
                except ValueError:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"teacher actor {name} still alive {timeout_s:.0f} s after shutdown")
                time.sleep(0.1)
        log.info("released %d teacher actor(s): %s", len(self.names), ", ".join(self.names))

    def pids(self) -> list[int]:
        """Process ids of the whole-model actors (pipeline replicas report per stage elsewhere)."""
        infos = [i for pool in self.pools.values() for i in pool.info()]
        return [i["pid"] for i in infos if isinstance(i, dict) and "pid" in i]


def start_pool(run_tag: str, teacher_dir: str, tc, document_isolation: bool = False) -> TeacherPool:
    """A pool of the teacher at `teacher_dir` as the `teacher` config node `tc` describes it;
    `document_isolation`: the run's `isolation_enabled(cfg.data)` (distill/documents.py)."""
    return TeacherPool.start(
        run_tag,
        teacher_dir,
        tc.replicas,
        tc.dtype,
        tc.attn_implementation,
        tc.threads,
        tc.cpus_per_replica,
        tc.gpus_per_replica,
        stages=tc.stages,
        placement_strategy=tc.placement_strategy,
        max_restarts=tc.max_restarts,
        document_isolation=document_isolation,
        tensor_parallel=tc.tensor_parallel,
    )
