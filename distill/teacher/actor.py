"""The teacher actor: one replica of a causal LM behind a Ray actor.

Each request carries an id and a micro-batch of token ids; the reply carries the same id and the
teacher's top-k log-probs (normalised over the FULL vocabulary) as compact numpy arrays, which Ray
hands to the student through its shared-memory object store without a copy. For feature distillation a
request may also name teacher layers; the reply then carries those layers' hidden states too (layer j =
the output of decoder layer j, Hugging Face `hidden_states[j + 1]`), in the same dtype as the values.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from distill.codecs import Packed, decode, encode
from distill.teacher.sparsify import Sparsifier, request_generator, sparsify, width

_NUMPY_VALUES = {"float16": np.float16, "float32": np.float32}
# The vocabulary-wide temporaries of a top-k reply (fp32 logits and log-probs) are made this many bytes of
# logits at a time, whatever the micro-batch: 512 positions of a 128k vocabulary.
LOGITS_CHUNK_BYTES = 256 * 2**20


@torch.no_grad()
def topk_log_probs(hidden: torch.Tensor, head, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(head(hidden)) over the vocabulary, fp32 values and int64 ids [..., k], for
    final hidden states [..., H] and `head` mapping [n, H] to logits [n, V]. Computed a chunk of positions
    at a time (`LOGITS_CHUNK_BYTES` of fp32 logits), so the peak does not grow with micro-batch x vocab;
    row by row the same numbers as the whole batch at once."""
    values, indices, _ = sparse_log_probs(hidden, head, k)
    return values, indices


@torch.no_grad()
def sparse_log_probs(
    hidden: torch.Tensor,
    head,
    k: int,
    sparsifier: Sparsifier | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`topk_log_probs` with the entries chosen by `sparsifier` (distill/teacher/sparsify.py): values and
    ids [..., m], and each position's KL offset [...] for the sampled schemes (None for top-k)."""
    spec = sparsifier or Sparsifier()
    flat = hidden.reshape(-1, hidden.shape[-1])
    vocab = head.weight.shape[0] if hasattr(head, "weight") else None
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab)) if vocab else len(flat)
    m = width(spec.kind, k, spec.samples)
    # the reply's arrays are allocated once and filled chunk by chunk: nothing small is left allocated
    # between the chunks' large temporaries, which would fragment the heap
    values = torch.empty(len(flat), m, dtype=torch.float32, device=hidden.device)
    indices = torch.empty(len(flat), m, dtype=torch.long, device=hidden.device)
    offset = None if spec.kind == "topk" else torch.empty(len(flat), device=hidden.device)
    for start in range(0, len(flat), chunk):
        end = start + chunk
        log_probs = torch.log_softmax(head(flat[start:end]).float(), dim=-1)
        if offset is None:
            torch.topk(log_probs, k, dim=-1, out=(values[start:end], indices[start:end]))
        else:
            values[start:end], indices[start:end], offset[start:end] = sparsify(
                log_probs, spec.kind, k, spec.samples, generator
            )
        del log_probs
    lead = hidden.shape[:-1]
    return values.view(*lead, m), indices.view(*lead, m), None if offset is None else offset.view(lead)


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def _to_numpy(x: torch.Tensor, values_dtype: str) -> np.ndarray:
    """float16 / float32 arrays, or bfloat16 bits in uint16 (numpy has no bfloat16)."""
    if values_dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return x.cpu().numpy().astype(_NUMPY_VALUES[values_dtype])


