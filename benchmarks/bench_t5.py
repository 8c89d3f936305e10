"""T5 encoder-decoder speed on the CPU (issue #18): pyengine F16 / Q8_0 / Q4_0 vs transformers (torch, float32)
and CTranslate2 int8, on random-weight models of two real shapes, same machine, same thread count.

Shapes (T5 v1.0: ReLU FFN, tied embeddings, 32 relative-position buckets):
  chatlm-mini-chinese  10 + 10 layers, d_model 768, d_ff 3072, 12 heads of 64, vocab 29298
  t5-base              12 + 12 layers, d_model 768, d_ff 3072, 12 heads of 64, vocab 32128
The weights are transformers' random initialisation (speed does not depend on the values). The tokenizer is
a T5-style SentencePiece unigram model trained on a few lines, then extended with synthetic pieces
("\u2581w00000", ...) to exactly the vocabulary size, so that the tokenizer, the embedding and CTranslate2's
vocabulary all have the same rows; no text is tokenized while timing (all engines get the same token ids).

Every engine gets the same inputs: random token ids (fixed seed) ending with </s>. What is timed, per engine:
  encode N     N input tokens / wall time of "encoder + first decoder step": the encoder over N tokens,
               the decoder's cross-attention keys/values of its output, one decoder step from the start
               token, the output layer and the argmax. (CTranslate2 has no encoder-only call in Python, so
               this is the one measure all three share: translate_batch with max_decoding_length=1;
               pyengine encode() + eval([start]); transformers encoder() + one decoder forward.) The
               encoder alone (pyengine: encode(), which also computes the cross-attention keys/values;
               transformers: model.encoder()) is in the JSON as encoder_only_*.
  greedy       64 / wall time of one whole greedy generation of exactly 64 new tokens after a 64-token input
               (token ids in, 64 token ids out; encoding the input included). EOS cannot end it early:
               CTranslate2 min_decoding_length = max_decoding_length = 64, transformers min_new_tokens =
               max_new_tokens = 64 (both mask </s> until then); pyengine ignore_eos=True (</s> may be
               picked and does not stop it).
  decode-only  63 / (greedy time - "encode 64" time): the 63 decoder steps after the first token.
  beam4        64 / wall time of one beam search with 4 beams: 64 = the tokens of the best hypothesis, which
               always has exactly 64 (every beam runs to the length limit, as in greedy; each step evaluates 4
               rows). pyengine: pyengine.beam.beam_search (LLM.beam_search's function, transformers' rules)
               with no end ids; transformers: generate(num_beams=4, min/max_new_tokens=64); CTranslate2:
               translate_batch(beam_size=4, min/max_decoding_length=64).
Each (shape, engine, threads) runs in a subprocess of its own (clean RSS, one thread pool); each measure is
one warm-up then the median of --reps runs. Reported with each: the subprocess's peak RSS (mapped weight pages
included), and "others' CPU", the share of the machine's CPU time that other processes took while it ran
(/proc/stat). On a shared machine a busy neighbour slows every measure: before each run the script waits (up to
--quiet-wait seconds) for a quiet machine, repeats a run that others disturbed by more than --max-others (up to
--retries times), and keeps the least disturbed attempt.

    python benchmarks/bench_t5.py [--threads 2] [--shapes chatlm-mini-chinese,t5-base]
                                  [--engines pyengine-f16,pyengine-q8_0,pyengine-q4_0,transformers,ct2-int8]
                                  [--reps 3] [--out benchmarks/results/t5.json]
                                  [--max-others 0.05] [--retries 2] [--quiet-wait 600] [--merge]
    python benchmarks/bench_t5.py --shapes tiny --threads 1 --quiet-wait 0 --retries 0 --out /tmp/t5-tiny.json
                                                                  # a quick check of the script (seconds)
    python benchmarks/bench_t5.py --shapes t5-base --engines ct2-int8 --threads 2 --merge   # redo one row

The models (HF folder, GGUF files, CTranslate2 folder) are written on first use to ~/.cache/pyengine/bench_t5/
(3.4 GB for both shapes) and reused. Prints a markdown table and writes benchmarks/results/t5.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CACHE = Path(os.environ.get("PYENGINE_BENCH_T5_CACHE", Path.home() / ".cache" / "pyengine" / "bench_t5"))

SHAPES = {
    "chatlm-mini-chinese": dict(num_layers=10, num_decoder_layers=10, d_model=768, d_ff=3072, num_heads=12, d_kv=64,
                                vocab_size=29298),
    "t5-base": dict(num_layers=12, num_decoder_layers=12, d_model=768, d_ff=3072, num_heads=12, d_kv=64,
                    vocab_size=32128),
    "tiny": dict(num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=1000),
}
PYENGINE_TYPES = {"pyengine-f16": "f16", "pyengine-q8_0": "q8_0", "pyengine-q4_0": "q4_0"}
ENGINES = [*PYENGINE_TYPES, "transformers", "ct2-int8"]
ENGINE_LABELS = {"pyengine-f16": "pyengine F16", "pyengine-q8_0": "pyengine Q8_0", "pyengine-q4_0": "pyengine Q4_0",
                 "transformers": "transformers f32", "ct2-int8": "CTranslate2 int8"}
ENCODE_LENGTHS = (256, 32)
N_INPUT, N_GEN, N_BEAMS = 64, 64, 4
PAD, EOS, UNK = 0, 1, 2  # T5's ids; the decoder starts from <pad>

TOKENIZER_CORPUS = """\
The quick brown fox jumps over the lazy dog. A converter turns a checkpoint into a single file.
translate English to German: The house is wonderful. summarize: a long text about llamas.
Der schnelle braune Fuchs springt über den faulen Hund. Le renard brun rapide saute par-dessus le chien.
我想在苹果公司工作。今天天气很好，我们去公园散步吧。中文文本测试，机器翻译。
Numbers: 1 12 123 1234 12345 3.14. Hello, world! How are you today? I'm fine, thanks.
"""


# --- the models ------------------------------------------------------------------------------------------

def make_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """spiece.model with exactly `vocab_size` pieces (<pad> </s> <unk> first, no BOS, NFKC as T5's) and
    transformers' T5 tokenizer files: a unigram model trained on a few lines, then synthetic pieces with
    scores below every trained one (they never win a segmentation of real text; their ids are valid)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5TokenizerFast

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS.splitlines() * 4), model_writer=buf, vocab_size=min(400, vocab_size),
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, pad_id=PAD, eos_id=EOS, unk_id=UNK,
        bos_id=-1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    have = {p.piece for p in proto.pieces}
    lowest = min(p.score for p in proto.pieces)
    i = 0
    while len(proto.pieces) < vocab_size:
        piece = f"\u2581w{i:05d}"
        i += 1
        if piece not in have:
            p = proto.pieces.add()
            p.piece, p.score = piece, lowest - 1.0 - 1e-3 * i
            p.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    (out_dir / "spiece.model").write_bytes(proto.SerializeToString())
    tok = T5TokenizerFast.from_pretrained(out_dir, extra_ids=0)
    if len(tok) != vocab_size:
        raise RuntimeError(f"the tokenizer has {len(tok)} tokens, not {vocab_size}")
    tok.save_pretrained(out_dir)


