"""`LLM`: the front door. An `Engine` (model + context) plus text generation, chat and perplexity.

    llm = pyengine.LLM("model.gguf")
    llm.generate("Once upon a time", max_new_tokens=64, temperature=0.7, seed=1)    # -> str
    llm.generate(["Once upon a time", "The capital of France"], max_new_tokens=32)  # -> [str, str], one batch
    for piece in llm.chat([{"role": "user", "content": "Hi"}], stream=True): ...
    chat = llm.chat_session(system="Be brief.")                                     # keeps the KV cache
    print(chat.send("What is the capital of France?", stream=False).text)
    pyengine.LLM("all-MiniLM-L6-v2-f16.gguf").embed(["a sentence", "another"])       # -> float32 [2, 384]
"""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from ._C import UnsupportedModelError
from .engine import DEFAULT_SAMPLING, Engine, default_threads
from .generation import ChatSession, Generation, generate_batch

if TYPE_CHECKING:
    from .beam import BeamHypothesis
    from .quality import PerplexityResult
    from .sampling import SamplingParams

__all__ = ["LLM", "DEFAULT_SAMPLING", "default_threads"]


BEAM_ARGS = ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "num_return_sequences")


def _is_batch(prompt: Any) -> bool:
    """A list of prompts (texts or token-id lists), as opposed to one prompt given as token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)


class LLM(Engine):
    """A model and its inference context, with text in and text out. Arguments as `Engine`'s."""

    def _prompt_ids(self, prompt: str | Sequence[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return [int(t) for t in prompt]

    def generate(self, prompt: str | Sequence[int] | Sequence[str | Sequence[int]], *, stream: bool = False,
                 params: "SamplingParams | Sequence[SamplingParams] | None" = None, add_special_tokens: bool = True,
                 **sampling: Any) -> "str | Generation | list[str] | Iterator[tuple[int, str]]":
        """Continue `prompt` (text, or token ids) as a raw completion, without a chat template.

        Keyword arguments are the sampling settings of `sampling_params` (max_new_tokens,
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        seed, stop, min_length, min_new_tokens, ...); what is not given comes from the model (`sampling_defaults`):
        min_length (transformers': the end ids are suppressed while prompt + generated tokens are fewer; an
        encoder-decoder's prompt is its decoder start token) is the generation config's (BART-large-cnn: 56).
        Returns the generated text; with ``stream=True`` a `Generation`: iterate it for text pieces,
        then read its `text` and `stats`. Each call evaluates its prompt from scratch, so equal
        arguments and seed give equal text. `add_special_tokens` adds BOS where the model wants one.

        A list of prompts runs as one batch (every step one forward pass for all of them, as vLLM's
        `LLM.generate`) and returns the list of texts in order; `params` may then be a list with one
        `SamplingParams` per prompt (each with its own seed), and ``stream=True`` yields
        (prompt index, text piece) pairs. Each prompt's text is the one it gives alone.

        ``num_beams > 1`` runs beam search instead (see `beam_search`; transformers' arguments
        length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences); it returns the
        best text, or a list of `num_return_sequences` texts.
        """
        beam = {k: sampling.pop(k) for k in BEAM_ARGS if k in sampling}
        if beam.get("num_beams", 1) > 1:
            if stream or _is_batch(prompt):
                raise ValueError("beam search takes one prompt and does not stream")
            n_return = beam.get("num_return_sequences", 1)
            hyps = self.beam_search(prompt, add_special_tokens=add_special_tokens,
                                    max_new_tokens=sampling.get("max_new_tokens"),
                                    forced_bos_token_id=sampling.get("forced_bos_token_id"),
                                    forced_eos_token_id=sampling.get("forced_eos_token_id"),
                                    min_length=sampling.get("min_length"), min_new_tokens=sampling.get("min_new_tokens"),
                                    **beam)
            texts = [self.tokenizer.decode([t for t in h.token_ids if t not in self.tokenizer.eog_ids],
                                           skip_special_tokens=True) for h in hyps]
            return texts if n_return > 1 else texts[0]
        if _is_batch(prompt):
            return self._generate_many(list(prompt), stream, params, add_special_tokens, sampling)
        ids = self._prompt_ids(prompt, add_special_tokens)
        if self.is_encoder_decoder:  # text-to-text: the prompt is the encoder's input
            self.encode(ids)
            ids = [self.decoder_start_token_id]
        generation = Generation(self, self.tokenizer, ids, self.sampling_params(params, **sampling))
        return generation if stream else generation.wait()

    def _generate_many(self, prompts: list, stream: bool, params: Any, add_special_tokens: bool,
                       sampling: dict[str, Any]) -> "list[str] | Iterator[tuple[int, str]]":
        per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} parameter sets for {len(prompts)} prompts")
        tok = self.tokenizer
        ids = [self._prompt_ids(p, add_special_tokens) for p in prompts]
        encoder_inputs = None
        if self.is_encoder_decoder:  # text-to-text: each prompt is its sequence's encoder input
            encoder_inputs, ids = ids, [[self.decoder_start_token_id]] * len(ids)
        gens = [Generation(self, tok, p, self.sampling_params(ps, **sampling)) for p, ps in zip(ids, per_prompt)]
        # A context with a sequence per prompt, sized for what they can use, sharing this one's threads.
        need = max(len(g.prompt_ids) + max(g.params.max_new_tokens, 0) for g in gens)
        need = max([need] + [len(x) for x in encoder_inputs or ()])
        engine = self.new_context(n_ctx=max(1, min(self.n_ctx, need)), n_seq_max=len(gens))
        pieces = generate_batch(engine, gens, encoder_inputs)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return [g.text for g in gens]

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             params: "SamplingParams | None" = None, **sampling: Any) -> "str | Generation":
        """The assistant's reply to `messages` ([{"role": "system" | "user" | "assistant", "content": ...}]),
        rendered with the model's chat template.

        Sampling keyword arguments and `stream` are as in `generate`. Stateless: for a conversation
        that reuses the KV cache from turn to turn, use `chat_session`.
        """
        text = self.chat_template.render(list(messages), add_generation_prompt=True)
        # As transformers' apply_chat_template: the template writes BOS itself where the model wants one.
        return self.generate(text, stream=stream, params=params, add_special_tokens=False, **sampling)

    def embed(self, inputs: "str | Sequence[str] | Sequence[Sequence[int]]", normalize: bool | None = None) -> np.ndarray:
        """Sentence embeddings, float32 [n, dim]: texts are tokenized with the model's special tokens
        ([CLS] ... [SEP] for BERT) and pooled as `Engine.embed` says (a single text gives one row)."""
        return super().embed(self._embed_ids(inputs), normalize=normalize)

    def beam_search(self, prompt: str | Sequence[int], num_beams: int = 4, max_new_tokens: int | None = None,
                    length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                    num_return_sequences: int = 1, add_special_tokens: bool = True,
                    forced_bos_token_id: int | None = None, forced_eos_token_id: int | None = None,
                    min_length: int | None = None, min_new_tokens: int | None = None,
                    ) -> "list[BeamHypothesis]":
        """Beam search with transformers' rules (token for token equal to its ``generate(num_beams=...)``
        with the same arguments): the `num_return_sequences` best hypotheses (token ids, score), best first.
        The beams are sequences of one context whose KV cache pages they share until they diverge.
        forced_bos_token_id / forced_eos_token_id and min_length / min_new_tokens (end ids suppressed until then, as
        transformers' MinLength / MinNewTokensLengthLogitsProcessor) default to the model's (its generation config;
        BART, mBART: forced tokens; BART-large-cnn: min_length 56)."""
        from .beam import beam_search

        ids = self._prompt_ids(prompt, add_special_tokens)
        if max_new_tokens is None:
            max_new_tokens = self.sampling_params().max_new_tokens
        encoder_input = None
        if self.is_encoder_decoder:  # the prompt is the encoder's input; the beams start from the start token
            encoder_input, ids = ids, [self.decoder_start_token_id]
        defaults = self.sampling_params(forced_bos_token_id=forced_bos_token_id,
                                        forced_eos_token_id=forced_eos_token_id, min_length=min_length,
                                        min_new_tokens=min_new_tokens)
        return beam_search(self, ids, num_beams, max_new_tokens, self.tokenizer.eog_ids, length_penalty,
                           early_stopping, no_repeat_ngram_size, num_return_sequences, encoder_input,
                           defaults.forced_bos_token_id, defaults.forced_eos_token_id, defaults.min_length,
                           defaults.min_new_tokens)

    @property
    def labels(self) -> list[str]:
        """Class names of a sequence-classification model (`bert.classifier.output_labels`), else []."""
        return list(self.metadata.get(f"{self.config['arch']}.classifier.output_labels", []))

    def classify(self, inputs: "str | Sequence[str] | Sequence[Sequence[int]]") -> np.ndarray:
        """Class logits, float32 [n, len(labels)], of a `BertForSequenceClassification` file: as
        transformers, tanh(pooler(h[CLS])) then the classifier, on the encoder's final hidden states.
        The two small head matrices run in numpy (dequantized once); the encoder runs in the engine."""
        if self.config.get("pooling") != "rank" or "cls.output.weight" not in self._classifier_head:
            raise UnsupportedModelError(f"{self.model_path}: not a sequence-classification model "
                                        "(no cls.output.weight / rank pooling)")
        head = self._classifier_head
        cls_rows = super().embed(self._embed_ids(inputs), normalize=False)  # rank pooling: the [CLS] rows
        pooled = np.tanh(cls_rows @ head["cls.weight"].T + head["cls.bias"]) if "cls.weight" in head else cls_rows
        return (pooled @ head["cls.output.weight"].T + head.get("cls.output.bias", 0.0)).astype(np.float32)

    @cached_property
    def _classifier_head(self) -> dict[str, np.ndarray]:
        from . import _C

        out = {}
        for t in self._model.file.tensors:
            if t["name"] in ("cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias"):
                shape = t["shape"]
                rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                m = _C.dequantize(self._model.file.tensor_bytes(t["name"]), t["type"], rows, int(shape[0]))
                out[t["name"]] = m if len(shape) > 1 else m[0]
        return out

    def _embed_ids(self, inputs) -> list[list[int]]:
        """Texts (one, or a list) or token-id lists as token ids, texts with the model's special tokens."""
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        return [self._prompt_ids(x, add_special_tokens=True) for x in items]

    def perplexity(self, text: str, n_ctx: int = 512, n_chunks: int | None = None) -> "PerplexityResult":
        """Perplexity of ``text`` with llama-perplexity's protocol (chunks of ``n_ctx`` tokens, second
        half of each scored); ``.ppl`` and ``.uncertainty`` on the result. See pyengine.quality."""
        from .quality import perplexity

        return perplexity(self, text, n_ctx=n_ctx, n_chunks=n_chunks)

    def chat_session(self, system: str | None = None, *, params: "SamplingParams | None" = None,
                     **sampling: Any) -> ChatSession:
        """A stateful conversation on this model's context: `session.send(text)` returns the reply's
        `Generation`, and each turn evaluates only the tokens the KV cache does not hold yet.

        `system` is the system prompt (None: the template's default, if it has one). Sampling
        keyword arguments are as in `generate`; `send` can override them per turn with a
        `SamplingParams` (see `sampling_params`).
        """
        return ChatSession(self, self.tokenizer, self.chat_template, system, self.sampling_params(params, **sampling))