@torch.no_grad()
def full_log_probs_reply(final: torch.Tensor, head, model_dtype: torch.dtype) -> np.ndarray:
    """Full-vocabulary log-probs [B, n, V] of final hidden states [B, n, H] (`head` maps them to logits;
    an Identity when `final` already holds logits), as evaluation receives them: float16 when the model
    computes in 16 bits (half the bytes of float32; finer than bfloat16 on log-probs, which lie in
    [-65504, 0]), else float32. The reply is allocated once and filled `LOGITS_CHUNK_BYTES` of fp32 logits
    at a time, so the peak is the reply plus one chunk. The stream turns them into float32 on arrival
    (`TeacherStream.full_log_probs`)."""
    half = model_dtype in (torch.float16, torch.bfloat16)
    flat = final.reshape(-1, final.shape[-1])
    vocab = head.weight.shape[0] if hasattr(head, "weight") else final.shape[-1]
    reply = np.empty((len(flat), vocab), dtype=np.float16 if half else np.float32)
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    for start in range(0, len(flat), chunk):
        log_probs = torch.log_softmax(head(flat[start : start + chunk]).float(), dim=-1)
        reply[start : start + chunk] = log_probs.to(torch.float16 if half else torch.float32).cpu().numpy()
        del log_probs
    return reply.reshape(*final.shape[:-1], vocab)


