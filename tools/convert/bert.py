"""BERT's GGUF hyper-parameters, as llama.cpp's convert_hf_to_gguf.py (conversion/bert.py) writes them,
and the pooling of a sentence-transformers folder.

Keys (llama.cpp's): bert.context_length, bert.embedding_length, bert.feed_forward_length, bert.block_count,
bert.attention.head_count, bert.attention.layer_norm_epsilon, bert.attention.causal = false,
bert.pooling_type (only when modules.json names a Pooling module, or for a classifier),
bert.classifier.output_labels (classifiers), tokenizer.ggml.token_type_count (written with the vocabulary).

Beyond llama.cpp:
  bert.pooling_type = 4 (RANK) and bert.classifier.output_labels for every BertForSequenceClassification
      (llama.cpp writes the labels only when they are not transformers' LABEL_0/LABEL_1 defaults, and no
      pooling type), so that llama.cpp sizes `cls.output` right and pools as the classifier does.
  pyengine.embedding.normalize (bool)  sentence-transformers folders only: true when modules.json has a
      Normalize module (embeddings are L2-normalized after pooling), false when it has none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFWriter, PoolingType

from .arch import ArchSpec, HParams
from .errors import ConversionError
from .source import _read_json

NORMALIZE_KEY = "pyengine.embedding.normalize"

# sentence-transformers pooling modes, as llama.cpp's TextModel._try_set_pooling_type maps them
POOLING_MODES = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "lasttoken": PoolingType.LAST}


def read_sentence_transformers(model_dir: Path) -> tuple[PoolingType | None, bool | None]:
    """(pooling type, whether embeddings are normalized) from modules.json; (None, None) without one."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return None, None
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ConversionError(f"cannot read {modules_path}: expected a list of modules")
    kinds = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    normalize = any(k.endswith("Normalize") for k in kinds)
    pooling_dir = next((m.get("path") for m in modules if isinstance(m, dict)
                        and str(m.get("type", "")).endswith("Pooling")), None)
    if pooling_dir is None:
        return None, normalize
    path = model_dir / pooling_dir / "config.json"
    pooling = _read_json(path)
    if pooling.get("pooling_mode_mean_tokens"):
        return PoolingType.MEAN, normalize
    if pooling.get("pooling_mode_cls_token"):
        return PoolingType.CLS, normalize
    if pooling.get("pooling_mode_lasttoken"):
        return PoolingType.LAST, normalize
    if pooling.get("pooling_mode") in POOLING_MODES:
        return POOLING_MODES[pooling["pooling_mode"]], normalize
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    raise ConversionError(f"{path}: pooling {modes or pooling.get('pooling_mode')} is not supported "
                          "(supported: mean, cls, lasttoken)")


def write_bert_hparams(w: GGUFWriter, hp: HParams, spec: ArchSpec, model_dir: Path, config: dict[str, Any],
                       warnings: list[str]) -> None:
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_layer_norm_eps(hp.norm_eps)
    w.add_causal_attention(False)
    pooling, normalize = read_sentence_transformers(model_dir)
    if "labels" in hp.extra:
        if pooling is not None:
            warnings.append(f"{model_dir / 'modules.json'}: a classifier pools its [CLS] token; the "
                            "sentence-transformers pooling is not written")
        w.add_pooling_type(PoolingType.RANK)
        w.add_classifier_output_labels(hp.extra["labels"])
    elif pooling is not None:
        w.add_pooling_type(pooling)
    if normalize is not None:
        w.add_bool(NORMALIZE_KEY, normalize)
