"""A teacher split into pipeline stages: each a Ray actor holding a contiguous block of decoder layers.

A 405B-class teacher does not fit one device or one node. Stage 0 holds the embeddings, the last stage
the final norm, the LM head and the top-k; every stage builds its modules on the meta device and loads
only its own tensors from the model's safetensors files, so no process ever holds the whole model.
Activations travel between stages as numpy arrays through Ray's object store; a request is a chain of
stage calls, so several micro-batches in flight keep every stage busy at once (pipelining).

Supports decoder-only models laid out like Llama (`model.embed_tokens`, `model.layers.N`, `model.norm`,
`model.rotary_emb`, `lm_head`): Llama, Mistral, Qwen2 and the SmolLM family.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from safetensors import safe_open

from distill.documents import document_position_ids, flash_varlen_kwargs
from distill.placement import ray_gpu_options
from distill.teacher.actor import TeacherOutput, full_log_probs_reply, pack_output, sparse_log_probs
from distill.teacher.sparsify import Sparsifier, request_seed


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer blocks, as even as possible (earlier stages take the remainder)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages (need 1..{num_layers})")
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded or single-file checkpoints)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {name: model_dir / "model.safetensors" for name in f.keys()}


def _load(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, wanted in by_file.items():
        with safe_open(path, framework="pt") as f:
            out.update({n: f.get_tensor(n).to(dtype) for n in wanted})
    return out


def _load_shards(
    files: dict[str, Path], placeholders: dict, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """{name: this rank's shard as a DTensor} for the tensor-parallel `placeholders` ({name: DTensor on the
    meta device}): each read as only the slice this rank owns (`safe_open(...).get_slice`).

    A block of whole rows ("colwise") is a view of the memory-mapped file, of which only this rank's rows
    are ever read. A block of columns ("rowwise") of a row-major tensor touches every row's pages; it is
    copied out through a handle of its own, closed right after, so those pages leave this process's
    memory again instead of staying mapped (and counted) beside the row blocks."""
    from distill.teacher.tensor_parallel import read_shard, whole_rows

    rows = [n for n in placeholders if whole_rows(placeholders[n])]
    by_file: dict[Path, list[str]] = {}
    for name in rows:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, wanted in by_file.items():
        with safe_open(path, framework="pt") as f:
            out.update({n: read_shard(f, n, placeholders[n], device, dtype) for n in wanted})
    for name in (n for n in placeholders if n not in out):
        with safe_open(files[name], framework="pt") as f:
            out[name] = read_shard(f, name, placeholders[name], device, dtype, copy=True)
    return out


def layer_devices(num_layers: int, num_gpus: int, default: torch.device) -> list[torch.device]:
    """The device of each of a stage's `num_layers` layers: contiguous, even blocks over `num_gpus` GPUs
    (`cuda:0` .. `cuda:<num_gpus - 1>`, the GPUs Ray gave the stage) when it has more than one, else
    `default` for all of them. Not yet run on a GPU."""
    if num_gpus <= 1:
        if default.type == "cuda" and default.index is None:
            default = torch.device("cuda", 0)  # the index a tensor reports, so devices compare equal
        return [default] * num_layers
    return [torch.device("cuda", j * num_gpus // num_layers) for j in range(num_layers)]


def _moved(value, device: torch.device):
    """`value` with every tensor in it (through tuples, lists and dicts) on `device`; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def activations_out(hidden: torch.Tensor) -> tuple[np.ndarray, str]:
    """A stage's output activations for the next stage, in the model's dtype (bfloat16 as its uint16 bits:
    numpy has none), with no copy on the host beyond the one off the GPU."""
    name = str(hidden.dtype).removeprefix("torch.")
    if hidden.dtype == torch.bfloat16:
        hidden = hidden.view(torch.uint16)
    return hidden.cpu().numpy(), name


