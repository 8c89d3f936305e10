"""`Engine`: a GGUF model loaded into the C++ engine, and an inference context on it.

The engine handle underneath `pyengine.LLM`: token ids in, logits out, no text. A context holds up
to `n_seq_max` sequences in one KV cache; `decode` evaluates one batch of rows from any of them in a
single forward pass (llama.cpp's `llama_decode`), and `eval` / `logits` are the one-sequence case.

    engine = Engine("model.gguf", n_seq_max=4)
    logits = engine.decode([1, 2, 3, 1], seq_ids=[0, 0, 0, 1])   # [4, n_vocab]
    engine.seq_copy(0, 2)                                        # fork: pages are shared
"""
from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import _C
from ._C import EngineError, ModelFormatError
from .sampling import TopLogits

if TYPE_CHECKING:
    from .chat_template import ChatTemplate
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

__all__ = ["DEFAULT_SAMPLING", "Engine", "default_threads"]

# Sampling when the GGUF has no `general.sampling.*` keys: llama.cpp's defaults.
DEFAULT_SAMPLING: dict[str, Any] = dict(
    max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0
)
# SamplingParams field <- GGUF key, as tools/convert/convert.py writes them from generation_config.json.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}
# Tokenizers are built once per model (a large vocabulary takes a second) and shared by its contexts.
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Tokenizer]" = weakref.WeakKeyDictionary()


def default_threads() -> int:
    """Physical cores: hyper-threads share the core's vector units, so they only add contention."""
    return max(1, _C.physical_core_count())


def gpu_info() -> dict[str, Any] | None:
    """The GPU this build can use: {"name", "free", "total"} (bytes), or None (no CUDA build or no GPU)."""
    mem = _C.cuda_memory() if _C.has_cuda else None
    if mem is None:
        return None
    return {"name": mem[2], "free": int(mem[0]), "total": int(mem[1])}


def offload(model: "_C.Model", n_gpu_layers: int | str, n_ctx: int, n_seq_max: int, n_batch: int,
            kv_type: str) -> dict[str, Any] | None:
    """Puts the last `n_gpu_layers` blocks of `model` on the GPU after checking the memory plan;
    returns the plan (None for CPU only). Raises DeviceMemoryError naming what fits, or EngineError
    when there is no GPU to use."""
    auto = isinstance(n_gpu_layers, str)
    if auto and n_gpu_layers != "auto":
        raise ValueError(f"n_gpu_layers must be a number of layers or 'auto', not {n_gpu_layers!r}")
    if not auto and (isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < 0):
        raise ValueError(f"n_gpu_layers must be a number >= 0 or 'auto', not {n_gpu_layers!r}")
    if n_gpu_layers == 0:
        return None
    gpu = gpu_info()
    if gpu is None:
        why = ("this build of pyengine has no CUDA backend (it was built without nvcc)" if not _C.has_cuda
               else "no CUDA GPU was found")
        if auto:
            return None  # "as many as fit": none, on a machine without a GPU
        raise EngineError(f"n_gpu_layers={n_gpu_layers}: {why}; run with n_gpu_layers=0 (-ngl 0) for the CPU")
    plan = _C.plan_offload(model, -1 if auto else int(n_gpu_layers), int(n_ctx), int(n_seq_max), int(n_batch),
                           kv_type, gpu["free"])
    if plan["n_gpu_layers"] == 0:
        return None
    model.offload(plan["n_gpu_layers"])
    plan["device"] = gpu["name"]
    return plan


def _ids(token_ids: Sequence[int] | np.ndarray, what: str = "token_ids") -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what}: values must fit in int32")
    return ids.astype(np.int32)