def _from_numpy(x: np.ndarray, values_dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(x.copy())  # Ray hands out read-only views; copy
    return tensor.view(torch.bfloat16) if values_dtype == "bfloat16" else tensor


@dataclass
class TeacherOutput:
    """Teacher output for one micro-batch: top-k values [B, T, k], indices [B, T, k] and, when layers
    were requested, their hidden states [n_layers, B, T, H] (`hidden_layers[i]` is the layer of `hidden[i]`).
    """

    request_id: int
    values: np.ndarray | None  # float16 / float32, or uint16 holding bfloat16 bits (numpy has no bfloat16)
    indices: np.ndarray | None
    values_dtype: str
    compute_s: float
    hidden: np.ndarray | None = None  # same dtype scheme as `values`
    hidden_layers: list[int] | None = None
    hop_bytes: int = 0  # activations a pipeline replica sent between its stages for this reply
    packed: Packed | None = None  # values and indices encoded by a `stream.codec` (then both are None)
    offset: np.ndarray | None = None  # [B, T] float32: the sampled sparsifiers' KL offset (sparsify.py)
    wire_bytes: int | None = None  # set by `unpacked`: what the reply weighed on the way

    def unpacked(self) -> TeacherOutput:
        """This reply with its values and ids decoded; `nbytes` still counts the bytes that travelled."""
        if self.packed is None:
            return self
        values, indices = decode(self.packed)
        return replace(
            self,
            values=values,
            indices=indices,
            values_dtype=self.packed.values_dtype,
            packed=None,
            wire_bytes=self.nbytes,
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = _from_numpy(self.values, self.values_dtype)
        indices = torch.from_numpy(self.indices.astype(np.int64))
        return values, indices

    def offset_tensor(self) -> torch.Tensor | None:
        """The KL offset per position [B, T] (sampled sparsifiers), or None (top-k)."""
        return None if self.offset is None else torch.from_numpy(np.array(self.offset, np.float32))

    def hidden_tensors(self) -> dict[int, torch.Tensor]:
        """{teacher layer: hidden state [B, T, H] in float32}; empty when no layers were requested."""
        if self.hidden is None:
            return {}
        hidden = _from_numpy(self.hidden, self.values_dtype).float()
        return {layer: hidden[i] for i, layer in enumerate(self.hidden_layers)}

    @property
    def nbytes(self) -> int:
        """Bytes of the reply as sent: the packed top-k, or its arrays, plus the hidden states."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        hidden = 0 if self.hidden is None else self.hidden.nbytes
        topk = self.packed.nbytes if self.packed is not None else self.values.nbytes + self.indices.nbytes
        return topk + hidden + (0 if self.offset is None else self.offset.nbytes)


def pack_output(
    request_id: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    values_dtype: str,
    vocab_size: int,
    compute_s: float,
    hidden: torch.Tensor | None = None,
    hidden_layers: list[int] | None = None,
    codec: str = "none",
    offset: torch.Tensor | None = None,
) -> TeacherOutput:
    """The reply for one micro-batch: top-k log-probs and ids [B, T, k] (`topk_log_probs`) in compact
    dtypes, or encoded by `codec` (distill/codecs.py), plus hidden states [n_layers, B, T, H] of
    `hidden_layers` when asked for, and the sampled sparsifiers' KL `offset` [B, T]."""
    hidden_np = None
    if hidden is not None:
        hidden_np = _to_numpy(hidden, values_dtype)
        if values_dtype == "float16" and not np.isfinite(hidden_np).all():
            raise ValueError(
                f"teacher hidden states of layers {hidden_layers} overflow float16 (|x| > 65504); "
                "use stream.values_dtype=bfloat16 or float32"
            )
    ids = indices.cpu().numpy().astype(index_dtype(vocab_size))
    offset_np = None if offset is None else offset.float().cpu().numpy()
    if codec != "none":
        packed = encode(values.float().cpu().numpy(), ids, codec, values_dtype)
        return TeacherOutput(
            request_id,
            None,
            None,
            values_dtype,
            compute_s,
            hidden_np,
            hidden_layers,
            packed=packed,
            offset=offset_np,
        )
    return TeacherOutput(
        request_id,
        _to_numpy(values, values_dtype),
        ids,
        values_dtype,
        compute_s,
        hidden=hidden_np,
        hidden_layers=hidden_layers,
        offset=offset_np,
    )


def load_spread(model_dir: str, dtype: str = "auto", attn_implementation: str = "auto"):
    """The causal LM at `model_dir` with its layers spread over every visible GPU (`device_map="auto"`,
    balanced by memory), for a replica given several GPUs (`gpus_per_replica` > 1), which would otherwise
    hold the whole model on the first one. Inputs go to the embedding's device; accelerate's hooks move the
    activations between GPUs. Not yet run on a GPU (the single-device path is what the tests run)."""
    from transformers import AutoModelForCausalLM

    from distill.models import resolve_attn_implementation, resolve_dtype, resolve_model

    folder, device = resolve_model(model_dir), torch.device("cuda")
    torch_dtype = resolve_dtype(dtype, device)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype,
        attn_implementation=resolve_attn_implementation(attn_implementation, device, torch_dtype),
        device_map="auto",
        use_safetensors=any(folder.glob("*.safetensors")),
        local_files_only=True,
    )


class TeacherActor:
    """Hosts one teacher replica; wrapped with `ray.remote` by `TeacherPool`."""

    def __init__(
        self,
        model_dir: str,
        dtype: str = "auto",
        attn_implementation: str = "auto",
        threads: int = 1,
        document_isolation: bool = False,
    ):
        """`document_isolation`: score each EOS-separated document of a packed row on its own, as the
        student trains on it (the pool passes the run's `data.document_isolation`, distill/documents.py);
        generation is unaffected."""
        import transformers

        from distill.documents import isolate_documents
        from distill.models import load_causal_lm, open_tokenizer, plain_lm_head

        transformers.utils.logging.disable_progress_bar()
        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.device_count() > 1:  # Ray gave this replica several GPUs: spread it over all of them
            self.model = load_spread(model_dir, dtype, attn_implementation)
        else:
            self.model = load_causal_lm(
                model_dir, dtype=dtype, attn_implementation=attn_implementation, device=self.device
            )
        self.model.eval()
        eos = open_tokenizer(model_dir).eos_token_id if document_isolation else None
        if eos is not None:
            isolate_documents(self.model, eos)
        self.document_eos = eos
        # a plain LM head is applied to the decoder's output a chunk of positions at a time (top-k replies
        # bounded in memory); otherwise (bias, scaling, soft-capping) the model's own forward makes logits
        self.plain_head = plain_lm_head(self.model)
        self.vocab_size = self.model.config.vocab_size
        self.num_layers = self.model.config.num_hidden_layers
        self.model_dir = model_dir

    def info(self) -> dict:
        import ray  # here, not at module level: TeacherOutput is imported by Ray-free cached runs

        return {
            "model_dir": self.model_dir,
            "vocab_size": self.vocab_size,
            "pid": os.getpid(),
            "dtype": str(next(self.model.parameters()).dtype),
            "device": str(self.device),
            "node": ray.get_runtime_context().get_node_id(),
            "document_eos": self.document_eos,  # None: packed documents attend across boundaries
        }

    @torch.no_grad()
    def _topk(
        self,
        input_ids: np.ndarray,
        k: int,
        hidden_layers: list[int] | None = None,
        sparsifier: Sparsifier | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Top-k (or sparsified) log-probs and ids [B, T, m], the KL offset [B, T] of the sampled
        sparsifiers (else None), and the hidden states [n, B, T, H] of `hidden_layers` (else None)."""
        ids = torch.from_numpy(input_ids.astype(np.int64)).to(self.device)
        want = bool(hidden_layers)
        generator = request_generator(input_ids, sparsifier.seed, self.device) if sparsifier else None
        if self.plain_head:
            out = self.model.get_decoder()(input_ids=ids, output_hidden_states=want)
            head, final = self.model.get_output_embeddings(), out.last_hidden_state
        else:
            out = self.model(input_ids=ids, output_hidden_states=want)
            head, final = torch.nn.Identity(), out.logits
        values, indices, offset = sparse_log_probs(final, head, k, sparsifier, generator)
        hidden = torch.stack([out.hidden_states[j + 1] for j in hidden_layers]) if want else None
        return values, indices, offset, hidden

    def _check_layers(self, hidden_layers: list[int]) -> None:
        bad = [j for j in hidden_layers if not 0 <= j < self.num_layers]
        if bad:
            raise ValueError(
                f"teacher layer {bad[0]} requested, but the teacher ({self.model_dir}) has "
                f"{self.num_layers} layers (valid: 0..{self.num_layers - 1})"
            )

    def topk(
        self,
        request_id: int,
        input_ids: np.ndarray,
        k: int,
        values_dtype: str = "float16",
        hidden_layers: list[int] | None = None,
        codec: str = "none",
        sparsifier: Sparsifier | None = None,
    ) -> TeacherOutput:
        """Top-k log-probs of every position of a micro-batch [B, T] of token ids (or the entries
        `sparsifier` picks), plus the hidden states of `hidden_layers` (layer j = output of decoder
        layer j) when given; encoded by `codec`."""
        start = time.perf_counter()
        hidden_layers = list(hidden_layers) if hidden_layers else None
        if hidden_layers:
            self._check_layers(hidden_layers)
        values, indices, offset, hidden = self._topk(input_ids, k, hidden_layers, sparsifier)
        compute_s = time.perf_counter() - start
        return pack_output(
            request_id,
            values,
            indices,
            values_dtype,
            self.vocab_size,
            compute_s,
            hidden,
            hidden_layers,
            codec,
            offset,
        )

    @torch.no_grad()
    def full_log_probs(self, input_ids: np.ndarray, start: int = 0) -> np.ndarray:
        """Full-vocabulary log-probs [B, T - start, V] of positions `start`.. of a micro-batch [B, T]
        (float32; float16 for a 16-bit model: `full_log_probs_reply`), so evaluation measures the exact KL.
        Evaluation asks for a window of positions of a long row at a time (the row cut at the window's
        end, `start` its first position), so no process holds a whole row's [T, V] log-probs."""
        ids = torch.from_numpy(input_ids.astype(np.int64)).to(self.device)
        if self.plain_head:
            final = self.model.get_decoder()(input_ids=ids).last_hidden_state[:, start:]
            head = self.model.get_output_embeddings()
        else:  # logits that are not plain lm_head(hidden) are computed whole
            final, head = self.model(input_ids=ids).logits[:, start:], torch.nn.Identity()
        return full_log_probs_reply(final, head, next(self.model.parameters()).dtype)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: dict, topk: int = 0
    ) -> list[dict]:
        """Sampled completions of tokenised prompts, one per seed (`distill.teacher.generate`); `sampling`
        holds max_new_tokens, temperature, top_p, stop_ids and pad_id."""
        from distill.teacher.generate import generate

        return generate(self.model, prompts, seeds, topk=topk, **sampling)