def activations_in(array: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    """The previous stage's activations as a tensor on `device`, read in place from Ray's object store
    (no copy on the host; the layers never write into their input)."""
    with warnings.catch_warnings():  # Ray hands out read-only arrays; nothing here writes into them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    if name == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device)


class TeacherStage:
    """One pipeline stage, or one rank of a stage's tensor-parallel group; wrapped with `ray.remote` by
    `PipelineTeacher`.

    With `tp_size` > 1 the constructor only records what to load: the group's ranks first meet (`rendezvous`
    on rank 0, then `join` on every rank), then each loads its shard. Requests go to rank 0 only (`lead`),
    which hands the same request to the other ranks itself (`follow`), so every rank runs the group's
    requests in one order, the order rank 0 runs them in, whichever processes sent them."""

    def __init__(
        self,
        model_dir: str,
        start: int,
        end: int,
        dtype: str = "auto",
        threads: int = 1,
        document_isolation: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.rss_before_weights = self.memory()["VmRSS"]  # the Python/torch/transformers runtime alone
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.tp_rank, self.tp_size, self.followers = tp_rank, tp_size, []
        self.load_error: Exception | None = None
        self.start, self.end = start, end
        self._load_args = (model_dir, start, end, dtype, document_isolation)
        if tp_size == 1:
            self._load(*self._load_args)

    def rendezvous(self) -> str:
        """Rank 0 of a tensor-parallel group: open the group's store on a free port of this node and return
        its address (`host:port`) for the other ranks' `join`."""
        from distill.teacher.tensor_parallel import Rendezvous

        self._rendezvous = Rendezvous(self.tp_size)
        return self._rendezvous.address

    def join(self, address: str, followers: list | None = None) -> None:
        """Form the stage's tensor-parallel group (every rank calls this; `followers`: rank 0 is given the
        other ranks' actor handles) and load this rank's shard. Returns once every rank has loaded; a rank
        that failed makes every rank raise (`agree_loaded`), so none is left waiting on it."""
        from distill.teacher.tensor_parallel import agree_loaded, init_group

        store = self._rendezvous.store if self.tp_rank == 0 else None
        mesh = init_group(address, self.tp_rank, self.tp_size, self.device, store)
        self.followers = list(followers or [])
        try:
            self._load(*self._load_args, mesh=mesh)
        except Exception as e:  # told to the other ranks, then raised here too
            self.load_error = e
        agree_loaded(self.load_error)

    def _load(
        self, model_dir: str, start: int, end: int, dtype: str, document_isolation: bool, mesh=None
    ) -> None:
        """Build the stage's modules on the meta device and load its tensors (with a tensor-parallel `mesh`:
        the planned layer weights as this rank's shards, everything else whole)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.masking_utils import create_causal_mask

        from distill.models import resolve_attn_implementation, resolve_dtype

        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_dir)
        # sdpa / flash attention apply the causal mask themselves; eager would need it built explicitly
        config._attn_implementation = resolve_attn_implementation("auto", self.device, self.dtype)
        self.config, self._create_causal_mask = config, create_causal_mask
        self.first, self.last = start == 0, end == config.num_hidden_layers
        # stage 0 finds the packed rows' documents (distill/documents.py) and passes their positions on
        self.document_eos = None
        if document_isolation and self.first:
            from distill.models import open_tokenizer

            self.document_eos = open_tokenizer(model_dir).eos_token_id
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        decoder = skeleton.get_decoder()

        files = _tensor_files(Path(model_dir))
        wanted = {f"model.layers.{i}.": decoder.layers[i] for i in range(start, end)}
        if self.first:
            wanted["model.embed_tokens."] = decoder.embed_tokens
        if self.last:
            wanted["model.norm."] = decoder.norm
            wanted["lm_head."] = skeleton.lm_head
        names = {n for n in files if any(n.startswith(p) for p in wanted)}
        sharded = {}  # tensor-parallel: {name: DTensor placeholder} of the layer weights split over the group
        if mesh is not None:
            from distill.teacher.tensor_parallel import layer_plan, shard

            sharded = shard(skeleton, mesh, layer_plan(skeleton, range(start, end)))
        tied = self.last and "lm_head.weight" not in files  # tied embeddings: the head is the embedding
        whole = sorted((names - set(sharded)) | ({"model.embed_tokens.weight"} if tied else set()))
        tensors = _load(files, whole, self.dtype)
        tensors.update(_load_shards(files, sharded, self.device, self.dtype))
        if tied:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        # a stage given several GPUs spreads its layers over all of them (embeddings with the first block,
        # final norm and head with the last); one GPU or the CPU: everything on `self.device`
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        self.layer_devices = layer_devices(end - start, gpus, self.device)
        placed = {f"model.layers.{i}.": self.layer_devices[i - start] for i in range(start, end)}
        placed.update({"model.embed_tokens.": self.layer_devices[0]})
        placed.update({"model.norm.": self.layer_devices[-1], "lm_head.": self.layer_devices[-1]})
        for prefix, module in wanted.items():
            state = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            module.load_state_dict(state, strict=True, assign=True)
            module.to(placed[prefix]).eval()
        self.layers = [decoder.layers[i] for i in range(start, end)]
        self.embed = decoder.embed_tokens if self.first else None
        self.norm, self.head = (decoder.norm, skeleton.lm_head) if self.last else (None, None)
        with torch.device(self.device):  # its buffers are computed from the config, not loaded
            self.rotary = type(decoder.rotary_emb)(config=config)
        # a stage holding the whole model (one stage, tensor-parallel or not) can run the model's own
        # forward, with its KV cache: generation (`generate`)
        self.model = None
        if self.first and self.last:
            decoder.rotary_emb = self.rotary
            self.model = skeleton.eval()

    def info(self) -> dict:
        """Where the stage runs and how many parameters it holds (with tensor parallelism, rank 0 reports the
        group: parameters summed over the ranks' shards and replicated tensors, and every rank under
        `ranks`)."""
        from distill.teacher.tensor_parallel import local_tensor

        if self.load_error is not None:
            raise self.load_error
        modules = [m for m in (self.embed, *self.layers, self.norm, self.head) if m is not None]
        local = [local_tensor(p) for m in modules for p in m.parameters()]
        params = {t.data_ptr(): t.numel() for t in local}  # tied head: once
        own = {
            "layers": [self.start, self.end],
            "parameters": sum(params.values()),
            "device": str(self.device),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "document_eos": self.document_eos,  # stage 0 only: the stage that finds the documents
        }
        if self.tp_size == 1:
            return own
        own["tp_rank"] = self.tp_rank
        if self.tp_rank > 0:
            return own
        ranks = [own, *ray.get([f.info.remote() for f in self.followers])]
        return {
            **own,
            "parameters": sum(r["parameters"] for r in ranks),
            "tensor_parallel": self.tp_size,
            "ranks": ranks,
        }

    def memory(self) -> dict:
        """This process's peak and current resident memory (MiB), from /proc (Linux)."""
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        sizes = {key: int(fields[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS")}
        return {**sizes, "runtime": getattr(self, "rss_before_weights", sizes["VmRSS"])}

    @torch.no_grad()
    def run(self, payload: dict) -> dict:
        """Run this stage's layers on `payload` (token ids for stage 0, activations after) and pass on
        the activations plus any hidden states requested for feature distillation."""
        started = time.perf_counter()
        if self.first:
            ids = torch.from_numpy(payload["input_ids"].astype(np.int64)).to(self.device)
            hidden = self.embed(ids)
        else:
            hidden = activations_in(payload["activations"], payload["activations_dtype"], self.device)
        if self.first and self.document_eos is not None:
            payload = {**payload, "position_ids": document_position_ids(ids, self.document_eos).cpu().numpy()}
        if payload.get("position_ids") is not None:  # packed documents: restarting positions, own-document
            positions = torch.from_numpy(payload["position_ids"]).to(self.device)  # attention (HF's mask)
        else:
            positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        varlen = {}
        if payload.get("position_ids") is not None and self.config._attn_implementation.startswith("flash"):
            varlen = flash_varlen_kwargs(positions)
        mask = self._create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=positions,
        )
        rotary = self.rotary(hidden, position_ids=positions)
        wanted = set(payload.get("hidden_layers") or ())
        collected = dict(payload.get("collected", {}))
        for index, layer in zip(range(self.start, self.end), self.layers):
            if hidden.device != (device := self.layer_devices[index - self.start]):  # the next GPU's block
                hidden, mask, rotary, positions, varlen = _moved(
                    (hidden, mask, rotary, positions, varlen), device
                )
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions, **varlen
            )
            if index in wanted:  # HF's hidden_states[-1] is taken after the final norm: match it
                out = self.norm(hidden) if index == self.config.num_hidden_layers - 1 else hidden
                collected[index] = out.float().cpu().numpy()
        result = {**payload, "collected": collected, "compute_s": payload.get("compute_s", 0.0)}
        result["compute_s"] += time.perf_counter() - started
        if self.last:
            result["final_hidden"] = self.norm(hidden)  # the head is applied by `topk` / `full_log_probs`
        else:
            result["activations"], result["activations_dtype"] = activations_out(hidden)
            result["hop_bytes"] = payload.get("hop_bytes", 0) + result["activations"].nbytes
        result.pop("input_ids", None)
        return result

    def topk(
        self,
        payload: dict,
        request_id: int,
        k: int,
        values_dtype: str,
        codec: str = "none",
        sparsifier: Sparsifier | None = None,
    ) -> TeacherOutput:
        """Last stage only: top-k (or `sparsifier`'s entries) of the full-vocabulary log-probs, packed like
        `TeacherActor.topk`; the draws' seed came with the request (`sample_seed`, from its token ids)."""
        result = self.run(payload)
        layers = list(payload["hidden_layers"]) if payload.get("hidden_layers") else None
        hidden = torch.from_numpy(np.stack([result["collected"][j] for j in layers])) if layers else None
        generator = None
        if sparsifier is not None:
            generator = torch.Generator(device=self.device).manual_seed(payload["sample_seed"])
        final = result["final_hidden"]
        values, indices, offset = sparse_log_probs(final, self.head, k, sparsifier, generator)
        out = pack_output(
            request_id,
            values,
            indices,
            values_dtype,
            self.config.vocab_size,
            result["compute_s"],
            hidden,
            layers,
            codec,
            offset,
        )
        out.hop_bytes = result.get("hop_bytes", 0)  # activations sent between this replica's stages
        return out

    @torch.no_grad()
    def full_log_probs(self, payload: dict, start: int = 0) -> np.ndarray:
        """Last stage only: full-vocabulary log-probs of positions `start`.., as
        `TeacherActor.full_log_probs` sends them."""
        return full_log_probs_reply(self.run(payload)["final_hidden"][:, start:], self.head, self.dtype)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: dict, topk: int = 0
    ) -> list[dict]:
        """Sampled completions, as `TeacherActor.generate`; only a stage that holds the whole model (a
        one-stage replica: tensor-parallel, or not) can generate. Every rank of a tensor-parallel group runs
        the same sampling on the same all-reduced logits, so all draw the same tokens and stop together."""
        from distill.teacher.generate import generate

        if self.model is None:
            raise ValueError(
                f"stage of layers {self.start}-{self.end} cannot generate: generation needs a replica with "
                f"one stage (teacher.stages=1; tensor_parallel may be > 1)"
            )
        return generate(self.model, prompts, seeds, topk=topk, **sampling)

    # ---- tensor parallelism: requests reach rank 0, which hands them to the other ranks itself ----

    # what a rank other than 0 runs for each request: the layers (every collective is in them) and, for
    # generation, the whole sampling loop; the replicated LM head and the reply are rank 0's alone
    FOLLOWER_METHODS = {"run": "run", "topk": "run", "full_log_probs": "run", "generate": "generate"}
    # how long rank 0, whose own part of a request raised, waits for the other ranks to finish theirs before
    # it takes the group to be out of step (a rank left in a collective) and ends itself
    FOLLOWER_GRACE_S = 60.0

    def lead(self, method: str, payload, boxed: list, *args):
        """Rank 0 of a tensor-parallel group: run `method(payload, *args)` with every rank of the group.

        The payload comes twice: as an argument Ray resolves before this task starts (a previous stage's
        activations, read in place from the object store; a failed or dead previous stage fails this task
        before it runs), and inside a list (`boxed`), which Ray leaves alone, so the same ObjectRef is passed
        on and each rank reads the activations itself (no copy made here). The other ranks are sent the
        request before rank 0 starts it, from this process, so they run the group's requests in rank 0's
        order and meet in the same collectives.

        A rank that died (kill -9, OOM) makes this process end itself, so the request fails with
        RayActorError exactly like a dead whole-model replica (the stream drops the replica and re-sends its
        requests to the others); a group whose ranks cannot continue together is never left to hang. An
        error that every rank raised alike (the teacher's own, e.g. a bad request) is raised as usual."""
        calls = [f.follow.remote(method, boxed, *args) for f in self.followers]
        try:
            out = getattr(self, method)(payload, *args)
        except Exception as error:
            done, waiting = ray.wait(calls, num_returns=len(calls), timeout=self.FOLLOWER_GRACE_S)
            if waiting:
                self._die(f"{method} raised {error!r} and ranks are still waiting in the group's collectives")
            self._check_ranks(done, method, raised_too=True)
            raise
        self._check_ranks(calls, method, raised_too=False)
        return out

    def follow(self, method: str, boxed: list, *args) -> None:
        """A rank other than 0: its share of rank 0's request (`lead`); the reply is rank 0's."""
        name = self.FOLLOWER_METHODS[method]
        getattr(self, name)(_unboxed(boxed), *(args if name == "generate" else ()))

    def _check_ranks(self, calls: list, method: str, raised_too: bool) -> None:
        """End this process if a rank died during the request, or raised when rank 0 did not (`raised_too`
        False: that rank may have left collectives unrun, so the group is out of step)."""
        for call in calls:
            try:
                ray.get(call)
            except ray.exceptions.RayActorError:
                self._die(f"a tensor-parallel rank of this stage died during {method}")
            except ray.exceptions.RayTaskError as e:
                if not raised_too:
                    self._die(f"a tensor-parallel rank of this stage raised during {method}: {e}")

    def _die(self, why: str) -> None:
        """End this process: a tensor-parallel group that lost a rank cannot run another collective, and a
        dead actor is what Ray, the pool and the stream already handle (restart or drop the replica)."""
        print(f"teacher stage {self.start}-{self.end} rank 0 ends itself: {why}", file=sys.stderr, flush=True)
        os._exit(1)


def _unboxed(boxed: list):
    """The payload of a `follow` request: a previous stage's ObjectRef resolved, or the payload."""
    (payload,) = boxed
    return ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload


class PipelineTeacher:
    """One teacher replica as a chain of stage actors named `<name>/stage-<s>`.

    `start` places the stages with a Ray placement group: `strategy="SPREAD"` puts them on different
    nodes where it can, `"PACK"` keeps them together. Requests are submitted as chained calls, so the
    replica pipelines however many micro-batches the students keep in flight.

    With `tensor_parallel` N > 1 each stage is a group of N actors in the stage's placement-group bundle
    (so on one node), each holding 1/N of the stage's layers (`distill/teacher/tensor_parallel.py`): rank 0
    is `<name>/stage-<s>` and takes the requests, the others are `<name>/stage-<s>/tp-<r>`. Such a replica
    is not restarted when one of its actors dies (a restarted rank could not rejoin its group's
    collectives): it fails its requests as a dead replica and the stream drops it.
    """

    def __init__(self, stages: list, placement=None, groups: list[list] | None = None, loaded: list = ()):
        """`stages`: the actor each stage's requests go to; `groups`: every actor of each stage (rank 0
        first; default: the stage actor alone); `loaded`: ObjectRefs of the groups' loading (`join`)."""
        self.stages, self.placement = stages, placement
        self.groups = groups if groups is not None else [[s] for s in stages]
        self.tensor_parallel = len(self.groups[0])
        self.loaded = list(loaded)

    @staticmethod
    def actor_names(name: str, num_stages: int, tensor_parallel: int = 1) -> list[str]:
        """The Ray names of every actor of the replica `name`: per stage, rank 0 then the other ranks."""
        return [
            f"{name}/stage-{s}" + (f"/tp-{r}" if r else "")
            for s in range(num_stages)
            for r in range(tensor_parallel)
        ]

    @classmethod
    def start(
        cls,
        model_dir: str,
        num_stages: int,
        dtype: str = "auto",
        threads: int = 1,
        cpus_per_stage: float = 1.0,
        gpus_per_stage: float = 0.0,
        strategy: str = "PACK",
        name: str = "teacher",
        max_restarts: int = 0,
        document_isolation: bool = False,
        tensor_parallel: int = 1,
    ) -> PipelineTeacher:
        """Start the replica's actors (a stage's tensor-parallel ranks share its bundle: its CPUs and GPUs
        split evenly). Returns at once; `info()` waits until every stage has loaded."""
        from distill.teacher.tensor_parallel import check_tensor_parallel

        config = json.loads((Path(model_dir) / "config.json").read_text())
        # a tensor_parallel the model or the GPUs do not allow is refused before any actor starts
        check_tensor_parallel(config, tensor_parallel, num_stages, gpus_per_stage * num_stages)
        bounds = split_layers(config["num_hidden_layers"], num_stages)
        bundle = {"CPU": cpus_per_stage, **({"GPU": gpus_per_stage} if gpus_per_stage else {})}
        placement = placement_group([bundle] * num_stages, strategy=strategy)
        ray.get(placement.ready())
        remote_stage = ray.remote(TeacherStage)
        tp = tensor_parallel
        restarts = max_restarts if tp == 1 else 0  # a lone restarted rank could not rejoin its group
        groups, loaded = [], []
        for i, (start, end) in enumerate(bounds):
            group = [
                remote_stage.options(
                    name=f"{name}/stage-{i}" + (f"/tp-{r}" if r else ""),
                    num_cpus=cpus_per_stage / tp,
                    **ray_gpu_options(gpus_per_stage / tp),  # its share of the stage's GPUs, or none visible
                    max_restarts=restarts,
                    max_task_retries=-1 if restarts else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement, placement_group_bundle_index=i
                    ),
                ).remote(model_dir, start, end, dtype, threads, document_isolation, r, tp)
                for r in range(tp)
            ]
            if tp > 1:  # the ranks meet at rank 0's address (an ObjectRef: nothing here waits for it)
                address = group[0].rendezvous.remote()
                loaded += [a.join.remote(address, group[1:] if r == 0 else None) for r, a in enumerate(group)]
            groups.append(group)
        return cls([g[0] for g in groups], placement, groups, loaded)

    @classmethod
    def attach(cls, name: str, num_stages: int, tensor_parallel: int | None = None) -> PipelineTeacher:
        """The running replica `name`; `tensor_parallel` None: found from the actor names Ray knows."""
        if tensor_parallel is None:
            tensor_parallel = 1
            while named_actor(f"{name}/stage-0/tp-{tensor_parallel}") is not None:
                tensor_parallel += 1
        names = cls.actor_names(name, num_stages, tensor_parallel)
        handles = [ray.get_actor(n) for n in names]
        groups = [handles[s * tensor_parallel : (s + 1) * tensor_parallel] for s in range(num_stages)]
        return cls([g[0] for g in groups], groups=groups)

    def info(self):
        """ObjectRef of a summary of the replica (waits for every stage to have loaded)."""
        return _summarise.remote(*[s.info.remote() for s in self.stages], *self.loaded)

    def _call(self, stage: int, method: str, payload, *args):
        """`method(payload, *args)` on stage `stage`: its actor, or its tensor-parallel group through rank 0
        (the payload also boxed in a list, so rank 0 can hand a previous stage's ObjectRef on: `lead`)."""
        if self.tensor_parallel > 1:
            return self.stages[stage].lead.remote(method, payload, [payload], *args)
        return getattr(self.stages[stage], method).remote(payload, *args)

    def _through_stages(self, payload: dict):
        ref = payload
        for stage in range(len(self.stages) - 1):
            ref = self._call(stage, "run", ref)
        return ref

    def submit_topk(
        self,
        request_id: int,
        input_ids: np.ndarray,
        k: int,
        values_dtype: str = "float16",
        hidden_layers: list[int] | None = None,
        codec: str = "none",
        sparsifier=None,
    ):
        """ObjectRef of the `TeacherOutput` for one micro-batch (encoded by `codec`; entries chosen by
        `sparsifier`, distill/teacher/sparsify.py, None: top-k)."""
        payload = {"input_ids": input_ids, "hidden_layers": list(hidden_layers) if hidden_layers else None}
        if sparsifier is not None:  # the last stage never sees the ids: it gets their seed
            payload["sample_seed"] = request_seed(input_ids, sparsifier.seed)
        last = len(self.stages) - 1
        stages = self._through_stages(payload)
        return self._call(last, "topk", stages, request_id, k, values_dtype, codec, sparsifier)

    def submit_full_log_probs(self, input_ids: np.ndarray, start: int = 0):
        last = len(self.stages) - 1
        return self._call(last, "full_log_probs", self._through_stages({"input_ids": input_ids}), start)

    def submit_generate(self, prompts: list[list[int]], seeds: list[int], sampling: dict, topk: int = 0):
        """ObjectRef of sampled completions (`TeacherActor.generate`); a one-stage replica only (with any
        tensor_parallel): a chain of stages has no KV cache across its stages."""
        if len(self.stages) > 1:
            raise ValueError(
                f"a replica of {len(self.stages)} pipeline stages cannot generate; use teacher.stages=1 "
                f"(teacher.tensor_parallel may be > 1)"
            )
        return self._call(0, "generate", prompts, seeds, sampling, topk)

    def shutdown(self) -> None:
        for group in self.groups:
            for actor in group:
                ray.kill(actor)
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)


def named_actor(name: str):
    """The actor named `name` in this namespace, or None."""
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


@ray.remote(num_cpus=0)
def _summarise(*stage_infos: dict | None) -> dict:
    """A replica's summary of its stages' infos. The tensor-parallel groups' `join` results come as
    arguments too (None each), so this waits for them and raises where a group failed to load."""
    stage_infos = tuple(i for i in stage_infos if i is not None)
    parameters = sum(i["parameters"] for i in stage_infos)
    first = stage_infos[0]
    return {
        "stages": list(stage_infos),
        "parameters": parameters,
        "device": first["device"],
        "document_eos": first["document_eos"],
        "tensor_parallel": first.get("tensor_parallel", 1),
    }
