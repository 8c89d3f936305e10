"""Helpers the encoder-decoder tests (test_t5.py, test_bart.py) share: a checkpoint folder's GGUF, the
transformers reference logits, an engine context, and the closeness check."""
from __future__ import annotations

import numpy as np
import torch

from pyengine import _C
from pyengine_convert import convert


def gguf_of(d, qtype="f32"):
    """The folder's checkpoint converted to `qtype` (once; kept in the folder)."""
    out = d / f"m-{qtype}.gguf"
    if not out.exists():
        convert(d, out, qtype=qtype, output_qtype="f32" if qtype == "f32" else None)
    return out


def ref_logits(hf, src, tgt):
    """transformers' decoder logits for input ids src and decoder input ids tgt."""
    with torch.no_grad():
        return hf(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt])).logits[0].numpy()


def context(path, n_seq=1):
    """A 64-position context with an F32 KV cache on 2 threads."""
    return _C.Context(_C.Model(str(path)), _C.Executor(2), 64, n_seq, 512, "f32")


def assert_close(ours, ref, tol=1e-4):
    err = np.abs(ours - ref).max()
    assert err < tol * max(1.0, np.abs(ref).max()), err
