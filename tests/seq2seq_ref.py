"""Helpers the encoder-decoder tests (test_t5.py, test_bart.py) share: a checkpoint folder's GGUF, the
transformers reference logits, an engine context, and the closeness check; and the tests both run on their
own models (imported there, so each file collects them for its families through its `seq2seq` fixture)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Seq2SeqCase:
    """A family's checkpoint folder and transformers model, with two inputs and decoder inputs for it (each
    family has its own start and end ids)."""

    folder: Path
    hf: Any
    src: list[int]
    tgt: list[int]
    src2: list[int]
    tgt2: list[int]


def test_token_by_token_equals_full_decoder(seq2seq):
    c = seq2seq
    ctx = context(gguf_of(c.folder))
    ctx.encode(np.array(c.src, np.int32), 0)
    full = ctx.eval(np.array(c.tgt, np.int32), "all", 0)
    ctx.encode(np.array(c.src, np.int32), 0)  # starts the sequence over
    assert ctx.seq_len(0) == 0
    steps = np.stack([ctx.eval(np.array([t], np.int32), "last", 0) for t in c.tgt])
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-5)


def test_sequences_in_one_batch_equal_each_alone(seq2seq):
    c = seq2seq
    ctx = context(gguf_of(c.folder), n_seq=3)
    ctx.encode(np.array(c.src, np.int32), 0)
    ctx.encode(np.array(c.src2, np.int32), 1)
    out = ctx.decode(np.array(c.tgt + c.tgt2, np.int32), np.array([0] * len(c.tgt) + [1] * len(c.tgt2), np.int32))
    assert_close(out[:len(c.tgt)], ref_logits(c.hf, c.src, c.tgt))
    assert_close(out[len(c.tgt):], ref_logits(c.hf, c.src2, c.tgt2))
    ctx.seq_copy(1, 2)  # a copy shares the encoder's output
    assert_close(ctx.eval(np.array([40], np.int32), "last", 2), ref_logits(c.hf, c.src2, c.tgt2 + [40])[-1])