def make_hf_model(out_dir: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(**shape, feed_forward_proj="relu", tie_word_embeddings=True, relative_attention_num_buckets=32,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, dropout_rate=0.0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).eval().save_pretrained(out_dir)


def prepare(shape_name: str) -> dict:
    """The HF folder, the three GGUF files and the CTranslate2 folder of a shape, written once into CACHE."""
    d = CACHE / shape_name
    hf = d / "hf"
    info_path = d / "models.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if all(Path(p).exists() for p in info["paths"].values()):
            return info
    d.mkdir(parents=True, exist_ok=True)
    info = {"paths": {"transformers": str(hf)}, "conversions": {}}
    if not (hf / "model.safetensors").is_file():
        print(f"[{shape_name}] writing the random HF checkpoint ...", flush=True)
        tmp = d / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        make_tokenizer(tmp, SHAPES[shape_name]["vocab_size"])
        make_hf_model(tmp, SHAPES[shape_name])
        shutil.rmtree(hf, ignore_errors=True)
        tmp.rename(hf)
    sys.path.insert(0, str(HERE.parent / "tools"))
    from pyengine_convert import convert

    for engine, qtype in PYENGINE_TYPES.items():
        out = d / f"{shape_name}-{qtype}.gguf"
        print(f"[{shape_name}] pyengine convert --qtype {qtype} ...", flush=True)
        report = convert(hf, out, qtype=qtype)
        info["paths"][engine] = str(out)
        info["conversions"][engine] = {"qtype": report.qtype, "output_qtype": report.output_qtype,
                                       "file_size": report.file_size, "tensor_types": report.tensor_types,
                                       "seconds": round(report.seconds, 1)}
    import ctranslate2

    ct2 = d / "ct2-int8"
    print(f"[{shape_name}] CTranslate2 TransformersConverter(...).convert(quantization='int8') ...", flush=True)
    t0 = time.perf_counter()
    ctranslate2.converters.TransformersConverter(str(hf)).convert(str(ct2), quantization="int8", force=True)
    info["paths"]["ct2-int8"] = str(ct2)
    info["conversions"]["ct2-int8"] = {"quantization": "int8", "file_size": (ct2 / "model.bin").stat().st_size,
                                       "seconds": round(time.perf_counter() - t0, 1)}
    info["conversions"]["transformers"] = {"dtype": "float32",
                                           "file_size": (hf / "model.safetensors").stat().st_size}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def input_ids(n: int, vocab_size: int, seed: int) -> list[int]:
    """n token ids: random ordinary tokens, then </s> (as T5's tokenizer ends an input)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab_size, n - 1)] + [EOS]


# --- the engines (each runs in a worker subprocess) ---------------------------------------------------------

def so_sha256() -> str:
    """The first 16 hex digits of the sha256 of the pyengine._C build in use."""
    import hashlib

    from pyengine import _C

    return hashlib.sha256(Path(_C.__file__).read_bytes()).hexdigest()[:16]


class PyEngineRunner:
    def __init__(self, path: str, threads: int):
        import numpy as np

        import pyengine

        self.np = np
        self.llm = pyengine.LLM(path, n_ctx=512, n_threads=threads)
        self.start = self.llm.decoder_start_token_id
        self.tokenizer = self.llm.tokenizer  # built once per model, here: not part of any measure

    def encoder_only(self, ids: list[int]) -> None:
        self.llm.encode(ids)

    def first_token(self, ids: list[int]) -> int:
        self.llm.encode(ids)
        return int(self.np.argmax(self.llm.eval([self.start])))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        from pyengine.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        gen = self.llm.generate(ids, params=params, stream=True)
        gen.wait()
        return gen.token_ids

    def beam(self, ids: list[int], n: int, beams: int) -> list[int]:
        from pyengine.beam import beam_search

        # LLM.beam_search's call, with no end ids: every beam runs to max_new_tokens
        return beam_search(self.llm, [self.start], beams, n, (), encoder_input=ids)[0].token_ids


class TransformersRunner:
    def __init__(self, path: str, threads: int):
        import torch
        from transformers import T5ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def _ids(self, ids: list[int]):
        return self.torch.tensor([ids])

    def encoder_only(self, ids: list[int]) -> None:
        with self.torch.inference_mode():
            self.model.encoder(input_ids=self._ids(ids))

    def first_token(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            enc = self.model.encoder(input_ids=self._ids(ids))
            logits = self.model(encoder_outputs=enc, decoder_input_ids=self.torch.tensor([[PAD]])).logits
            return int(logits[0, -1].argmax())

    def _generate(self, ids: list[int], n: int, beams: int) -> list[int]:
        with self.torch.inference_mode():
            out = self.model.generate(self._ids(ids), max_new_tokens=n, min_new_tokens=n, num_beams=beams,
                                      do_sample=False)
        return out[0, 1:].tolist()  # without the decoder start token

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self._generate(ids, n, 1)

    def beam(self, ids: list[int], n: int, beams: int) -> list[int]:
        return self._generate(ids, n, beams)


class CT2Runner:
    def __init__(self, path: str, threads: int):
        import ctranslate2

        self.translator = ctranslate2.Translator(path, device="cpu", compute_type="int8", intra_threads=threads,
                                                 inter_threads=1)
        self.vocab = json.loads((Path(path) / "shared_vocabulary.json").read_text())
        self.index = {t: i for i, t in enumerate(self.vocab)}

    def _translate(self, ids: list[int], n: int, beams: int) -> list[int]:
        r = self.translator.translate_batch([[self.vocab[i] for i in ids]], beam_size=beams, num_hypotheses=1,
                                            min_decoding_length=n, max_decoding_length=n)
        return [self.index[t] for t in r[0].hypotheses[0]]

    encoder_only = None  # not exposed by ctranslate2.Translator

    def first_token(self, ids: list[int]) -> int:
        return self._translate(ids, 1, 1)[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self._translate(ids, n, 1)

    def beam(self, ids: list[int], n: int, beams: int) -> list[int]:
        return self._translate(ids, n, beams)


def timed(fn, reps: int) -> tuple[float, list[float], object]:
    """One warm-up call, then `reps` timed ones: (median seconds, all seconds, the last result)."""
    result = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def worker(engine: str, shape_name: str, path: str, threads: int, reps: int) -> dict:
    vocab_size = SHAPES[shape_name]["vocab_size"]
    t0 = time.perf_counter()
    runner = (PyEngineRunner if engine.startswith("pyengine") else
              TransformersRunner if engine == "transformers" else CT2Runner)(path, threads)
    out: dict = {"load_s": time.perf_counter() - t0}
    if engine.startswith("pyengine"):
        out["pyengine_C_sha256"] = so_sha256()
    for n in (*ENCODE_LENGTHS, N_INPUT):
        ids = input_ids(n, vocab_size, seed=n)
        med, times, _ = timed(lambda ids=ids: runner.first_token(ids), reps)
        out[f"encode_{n}"] = {"tokens_per_s": n / med, "seconds": times}
        if runner.encoder_only is not None and n in ENCODE_LENGTHS:
            med, times, _ = timed(lambda ids=ids: runner.encoder_only(ids), reps)
            out[f"encoder_only_{n}"] = {"tokens_per_s": n / med, "seconds": times}
    ids = input_ids(N_INPUT, vocab_size, seed=N_INPUT)
    med, times, tokens = timed(lambda: runner.greedy(ids, N_GEN), reps)
    if len(tokens) != N_GEN:
        raise RuntimeError(f"{engine}: greedy generated {len(tokens)} tokens, not {N_GEN}")
    out["greedy"] = {"tokens_per_s": N_GEN / med, "seconds": times, "tokens": tokens}
    first = statistics.median(out[f"encode_{N_INPUT}"]["seconds"])
    out["decode_only"] = {"tokens_per_s": (N_GEN - 1) / (med - first)}
    med, times, tokens = timed(lambda: runner.beam(ids, N_GEN, N_BEAMS), reps)
    if len(tokens) != N_GEN:
        raise RuntimeError(f"{engine}: the best beam has {len(tokens)} tokens, not {N_GEN}")
    out["beam4"] = {"tokens_per_s": N_GEN / med, "seconds": times, "tokens": tokens}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(engine: str, shape_name: str, path: str, threads: int, reps: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--shapes", shape_name, "--model", path,
           "--threads", str(threads), "--reps", str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    busy0, children0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"  {engine} failed on {shape_name}: {p.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # CPU time the rest of the machine took while the worker ran (a busy neighbour slows every measure)
    other = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - children0)
    result["wall_s"] = round(wall, 1)
    result["others_cpu_share"] = round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3)
    return result


def measure_row(engine: str, shape_name: str, path: str, threads: int, args) -> dict | None:
    """run_worker, again (up to --retries times, each after waiting for a quiet machine) while others took more
    than --max-others of the machine's CPU during the run; the attempt with the least interference is kept."""
    best, attempts = None, []
    for attempt in range(1 + args.retries):
        wait_for_quiet(args.max_others, args.quiet_wait)
        res = run_worker(engine, shape_name, path, threads, args.reps)
        if res is None:
            return best
        attempts.append(res["others_cpu_share"])
        if best is None or res["others_cpu_share"] < best["others_cpu_share"]:
            best = res
        if res["others_cpu_share"] <= args.max_others:
            break
        print(f"  others took {100 * res['others_cpu_share']:.0f}% of the CPU during the run", flush=True)
    best["others_cpu_share_attempts"] = attempts
    return best


def wait_for_quiet(max_share: float, limit_s: float, window_s: float = 3.0) -> float:
    """Wait (at most limit_s) until the machine was at most `max_share` busy over a window; returns the last share."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = busy_cpu_seconds(), time.monotonic()
        time.sleep(window_s)
        share = (busy_cpu_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if share <= max_share or time.monotonic() >= deadline:
            return share


def busy_cpu_seconds() -> float:
    """Non-idle CPU time of the whole machine since boot (/proc/stat), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- the report ----------------------------------------------------------------------------------------------

MEASURES = [(f"encode_{n}", f"encode {n}") for n in ENCODE_LENGTHS] + [
    ("greedy", f"greedy {N_GEN}"), ("decode_only", "decode-only"), ("beam4", f"beam{N_BEAMS} {N_GEN}")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | engine | threads | " + " | ".join(f"{label} tok/s" for _, label in MEASURES)
             + " | peak RSS MB | others' CPU |", "|---|---|---:|" + "---:|" * (len(MEASURES) + 2)]
    for r in rows:
        res = r["result"]
        cells = [f"{res[k]['tokens_per_s']:.1f}" if res else "n/a" for k, _ in MEASURES]
        rss = f"{res['peak_rss_mb']:.0f}" if res else "n/a"
        others = f"{100 * res['others_cpu_share']:.0f}%" if res and "others_cpu_share" in res else "n/a"
        lines.append(f"| {r['shape']} | {ENGINE_LABELS[r['engine']]} | {r['threads']} | " + " | ".join(cells)
                     + f" | {rss} | {others} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict], peer: str = "ct2-int8") -> str:
    """pyengine's tokens/s over the peer's, per measure (> 1: pyengine faster)."""
    by = {(r["shape"], r["engine"], r["threads"]): r["result"] for r in rows}
    lines = [f"| shape | pyengine / {ENGINE_LABELS[peer]} | threads | " + " | ".join(label for _, label in MEASURES)
             + " |", "|---|---|---:|" + "---:|" * len(MEASURES)]
    for (shape, engine, threads), res in by.items():
        base = by.get((shape, peer, threads))
        if not engine.startswith("pyengine") or not res or not base:
            continue
        cells = [f"{res[k]['tokens_per_s'] / base[k]['tokens_per_s']:.2f}" for k, _ in MEASURES]
        lines.append(f"| {shape} | {ENGINE_LABELS[engine]} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict:
    import ctranslate2
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=False).stdout.strip()
    from pyengine import _C

    return {"pyengine_commit": commit, "pyengine_C_sha256": so_sha256(), "pyengine_cpu_path": _C.cpu_path(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "ctranslate2": ctranslate2.__version__,
            "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--shapes", default="chatlm-mini-chinese,t5-base", help=", ".join(SHAPES))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--reps", type=int, default=3, help="timed runs per measure, after one warm-up (median)")
    ap.add_argument("--out", default=str(HERE / "results" / "t5.json"))
    ap.add_argument("--max-others", type=float, default=0.05,
                    help="a run during which other processes took more than this share of the machine's CPU is "
                         "repeated (default 0.05)")
    ap.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run (default 2)")
    ap.add_argument("--quiet-wait", type=float, default=600,
                    help="seconds to wait, before each run, for the machine to be quiet (default 600)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out that this run does not measure (rerun a few rows)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes, engines = args.shapes.split(","), args.engines.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    for name in shapes:
        if name not in SHAPES:
            ap.error(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    for name in engines:
        if name not in ENGINES:
            ap.error(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")

    if args.worker:
        print(json.dumps(worker(args.worker, shapes[0], args.model, threads[0], args.reps)))
        return 0

    models = {name: prepare(name) for name in shapes}
    shape_info = {name: {**SHAPES[name], "conversions": models[name]["conversions"]} for name in shapes}
    rows = []
    for t in threads:
        for name in shapes:
            for engine in engines:
                print(f"[{name}] {engine}, {t} thread(s) ...", flush=True)
                res = measure_row(engine, name, models[name]["paths"][engine], t, args)
                rows.append({"shape": name, "engine": engine, "threads": t, "time": time.strftime("%Y-%m-%d %H:%M"),
                             "result": res})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        measured = {(r["shape"], r["engine"], r["threads"]) for r in rows}
        rows = [r for r in old["rows"] if (r["shape"], r["engine"], r["threads"]) not in measured] + rows
        rows.sort(key=lambda r: (r["threads"], list(SHAPES).index(r["shape"]), ENGINES.index(r["engine"])))
        shape_info = {**old["shapes"], **shape_info}
    for r in rows:  # the same greedy tokens as transformers' float32? (a check that all run the same model)
        ref = next((x["result"] for x in rows if x["engine"] == "transformers" and x["shape"] == r["shape"]
                    and x["threads"] == r["threads"] and x["result"]), None)
        if r["result"] and ref:
            a, b = r["result"]["greedy"]["tokens"], ref["greedy"]["tokens"]
            r["result"]["greedy"]["same_prefix_as_transformers"] = next(
                (i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    from bench_batch import machine

    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "versions": versions(),
           "settings": {"threads": sorted({r["threads"] for r in rows}), "reps": args.reps,
                        "encode_lengths": list(ENCODE_LENGTHS), "n_input": N_INPUT, "n_gen": N_GEN,
                        "n_beams": N_BEAMS, "max_others": args.max_others, "retries": args.retries},
           "measures": {
               "encode_N": "N / seconds of encoder over N input tokens + cross-attention K/V + one decoder step "
                           "(start token) + output layer + argmax",
               "encoder_only_N": "N / seconds of the encoder alone (pyengine: encode(), which includes the "
                                 "cross-attention K/V; transformers: model.encoder()); CTranslate2: not exposed",
               "greedy": f"{N_GEN} / seconds of one greedy generation of exactly {N_GEN} tokens after a "
                         f"{N_INPUT}-token input, encoder included",
               "decode_only": f"{N_GEN - 1} / (greedy seconds - encode_{N_INPUT} seconds)",
               "beam4": f"{N_GEN} (tokens of the best hypothesis) / seconds of one beam search with {N_BEAMS} "
                        f"beams of exactly {N_GEN} tokens after a {N_INPUT}-token input, encoder included",
               "others_cpu_share": "share of the machine's CPU time other processes took while the row's "
                                   "subprocess ran (/proc/stat); the row is the least disturbed of its attempts"},
           "shapes": shape_info,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(markdown_table(rows))
    print()
    print(ratio_table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