class Engine:
    """A model and its inference context.

    Args:
        model_path: a GGUF file.
        n_ctx: tokens per sequence (KV cache positions); 0 means the model's training context.
        n_threads: CPU threads; default: the number of physical cores.
        n_batch: rows evaluated per forward pass (a longer prompt or batch runs in several passes).
        kv_type: KV cache element type: "f16" (default), "f32", or "q8_0" (llama.cpp's -ctk q8_0
            -ctv q8_0: int8 with an fp16 scale per 32 dimensions, 53% of f16's memory and of the
            bytes attention reads; CPU only, heads a multiple of 32 wide).
        n_seq_max: sequences the context holds at once (its KV cache has room for n_seq_max * n_ctx).
        n_gpu_layers: transformer blocks to run on the GPU (llama.cpp's -ngl): the last N blocks and
            their KV cache go to the GPU, the rest run on the CPU; N >= the number of blocks puts the
            whole model there, output layer included. "auto": as many as the free GPU memory holds
            with room for the KV cache and scratch. 0 (default): CPU only.
        use_mmap: True (default): the weights are used in place in a shared mapping of the file
            (nothing copied; pages shared with other processes and the page cache). If the file is
            truncated or rewritten in place while loaded, the next call raises ModelFormatError
            naming it instead of computing with what the file now holds; replacing the file by
            rename is harmless (the old file stays mapped). False: read the whole file into private
            memory, unaffected by whatever happens to the file afterwards (llama.cpp's --no-mmap).
        max_memory: bytes of host memory the model and this context may take (weights, KV cache,
            scratch, one pass's logits); None: the machine's memory (or its container's limit). A
            context that needs more raises pyengine.MemoryLimitError, with the figures, before
            anything is allocated. `memory_plan()` gives the figures.
    """

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, kv_type: str = "f16", n_seq_max: int = 1, n_gpu_layers: int | str = 0,
                 use_mmap: bool = True, max_memory: int | None = None):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or max_memory <= 0):
            raise ValueError(f"max_memory must be a positive number of bytes or None, not {max_memory!r}")
        self.model_path = path
        self.max_memory = max_memory
        self._model = _C.Model(str(path), use_mmap=bool(use_mmap))
        if n_threads is None or n_threads <= 0:
            n_threads = default_threads()
        self._executor = _C.Executor(int(n_threads))
        n_ctx = self._resolve_n_ctx(n_ctx)
        self.offload_plan = offload(self._model, n_gpu_layers, n_ctx, n_seq_max, n_batch, kv_type)
        self._init_context(n_ctx, n_batch, kv_type, n_seq_max)

    def _resolve_n_ctx(self, n_ctx: int) -> int:
        """0: the training context. A model with learned positions (BERT, GPT-2) has no position past
        its table: at most that many."""
        train = int(self._model.config["n_ctx_train"])
        if n_ctx <= 0:
            return train
        return min(int(n_ctx), train) if self._model.config["positions"] == "learned" else int(n_ctx)

    def _init_context(self, n_ctx: int, n_batch: int, kv_type: str, n_seq_max: int) -> None:
        self._n_batch, self._kv_type = int(n_batch), kv_type
        n_ctx = self._resolve_n_ctx(n_ctx)
        self._ctx = _C.Context(self._model, self._executor, int(n_ctx), int(n_seq_max), int(n_batch), kv_type,
                               int(self.max_memory or 0))

    def new_context(self, n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                    kv_type: str = "f16", n_seq_max: int = 1) -> "Engine":
        """Another engine of the same class on the same weights (shared, not copied) with its own KV
        cache. It shares this one's thread pool (their forward passes take turns) unless `n_threads`
        asks for a different number of threads."""
        other = object.__new__(type(self))
        other.model_path = self.model_path
        other.max_memory = self.max_memory
        other._model = self._model
        other.offload_plan = self.offload_plan
        same = n_threads is None or n_threads == self.n_threads
        other._executor = self._executor if same else _C.Executor(int(n_threads))
        other._init_context(self.n_ctx if n_ctx is None else n_ctx, n_batch, kv_type, n_seq_max)
        return other

    def memory_plan(self, n_ctx: int | None = None, n_seq_max: int | None = None, n_batch: int | None = None,
                    kv_type: str | None = None) -> dict[str, int]:
        """Host memory in bytes a context with these settings needs with this model ("weights",
        "kv_cache", "scratch", "logits", "total") and the machine's "limit"; defaults: this context's."""
        return _C.host_memory_plan(self._model, int(self.n_ctx if n_ctx is None else n_ctx),
                                   int(self.n_seq_max if n_seq_max is None else n_seq_max),
                                   int(self._n_batch if n_batch is None else n_batch), kv_type or self._kv_type)

    # --- model facts -------------------------------------------------------------------------
    @cached_property
    def metadata(self) -> dict[str, Any]:
        """The GGUF metadata (keys as in the file)."""
        return self._model.file.metadata

    def metadata_value(self, key: str, default: Any = None) -> Any:
        """One GGUF metadata value, as `metadata[key]`, without building `metadata` (whose token and
        merge lists are ~100k Python objects, several MB), or `default` when the file lacks it."""
        return self._model.file.get(key, default)

    @property
    def config(self) -> dict[str, Any]:
        """Hyper-parameters the engine runs with (arch, n_embd, n_layer, n_head, ...)."""
        return self._model.config

    @property
    def n_vocab(self) -> int:
        return int(self._model.config["n_vocab"])

    @property
    def n_ctx(self) -> int:
        """Tokens each sequence can hold."""
        return self._ctx.n_ctx

    @property
    def n_seq_max(self) -> int:
        return self._ctx.n_seq_max

    @property
    def n_gpu_layers(self) -> int:
        """Transformer blocks running on the GPU (0: CPU only)."""
        return int(self._model.n_gpu_layers)

    @property
    def n_threads(self) -> int:
        return self._ctx.n_threads

    @property
    def n_past(self) -> int:
        """Tokens held in the KV cache for sequence 0 (the one `eval` uses)."""
        return self._ctx.n_past

    # --- evaluation ----------------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        """True for encoder-decoder models (T5): `encode` an input, then decode from `decoder_start_token_id`."""
        return self.config.get("family") == "encoder-decoder"

    @property
    def decoder_start_token_id(self) -> int | None:
        """The token an encoder-decoder's decoder starts from (None for other models)."""
        return int(self.config["decoder_start_token_id"]) if self.is_encoder_decoder else None

    def encode(self, token_ids: Sequence[int] | np.ndarray, seq: int = 0) -> None:
        """Encoder-decoder models: run the encoder over `token_ids` for sequence `seq`, which starts over
        empty; its decoder then attends to that output (append `decoder_start_token_id` first)."""
        ids = _ids(token_ids)
        if ids.size == 0:
            raise ValueError("encode needs at least one token")
        self._ctx.encode(ids, int(seq))

    def eval(self, token_ids: Sequence[int] | np.ndarray, all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Append tokens to sequence `seq` and return float32 logits: of the last token ([n_vocab]),
        or of every new token ([len(token_ids), n_vocab]) with ``all_logits``.

        Raises ``pyengine.ContextLengthError`` if the sequence would exceed ``n_ctx``.
        """
        ids = _ids(token_ids)
        if ids.size == 0:
            raise ValueError("eval needs at least one token")
        return self._ctx.eval(ids, "all" if all_logits else "last", int(seq))

    def decode(self, token_ids: Sequence[int] | np.ndarray, seq_ids: Sequence[int] | np.ndarray,
               logits: Sequence[bool] | np.ndarray | None = None, embeddings: bool = False) -> np.ndarray:
        """Evaluate one batch of rows in one forward pass: token ``token_ids[i]`` is appended to
        sequence ``seq_ids[i]`` (rows of a sequence in order). Returns float32 logits of the rows
        whose ``logits`` flag is set (every row when None), [rows, n_vocab], in row order. If it
        raises, every sequence is as it was before the call. With ``embeddings`` the rows' final
        hidden states after the output norm instead, [rows, n_embd]."""
        ids, seqs = _ids(token_ids), _ids(seq_ids, "seq_ids")
        if ids.size == 0:
            raise ValueError("decode needs at least one row")
        want = None if logits is None else np.asarray(logits, dtype=bool).reshape(-1)
        return self._ctx.decode(ids, seqs, want, embeddings)

    def eval_top(self, token_ids: Sequence[int] | np.ndarray, k: int = 1, inv_t: float = 0.0,
                 seq: int = 0, u: float = -1.0) -> TopLogits:
        """`eval` for sampling: the `TopLogits` of the last token (its k largest logits, its weight sum
        at inv_t, and with u in [0, 1) a token drawn at inv_t: what `Sampler.request` asks for) instead
        of its whole row of logits."""
        ids = _ids(token_ids)
        if ids.size == 0:
            raise ValueError("eval needs at least one token")
        want = np.zeros(ids.size, dtype=bool)
        want[-1] = True
        return self.decode_top(ids, np.full(ids.size, int(seq), np.int32), want, [(k, inv_t, u)])[0]

    def decode_top(self, token_ids: Sequence[int] | np.ndarray, seq_ids: Sequence[int] | np.ndarray,
                   logits: Sequence[bool] | np.ndarray | None = None,
                   requests: Sequence[tuple[int, float] | tuple[int, float, float]] | None = None) -> list[TopLogits]:
        """`decode` for sampling: each wanted row's `TopLogits` instead of its logits; `requests` holds
        (k, inv_t) or (k, inv_t, u) per wanted row (`Sampler.request`; None: (1, 0), the argmax). With u
        in [0, 1) the engine also draws the row's token from softmax(logits * inv_t) at u
        (`TopLogits.drawn`; the weight sum is then not computed), every such row at once on the CPU's
        threads. The logits stay where the output layer ran (GPU memory when it is offloaded: a step
        then copies kilobytes to the host, not rows of n_vocab floats), and `TopLogits.full()` copies a
        row until this context evaluates anything else."""
        ids, seqs = _ids(token_ids), _ids(seq_ids, "seq_ids")
        if ids.size == 0:
            raise ValueError("decode needs at least one row")
        want = np.ones(ids.size, dtype=bool) if logits is None else np.asarray(logits, dtype=bool).reshape(-1)
        n_want = int(want.sum())
        requests = [(1, 0.0)] * n_want if requests is None else list(requests)
        if len(requests) != n_want:
            raise ValueError(f"decode_top: {len(requests)} requests for {n_want} rows with logits wanted")
        n_vocab = self.n_vocab
        k = np.array([min(int(r[0]), n_vocab) for r in requests], np.int32)
        inv_t = np.array([float(r[1]) for r in requests], np.float32)
        u = [float(r[2]) if len(r) > 2 else -1.0 for r in requests]
        top_ids, values, stats, drawn, serial = self._ctx.decode_top(
            ids, seqs, want, k, inv_t, int(k.max(initial=1)), u if any(not x < 0 for x in u) else None)
        fetch = self._ctx.row_logits
        return [TopLogits(top_ids[i, : k[i]], values[i, : k[i]], float(stats[i, 0]), n_vocab,
                          functools.partial(fetch, serial, i), int(drawn[i])) for i in range(n_want)]

    def embed(self, inputs: Sequence[Sequence[int]], normalize: bool | None = None) -> np.ndarray:
        """Embeddings of token-id sequences, float32 [len(inputs), n_embd], pooled from each sequence's
        final hidden states (after the output norm, where the model has one) as the model says:
        encoders (BERT) by their `pooling_type` (mean, the first token [CLS], or the last), decoder
        models by the mean (llama.cpp's default for them); L2-normalized when `normalize` is True, or,
        when it is None, unless the file says otherwise (`pyengine.embedding.normalize`: a
        sentence-transformers model without a Normalize module).
        The sequences run as one batch in a context of their own; this one's is left alone."""
        seqs = [_ids(x) for x in inputs]
        if not seqs or any(x.size == 0 for x in seqs):
            raise ValueError("embed needs at least one non-empty sequence")
        need = max(x.size for x in seqs)
        if need > self.n_ctx:
            raise _C.ContextLengthError(f"an input has {need} tokens, more than the context of {self.n_ctx}")
        ctx = self.new_context(n_ctx=need, n_seq_max=len(seqs))
        hidden = ctx.decode(np.concatenate(seqs), np.repeat(np.arange(len(seqs)), [x.size for x in seqs]),
                            embeddings=True)
        bounds = np.cumsum([0] + [x.size for x in seqs])
        pooling = self.config.get("pooling", "none")
        if pooling in ("cls", "rank"):
            rows = [hidden[bounds[i]] for i in range(len(seqs))]
        elif pooling == "last":
            rows = [hidden[bounds[i + 1] - 1] for i in range(len(seqs))]
        else:
            rows = [hidden[bounds[i]:bounds[i + 1]].mean(axis=0) for i in range(len(seqs))]
        out = np.stack(rows).astype(np.float32)
        if normalize is None:
            normalize = bool(self.metadata.get("pyengine.embedding.normalize", True))
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits of every position of ``token_ids`` in a fresh context: float32 [len, n_vocab]."""
        self.reset()
        return self.eval(token_ids, all_logits=True)

    def reset(self) -> None:
        """Empty every sequence of the context."""
        self._ctx.clear()

    def collect_input_stats(self, on: bool = True, covariance: bool = False,
                            covariance_tensors: list[str] | None = None) -> None:
        """Importance matrix (llama.cpp's imatrix): while on, every forward pass adds each linear
        layer's input to per-column sums of squares (`input_stats`); turning it on starts from zero.
        covariance=True also sums x^T x per layer (`input_covariance`, for error-feedback quantization),
        for the weights named in `covariance_tensors` only when given. CPU layers only (n_gpu_layers=0)."""
        self._ctx.collect_input_stats(bool(on), bool(covariance), list(covariance_tensors or []))

    def input_covariance(self, take: bool = False) -> dict[str, tuple[np.ndarray, int]]:
        """{weight tensor name: (float32 [cols, cols] sums of x^T x, rows summed)} since
        collect_input_stats(True, covariance=True); q/k/v (gate/up) share one array. take=True hands over
        the engine's own matrices instead of copies (half the memory) and stops the collection, so read
        input_stats() first."""
        return self._ctx.input_covariance(take)

    def input_stats(self) -> dict[str, tuple[np.ndarray, int]]:
        """{weight tensor name: (float64 per-column sums of x^2, rows summed)} since collection began."""
        return self._ctx.input_stats()

    def truncate(self, n_past: int) -> None:
        """Keep the first ``n_past`` tokens of sequence 0 and forget the rest (all of them when a sliding
        window has dropped keys the next token would need: read ``n_past`` back)."""
        self._ctx.seq_truncate(0, int(n_past))

    def seq_len(self, seq: int) -> int:
        """Tokens held for sequence `seq`."""
        return self._ctx.seq_len(int(seq))

    def seq_truncate(self, seq: int, n: int) -> None:
        """Keep the first `n` tokens of sequence `seq` (none when a sliding window has dropped keys the
        next token would need: read `seq_len` back)."""
        self._ctx.seq_truncate(int(seq), int(n))

    def seq_copy(self, src: int, dst: int) -> None:
        """Make sequence `dst` a copy of `src` (a fork: their cache pages are shared until either
        appends to a shared page, so a long common prefix is not copied)."""
        self._ctx.seq_copy(int(src), int(dst))

    # --- the model's text side ---------------------------------------------------------------
    @property
    def tokenizer(self) -> "Tokenizer":
        """The model's tokenizer, built from the GGUF metadata on first use and shared by `new_context` copies."""
        from .tokenizer import Tokenizer

        tokenizer = _TOKENIZERS.get(self._model)
        if tokenizer is None:
            tokenizer = Tokenizer.from_metadata(self.metadata)
            if tokenizer.n_vocab != self.n_vocab:  # ids the model makes would have no text, or the reverse
                raise ModelFormatError(f"{self.model_path}: tokenizer.ggml.tokens has {tokenizer.n_vocab} tokens "
                                       f"but the model's embedding has {self.n_vocab} rows")
            _TOKENIZERS[self._model] = tokenizer
        return tokenizer

    @cached_property
    def chat_template(self) -> "ChatTemplate":
        """The model's chat template (`tokenizer.chat_template`), else a built-in guessed from the vocabulary."""
        from .chat_template import ChatTemplate

        return ChatTemplate.for_tokenizer(self.tokenizer)

    @cached_property
    def sampling_defaults(self) -> dict[str, Any]:
        """`SamplingParams` fields this model generates with unless told otherwise: the
        `general.sampling.*` keys of the GGUF (from the checkpoint's generation_config.json), else
        `DEFAULT_SAMPLING`; plus the extra end-of-generation ids that generation_config.json lists."""
        md = self.metadata
        defaults = dict(DEFAULT_SAMPLING)
        for name, key in SAMPLING_KEYS.items():
            if md.get(key) is not None:
                defaults[name] = type(DEFAULT_SAMPLING[name])(md[key])
        eos = md.get("pyengine.generation.eos_token_ids")
        if eos is not None:
            defaults["stop_token_ids"] = tuple(int(i) for i in np.atleast_1d(eos))
        for key in ("forced_bos_token_id", "forced_eos_token_id"):
            value = md.get(f"pyengine.generation.{key}")
            if value is not None:
                if not 0 <= int(value) < self.n_vocab:
                    raise ModelFormatError(f"{self.model_path}: pyengine.generation.{key} = {value} is outside the "
                                           f"vocabulary (0..{self.n_vocab - 1})")
                defaults[key] = int(value)
        for key in ("min_length", "min_new_tokens"):
            value = md.get(f"pyengine.generation.{key}")
            if value is not None:
                defaults[key] = int(value)
        return defaults

    def sampling_params(self, params: "SamplingParams | None" = None, **overrides: Any) -> "SamplingParams":
        """`SamplingParams` from the model's defaults (or `params`), with `overrides` applied.

        Overrides are SamplingParams fields (transformers' names): max_new_tokens, temperature,
        top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop,
        stop_token_ids, ignore_eos, forced_bos_token_id, forced_eos_token_id, min_length, min_new_tokens. A value of
        None keeps the default.
        """
        from .sampling import SamplingParams

        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        base = dataclasses.asdict(params) if params is not None else dict(self.sampling_defaults)
        given = {k: v for k, v in overrides.items() if v is not None}
        if params is None and "stop_token_ids" in given:  # the model's own end ids keep stopping it
            given["stop_token_ids"] = (*given["stop_token_ids"], *base.get("stop_token_ids", ()))
        return SamplingParams(**{**base, **given})

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}({str(self.model_path)!r}, arch={c['arch']}, n_layer={c['n_layer']}, "
                f"n_embd={c['n_embd']}, n_ctx={self.n_ctx}, n_seq_max={self.n_seq_max}, n_threads={self.n_threads})")
