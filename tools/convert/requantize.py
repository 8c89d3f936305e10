"""`pyengine quantize IN.gguf OUT.gguf TYPE`: GGUF -> GGUF requantization, as llama-quantize does.

Metadata (tokenizer, chat template, hyper-parameters) is copied key by key; general.file_type and
general.quantization_version are set for the new file. Each tensor gets the type llama.cpp's rules give
it for the preset (presets.py), is dequantized by the engine (_C.dequantize), and quantized by the
engine's C++ quantizers (ggml's, byte-equal; importance-weighted with an imatrix). Tensors whose type
does not change, and those llama.cpp never quantizes (norms, biases), are copied byte for byte.

Methods: "ggml" gives llama-quantize's bytes (with --imatrix, its imatrix-weighted ones). "feedback" (the
default when a calibration text is given) runs the input model over the text with the engine, collects
each linear layer's input covariance X^T X, and quantizes each row column by column: ggml's imatrix
search picks each block's scales on the weights as the earlier columns left them, and every column's
rounding error is pushed onto the row's later columns (GPTQ's error feedback; calibrate.py,
csrc/cpu/quant_search.h). Same tensor types and file size as "ggml" with an imatrix, standard blocks any
GGUF reader dequantizes, and a lower output error on the calibration text (never higher, row by row).
Tensors no linear layer reads in the calibration run (token_embd, an untied output) use ggml's method.

Streaming: metadata entries are copied as raw bytes (gguf_stream.py); tensor data is read in slabs of
rows (SLAB_BYTES) with pread, converted and quantized by `_C.quantize_raw` on every thread (each thread
turns its own few rows to float32), and written at once, so peak memory is two slab buffers above the
interpreter whatever the model's size (no mapping of the input stays resident). The output is written
under a temporary name and renamed.
The feedback method reads a tensor it has a covariance for whole (one tensor above the slabs).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType

from . import quants
from .calibrate import Covariances
from .errors import ConversionError
from .gguf_stream import GGUFHeader, GGUFStreamWriter, kv_entry, read_into
from .imatrix_file import load_imatrix
from .presets import FLOAT_TYPES, PRESETS, ModelInfo, mixed_type, tensor_type
from .progress import Progress

Q = GGMLQuantizationType


@dataclass
class QuantizeReport:
    out_path: Path
    preset: str
    n_tensors: int
    n_params: int
    in_size: int
    file_size: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.file_size * 8 / self.n_params if self.n_params else 0.0

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return (f"wrote {self.out_path}: {self.file_size / 1e6:.1f} MB (from {self.in_size / 1e6:.1f} MB), "
                f"{self.n_tensors} tensors ({types}), {self.bits_per_weight:.2f} bits/weight, {self.seconds:.1f} s")


# Rows are read, converted and written in slabs of at most this many source bytes, so that memory stays
# at two slab buffers (source and output) whatever the size of a tensor or of the model.
SLAB_BYTES = 16 << 20


def _importance_for(name: str, imp: np.ndarray | None, dims: tuple[int, ...]) -> tuple[np.ndarray | None, int]:
    """The imatrix entry of a tensor checked against its shape, and the rows per expert (3-D expert
    tensors: one vector per expert, as llama-imatrix stores them)."""
    if imp is None:
        return None, 0
    cols, rows_per_matrix = dims[0], dims[1] if len(dims) > 1 else 1
    n_mat = int(np.prod(dims[2:], dtype=np.int64)) if len(dims) > 2 else 1
    if imp.ndim == 1 and n_mat > 1 and imp.size == n_mat * cols:    # a legacy .dat file's experts
        imp = imp.reshape(n_mat, cols)
    if imp.shape[-1] != cols:
        raise ConversionError(f"imatrix entry for {name} has {imp.shape[-1]} values per matrix, the tensor {cols} "
                              "columns")
    if imp.ndim == 2 and imp.shape[0] == 1:
        imp = imp[0]
    if imp.ndim == 2 and imp.shape[0] != n_mat:
        raise ConversionError(f"imatrix entry for {name} has {imp.shape[0]} matrices, the tensor {n_mat}")
    return np.ascontiguousarray(imp, dtype=np.float32), rows_per_matrix


def _feedback(x, qtype, cov, name, imp, n_threads):
    from .calibrate import quantize_feedback

    return quantize_feedback(x, int(qtype), cov, name, importance=imp, n_threads=n_threads)


def requantize(in_path: str | os.PathLike, out_path: str | os.PathLike, qtype: str, *,
               imatrix: str | os.PathLike | dict[str, np.ndarray] | None = None, allow_requantize: bool = False,
               output_qtype: str | None = None, n_threads: int = 0, progress: bool = False,
               calibration: str | os.PathLike | None = None, method: str | None = None,
               calibration_chunks: int | None = None, calibration_memory: int | None = None) -> QuantizeReport:
    """Requantize a GGUF file to preset `qtype` (q4_0, q4_k_m, ... see presets.PRESETS).

    imatrix: a llama.cpp imatrix file (GGUF or legacy .dat) or {tensor name: per-column importance, or
        (n_expert, n_cols) for 3-D expert tensors}.
    allow_requantize: accept a source whose weights are already quantized (quality loss: the error of
        the source's quantization stays and the new one adds to it).
    output_qtype: force the type of output.weight (and token_embd when tied), e.g. "q8_0".
    calibration: a text file (or a calibrate.Covariances) for the error-feedback method;
        calibration_chunks: how many 512-token chunks of it to run (default: all).
    calibration_memory: bytes of X^T X matrices held at once while running the text (default: the largest
        tensor's size in float32; the blocks are then covered in groups, one pass over the text each, the
        matrices kept on disk until used); 0: all at once, one pass (faster, more memory).
    method: "feedback" (default with a calibration text) or "ggml" (llama-quantize's bytes; the default
        without one).
    Raises ConversionError naming the file or tensor on bad input; leaves no OUT on failure.
    """
    from pyengine import _C

    start = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    preset = PRESETS.get(str(qtype).lower())
    if preset is None:
        raise ConversionError(f"unknown type {qtype!r} (choose from {', '.join(PRESETS)})")
    forced_output = None
    if output_qtype is not None:
        from .convert import OUTPUT_QTYPES, parse_qtype

        forced_output = parse_qtype(output_qtype, "output qtype", OUTPUT_QTYPES)
    method = method or ("feedback" if calibration is not None else "ggml")
    if method not in ("ggml", "feedback"):
        raise ConversionError(f"unknown method {method!r} (choose ggml or feedback)")
    if method == "feedback" and calibration is None:
        raise ConversionError("the feedback method needs a calibration text (--calibration TEXT)")
    if method == "ggml" and calibration is not None:
        raise ConversionError("--method ggml does not use a calibration text: drop --calibration (or use "
                              "--imatrix for llama-quantize's imatrix-weighted bytes)")
    if not in_path.is_file():
        raise ConversionError(f"input file not found: {in_path}")
    if in_path.resolve() == out_path.resolve():
        raise ConversionError(f"output {out_path} is the input file")
    if not out_path.parent.resolve().is_dir():
        raise ConversionError(f"output folder does not exist: {out_path.parent}")
    header = GGUFHeader(in_path)
    arch = header.value("general.architecture")
    if not isinstance(arch, str):
        raise ConversionError(f"{in_path}: no general.architecture (not a model file)")

    def meta(key: str, default=None):
        return header.value(f"{arch}.{key}", default)

    n_layer = meta("block_count")
    if n_layer is None:
        raise ConversionError(f"{in_path}: no {arch}.block_count")
    n_head = meta("attention.head_count", 1)
    n_head_kv = meta("attention.head_count_kv", n_head)
    n_head = n_head[0] if isinstance(n_head, list) else n_head
    n_head_kv = n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv
    names = {t.name for t in header.tensors}

    importance: dict[str, np.ndarray] = {}
    if isinstance(imatrix, dict):
        importance = {k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()}
    elif imatrix is not None:
        importance = load_imatrix(imatrix).importance()
    info = ModelInfo(n_layer=int(n_layer), n_gqa=max(1, int(n_head) // max(1, int(n_head_kv))),
                     tied="output.weight" not in names, has_imatrix=bool(importance) or method == "feedback",
                     n_expert=int(meta("expert_count", 0) or 0))

    warnings: list[str] = []
    quantized_src = sorted({t.tensor_type.name for t in header.tensors
                            if len(t.dims) >= 2 and t.tensor_type not in FLOAT_TYPES})
    if quantized_src:
        if not allow_requantize:
            raise ConversionError(f"{in_path} is already quantized ({', '.join(quantized_src)} tensors): requantizing "
                                  "adds a second quantization error to the first; start from an F32/F16/BF16 file "
                                  "or pass --allow-requantize")
        warnings.append(f"requantizing from {', '.join(quantized_src)}: quality is lower than quantizing the "
                        "original F16/F32 weights")

    plan = []
    fallbacks: dict[str, int] = {}
    missing_imatrix = []
    for t in header.tensors:
        shape = t.shape                                              # numpy order, columns last
        new = tensor_type(preset, t.name, shape, info)
        is_output = t.name == "output.weight" or (info.tied and t.name == "token_embd.weight")
        if new is not None and forced_output is not None and is_output:
            new = forced_output
        if new is not None and new != t.tensor_type:
            wanted = mixed_type(preset, t.name, shape[-1], info) if preset.base not in FLOAT_TYPES else new
            if new != wanted and not (forced_output is not None and is_output):
                key = f"{wanted.name}->{new.name}"
                fallbacks[key] = fallbacks.get(key, 0) + 1
            if quants.is_quantized(new) and not quants.can_quantize(shape, new):
                raise ConversionError(f"tensor {t.name}: {shape[-1]} columns do not fit {new.name} blocks")
            if importance and quants.is_quantized(new) and t.name not in importance and new != Q.Q8_0:
                missing_imatrix.append(t.name)
            plan.append((t, new))
        else:
            plan.append((t, None))                                   # copied as is
    if fallbacks:
        what = ", ".join(f"{n} {k}" for k, n in sorted(fallbacks.items()))
        warnings.append(f"rows not a multiple of 256: tensors fell back to 32-element types as llama.cpp does ({what})")
    if missing_imatrix:
        warnings.append(f"{len(missing_imatrix)} tensors have no imatrix entry and are quantized without one "
                        f"(first: {missing_imatrix[0]})")

    cov = None
    own_cov = not isinstance(calibration, Covariances)
    if method == "feedback":
        from .calibrate import collect_covariances, load_text

        if calibration_memory is not None and calibration_memory < 0:
            raise ConversionError(f"calibration memory of {calibration_memory} bytes: give 0 (no limit) or more")
        if calibration_memory is None:  # one tensor's worth of floats
            calibration_memory = max(4 * t.n_elements for t, _ in plan)
        cov = calibration if not own_cov else collect_covariances(
            in_path, load_text(calibration), n_chunks=calibration_chunks, n_threads=n_threads or None,
            progress=progress, max_bytes=calibration_memory or None)

    # metadata: every entry of the input as its bytes, with the new file type and quantization version
    new_kv = {"general.file_type": kv_entry("general.file_type", GGUFValueType.UINT32, int(preset.file_type)),
              "general.quantization_version": kv_entry("general.quantization_version", GGUFValueType.UINT32,
                                                       GGML_QUANT_VERSION)}
    kv = [new_kv.pop(k, raw) for k, raw in header.kv_raw.items()] + list(new_kv.values())
    out_infos = []
    types: dict[str, int] = {}
    for t, new in plan:
        qt = new if new is not None else t.tensor_type
        out_infos.append((t.name, t.dims, qt, t.n_bytes if new is None else quants.nbytes(qt, t.shape)))
        types[qt.name] = types.get(qt.name, 0) + 1

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
        os.close(fd)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    tmp = Path(tmp_name)
    bar = Progress(sum(t.n_bytes for t, _ in plan), len(plan), enabled=progress)
    src_buf = np.empty(0, dtype=np.uint8)
    out_buf = np.empty(0, dtype=np.uint8)
    try:
        with open(in_path, "rb") as fin, open(tmp, "wb") as fout:
            w = GGUFStreamWriter(fout, kv, out_infos, header.alignment)
            for t, new in plan:
                w.begin_tensor()
                imp, rows_per_matrix = (None, 0) if new is None else _importance_for(
                    t.name, importance.get(t.name), t.dims)
                if new is not None and new not in FLOAT_TYPES and cov is not None and t.name in cov:
                    src = np.empty(t.n_bytes, dtype=np.uint8)  # error feedback: the whole tensor at once
                    read_into(fin.fileno(), t.offset, memoryview(src))
                    data = _feedback(_to_float(src, t, t.rows), new, cov, t.name, imp, n_threads)
                    del src
                    if own_cov:  # a caller's Covariances may serve another call
                        cov.release(t.name)
                    if data is not None:
                        w.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                        bar.update(t.name, t.n_bytes, tensor_done=True)
                        continue
                slab_rows = max(1, SLAB_BYTES // max(t.row_bytes, 1))
                for r0 in range(0, t.rows, slab_rows):
                    n = min(slab_rows, t.rows - r0)
                    n_src = n * t.row_bytes
                    if src_buf.size < n_src:
                        src_buf = np.empty(n_src, dtype=np.uint8)
                    src = src_buf[:n_src]
                    read_into(fin.fileno(), t.offset + r0 * t.row_bytes, memoryview(src))
                    if new is None:
                        w.write(src)
                    elif new in FLOAT_TYPES:
                        w.write(quants.quantize(_to_float(src, t, n), new))
                    else:
                        n_out = n * quants.nbytes(new, (t.cols,))
                        if out_buf.size < n_out:
                            out_buf = np.empty(n_out, dtype=np.uint8)
                        try:
                            done = _C.quantize_raw(src, int(t.tensor_type), n, t.cols, int(new), out_buf, imp,
                                                   rows_per_matrix, r0, n_threads=n_threads, name=t.name)
                        except Exception as e:  # noqa: BLE001 - name the tensor whatever the engine raised
                            raise ConversionError(f"tensor {t.name} ({t.tensor_type.name} -> {new.name}): {e}") from None
                        w.write(out_buf[:done])
                    bar.update(t.name, n_src, tensor_done=r0 + n == t.rows)
            w.finish()
        bar.close()
        os.replace(tmp, out_path)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if cov is not None and own_cov:
            cov.close()
    n_params = int(sum(t.n_elements for t, _ in plan))
    return QuantizeReport(out_path, preset.name.upper(), len(plan), n_params, in_path.stat().st_size,
                          out_path.stat().st_size, time.perf_counter() - start, types, warnings)


def _to_float(src: np.ndarray, t, rows: int) -> np.ndarray:
    """Rows of a tensor as float32 (rows, cols), dequantized by the engine."""
    from pyengine import _C

    try:
        return _C.dequantize(src, int(t.tensor_type), rows, t.cols)
    except Exception as e:  # noqa: BLE001 - name the tensor whatever the engine raised
        raise ConversionError(f"tensor {t.name} ({t.tensor_type.name}): cannot dequantize: {e}") from None


def build_parser(prog: str = "pyengine quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Requantize a GGUF file (llama-quantize's type mixes).")
    p.add_argument("input", metavar="IN.gguf")
    p.add_argument("output", metavar="OUT.gguf")
    p.add_argument("type", metavar="TYPE", type=str.lower, choices=list(PRESETS),
                   help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama-imatrix / pyengine imatrix GGUF, or legacy .dat)")
    p.add_argument("--calibration", metavar="TEXT", default=None,
                   help="calibration text: run IN over it and quantize with error feedback over each layer's "
                        "input covariance (lower error than llama-quantize's at the same size; same block types)")
    p.add_argument("--calibration-chunks", type=int, default=None, metavar="N",
                   help="512-token chunks of the calibration text to run (default: all)")
    p.add_argument("--calibration-memory", type=float, default=None, metavar="MIB",
                   help="MiB of the layers' X^T X matrices held at once while running the calibration text "
                        "(default: the largest tensor's size in float32; the blocks are covered in groups, one "
                        "pass over the text each); 0: all at once, one pass (faster, more memory)")
    p.add_argument("--method", choices=("feedback", "ggml"), default=None,
                   help="feedback (default with --calibration) or ggml (llama-quantize's exact bytes)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept an already-quantized source (lower quality than quantizing F16/F32)")
    p.add_argument("--output-qtype", default=None, metavar="TYPE", help="type of output.weight, e.g. q8_0")
    p.add_argument("-t", "--threads", type=int, default=0, help="threads (default: physical cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = requantize(args.input, args.output, args.type, imatrix=args.imatrix,
                            allow_requantize=args.allow_requantize, output_qtype=args.output_qtype,
                            n_threads=args.threads, progress=not args.quiet, calibration=args.calibration,
                            method=args.method, calibration_chunks=args.calibration_chunks,
                            calibration_memory=None if args.calibration_memory is None
                            else int(args.calibration_memory * 2**20))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for msg in report.warnings:
        print(f"warning: {msg}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
