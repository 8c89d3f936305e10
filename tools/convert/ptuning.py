"""P-Tuning v2 prefixes of THUDM's ChatGLM2/3 (and GLM-4) checkpoints, folded into the GGUF.

THUDM's ptuning/main.py trains only `transformer.prefix_encoder` and saves it alone (pytorch_model.bin or
model.safetensors in the checkpoint folder): an embedding of pre_seq_len rows of 2 x layers x kv_dim, and
with `prefix_projection` a two-layer MLP (trans.0, Tanh, trans.2) applied to it. modeling_chatglm.py's
get_prompt() turns the encoder's output into past key values: a row holds, per layer, its key then its
value, each [multi_query_group_num x kv_channels]. Every sequence then starts from those keys and values
(the keys as they are: no RoPE), sees all of them, and numbers its own tokens from position 0.

As chatglm.cpp does (its convert.py get_prefix_cache), the encoder is run here once and its output
stored; unlike chatglm.cpp we keep it F32 (it is small: pre_seq_len x 2 x layers x kv_dim floats) and per
layer, under names of our own, since llama.cpp has no P-Tuning v2:
    blk.N.prefix_k, blk.N.prefix_v   F32, numpy shape [pre_seq_len, n_head_kv * head_dim]
    {arch}.prefix_length             pre_seq_len (uint32)
llama.cpp does not read them (it refuses a file with tensors it does not know); a file converted without
--ptuning is unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .arch import HParams
from .errors import ConversionError
from .source import Checkpoint, _read_json

ENCODER = "transformer.prefix_encoder."
EMBEDDING = ENCODER + "embedding.weight"
MLP = tuple(ENCODER + f"trans.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias"))


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConversionError(f"P-Tuning checkpoint not found: {path}")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise ConversionError(f"no P-Tuning weights in {path}: expected model.safetensors or pytorch_model.bin "
                          "(as THUDM's ptuning/main.py saves them)")


def load_prefix(path: str | Path, hp: HParams) -> np.ndarray:
    """The past keys and values of a P-Tuning v2 checkpoint (a folder, or its weights file), float32
    [pre_seq_len, n_layer, 2 (key, value), n_head_kv * head_dim]. Raises ConversionError naming the
    tensor or key that does not fit the model."""
    path = Path(path)
    files = _weight_files(path)
    ckpt = Checkpoint(files[0].parent, files)
    try:
        names = set(ckpt.tensors)
        where = files[0]
        if EMBEDDING not in names:
            raise ConversionError(f"{where}: no tensor {EMBEDDING} (not a P-Tuning v2 checkpoint of a ChatGLM2/3 "
                                  "model)")
        other = sorted(names - {EMBEDDING, *MLP})
        if other:
            raise ConversionError(f"{where}: tensor {other[0]} is not part of a P-Tuning v2 prefix encoder (only "
                                  f"{ENCODER}* is; a fully fine-tuned model is converted as a model)")
        kv_dim = hp.n_head_kv * hp.head_dim
        kv_size = 2 * hp.n_layer * kv_dim
        emb = ckpt.tensors[EMBEDDING]
        if len(emb.shape) != 2 or emb.shape[1] != kv_size or emb.shape[0] < 1:
            raise ConversionError(f"{where}: tensor {EMBEDDING} has shape {list(emb.shape)}, but the model needs "
                                  f"[pre_seq_len, {kv_size}] (2 x {hp.n_layer} layers x {hp.n_head_kv} KV heads x "
                                  f"{hp.head_dim})")
        pre_seq_len = emb.shape[0]
        present = [n for n in MLP if n in names]
        if present and len(present) != len(MLP):
            missing = next(n for n in MLP if n not in names)
            raise ConversionError(f"{where}: prefix_projection needs {missing} too (it has {present[0]})")
        config_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if isinstance(config, dict):
            if config.get("pre_seq_len") not in (None, pre_seq_len):
                raise ConversionError(f"{config_path}: pre_seq_len {config['pre_seq_len']} but {EMBEDDING} has "
                                      f"{pre_seq_len} rows")
            if "prefix_projection" in config and bool(config["prefix_projection"]) != bool(present):
                raise ConversionError(f"{config_path}: prefix_projection={config['prefix_projection']} but the "
                                      f"checkpoint {'has' if present else 'has no'} {ENCODER}trans.* tensors")

        # float64 for the MLP, as exact as the float32 weights allow
        prefix = ckpt.load(EMBEDDING).astype(np.float64)
        if present:
            w0, b0, w2, b2 = (ckpt.load(n).astype(np.float64) for n in MLP)
            hidden = w0.shape[0] if w0.ndim == 2 else -1
            want = {MLP[0]: (hidden, kv_size), MLP[1]: (hidden,), MLP[2]: (kv_size, hidden), MLP[3]: (kv_size,)}
            for name, arr in zip(MLP, (w0, b0, w2, b2)):
                if hidden < 1 or arr.shape != want[name]:
                    raise ConversionError(f"{where}: tensor {name} has shape {list(arr.shape)}, expected "
                                          f"{list(want[name])} (Linear({kv_size}, hidden) -> Tanh -> "
                                          f"Linear(hidden, {kv_size}))")
            prefix = np.tanh(prefix @ w0.T + b0) @ w2.T + b2
        if not np.isfinite(prefix).all():
            raise ConversionError(f"{where}: the P-Tuning v2 prefix holds NaN or Inf")
        # get_prompt(): view(pre_seq_len, layers * 2, groups, kv_channels), then (key, value) pairs per layer
        return prefix.astype(np.float32).reshape(pre_seq_len, hp.n_layer, 2, kv_dim)
    finally:
        ckpt.close()
