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
from distill.teacher.actor import TeacherOutput, pack_output, topk_log_probs


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
    """One pipeline stage; wrapped with `ray.remote` by `PipelineTeacher`."""

    def __init__(
        self,
        model_dir: str,
        start: int,
        end: int,
        dtype: str = "auto",
        threads: int = 1,
        document_isolation: bool = False,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.masking_utils import create_causal_mask

        from distill.models import resolve_attn_implementation, resolve_dtype

        self.rss_before_weights = self.memory()["VmRSS"]  # the Python/torch/transformers runtime alone
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_dir)
        # sdpa / flash attention apply the causal mask themselves; eager would need it built explicitly
        config._attn_implementation = resolve_attn_implementation("auto", self.device, self.dtype)
        self.config, self._create_causal_mask = config, create_causal_mask
        self.start, self.end = start, end
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
        tied = self.last and "lm_head.weight" not in files  # tied embeddings: the head is the embedding
        tensors = _load(files, sorted(names | ({"model.embed_tokens.weight"} if tied else set())), self.dtype)
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

    def info(self) -> dict:
        modules = [m for m in (self.embed, *self.layers, self.norm, self.head) if m is not None]
        params = {p.data_ptr(): p.numel() for m in modules for p in m.parameters()}  # tied head: once
        return {
            "layers": [self.start, self.end],
            "parameters": sum(params.values()),
            "device": str(self.device),
            "node": ray.get_runtime_context().get_node_id(),
            "document_eos": self.document_eos,  # stage 0 only: the stage that finds the documents
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

    def topk(self, payload: dict, request_id: int, k: int, values_dtype: str) -> TeacherOutput:
        """Last stage only: top-k of the full-vocabulary log-probs, packed like `TeacherActor.topk`."""
        result = self.run(payload)
        layers = list(payload["hidden_layers"]) if payload.get("hidden_layers") else None
        hidden = torch.from_numpy(np.stack([result["collected"][j] for j in layers])) if layers else None
        values, indices = topk_log_probs(result["final_hidden"], self.head, k)
        out = pack_output(
            request_id,
            values,
            indices,
            values_dtype,
            self.config.vocab_size,
            result["compute_s"],
            hidden,
            layers,
        )
        out.hop_bytes = result.get("hop_bytes", 0)  # activations sent between this replica's stages
        return out

    @torch.no_grad()
    def full_log_probs(self, payload: dict) -> np.ndarray:
        logits = self.head(self.run(payload)["final_hidden"]).float()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()


class PipelineTeacher:
    """One teacher replica as a chain of stage actors named `<name>/stage-<s>`.

    `start` places the stages with a Ray placement group: `strategy="SPREAD"` puts them on different
    nodes where it can, `"PACK"` keeps them together. Requests are submitted as chained calls, so the
    replica pipelines however many micro-batches the students keep in flight.
    """

    def __init__(self, stages: list, placement=None):
        self.stages, self.placement = stages, placement

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
    ) -> PipelineTeacher:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        bounds = split_layers(config["num_hidden_layers"], num_stages)
        bundle = {"CPU": cpus_per_stage, **({"GPU": gpus_per_stage} if gpus_per_stage else {})}
        placement = placement_group([bundle] * num_stages, strategy=strategy)
        ray.get(placement.ready())
        remote_stage = ray.remote(TeacherStage)
        stages = [
            remote_stage.options(
                name=f"{name}/stage-{i}",
                num_cpus=cpus_per_stage,
                **ray_gpu_options(gpus_per_stage),  # its share of the replica's GPUs, or none visible
                max_restarts=max_restarts,
                max_task_retries=-1 if max_restarts else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=i
                ),
            ).remote(model_dir, start, end, dtype, threads, document_isolation)
            for i, (start, end) in enumerate(bounds)
        ]
        return cls(stages, placement)

    @classmethod
    def attach(cls, name: str, num_stages: int) -> PipelineTeacher:
        return cls([ray.get_actor(f"{name}/stage-{i}") for i in range(num_stages)])

    def info(self):
        """ObjectRef of a summary of the replica (waits for every stage to have loaded)."""
        return _summarise.remote(*[s.info.remote() for s in self.stages])

    def _through_stages(self, payload: dict):
        ref = payload
        for stage in self.stages[:-1]:
            ref = stage.run.remote(ref)
        return ref

    def submit_topk(
        self,
        request_id: int,
        input_ids: np.ndarray,
        k: int,
        values_dtype: str = "float16",
        hidden_layers: list[int] | None = None,
    ):
        """ObjectRef of the `TeacherOutput` for one micro-batch."""
        payload = {"input_ids": input_ids, "hidden_layers": list(hidden_layers) if hidden_layers else None}
        return self.stages[-1].topk.remote(self._through_stages(payload), request_id, k, values_dtype)

    def submit_full_log_probs(self, input_ids: np.ndarray):
        return self.stages[-1].full_log_probs.remote(self._through_stages({"input_ids": input_ids}))

    def shutdown(self) -> None:
        for stage in self.stages:
            ray.kill(stage)
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)


@ray.remote(num_cpus=0)
def _summarise(*stage_infos: dict) -> dict:
    parameters = sum(i["parameters"] for i in stage_infos)
    first = stage_infos[0]
    return {
        "stages": list(stage_infos),
        "parameters": parameters,
        "device": first["device"],
        "document_eos": first["document_eos"],
    }
