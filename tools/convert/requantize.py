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

Streaming: the input is memory-mapped and one tensor at a time is dequantized (float32), so peak
memory is the mapping plus about one tensor. The output is written under a temporary name and renamed.
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
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from . import quants
from .errors import ConversionError
from .imatrix_file import load_imatrix
from .presets import FLOAT_TYPES, PRESETS, ModelInfo, mixed_type, tensor_type
from .progress import Progress

Q = GGMLQuantizationType
_SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


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


def _field_value(f):
    vtype = f.types[0]
    sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
    return f.contents(), vtype, sub


def _to_float(t, name: str) -> np.ndarray:
    """A reader tensor as float32 (rows, cols), dequantized by the engine."""
    from pyengine import _C

    cols = int(t.shape[0])
    rows = int(np.prod([int(d) for d in t.shape[1:]], dtype=np.int64)) if len(t.shape) > 1 else 1
    try:
        return _C.dequantize(np.asarray(t.data).reshape(-1).view(np.uint8), int(t.tensor_type), rows, cols)
    except Exception as e:  # noqa: BLE001 - name the tensor whatever the engine raised
        raise ConversionError(f"tensor {name} ({t.tensor_type.name}): cannot dequantize: {e}") from None


def _feedback(x, qtype, cov, name, imp, n_threads):
    from .calibrate import quantize_feedback

    return quantize_feedback(x, int(qtype), cov, name, importance=imp, n_threads=n_threads)


def requantize(in_path: str | os.PathLike, out_path: str | os.PathLike, qtype: str, *,
               imatrix: str | os.PathLike | dict[str, np.ndarray] | None = None, allow_requantize: bool = False,
               output_qtype: str | None = None, n_threads: int = 0, progress: bool = False,
               calibration: str | os.PathLike | None = None, method: str | None = None,
               calibration_chunks: int | None = None) -> QuantizeReport:
    """Requantize a GGUF file to preset `qtype` (q4_0, q4_k_m, ... see presets.PRESETS).

    imatrix: a llama.cpp imatrix file (GGUF or legacy .dat) or {tensor name: per-column importance}.
    allow_requantize: accept a source whose weights are already quantized (quality loss: the error of
        the source's quantization stays and the new one adds to it).
    output_qtype: force the type of output.weight (and token_embd when tied), e.g. "q8_0".
    calibration: a text file (or a calibrate.Covariances) for the error-feedback method;
        calibration_chunks: how many 512-token chunks of it to run (default: all).
    method: "feedback" (default with a calibration text) or "ggml" (llama-quantize's bytes; the default
        without one).
    Raises ConversionError naming the file or tensor on bad input; leaves no OUT on failure.
    """
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
    try:
        reader = GGUFReader(in_path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct errors on non-GGUF input
        raise ConversionError(f"cannot read {in_path} as GGUF: {e}") from None
    fields = reader.fields
    if "general.architecture" not in fields:
        raise ConversionError(f"{in_path}: no general.architecture (not a model file)")
    arch = str(fields["general.architecture"].contents())

    def meta(key: str, default=None):
        f = fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else default

    n_layer = meta("block_count")
    if n_layer is None:
        raise ConversionError(f"{in_path}: no {arch}.block_count")
    n_head = meta("attention.head_count", 1)
    n_head_kv = meta("attention.head_count_kv", n_head)
    n_head = n_head[0] if isinstance(n_head, list) else n_head
    n_head_kv = n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv
    names = {t.name for t in reader.tensors}

    importance: dict[str, np.ndarray] = {}
    if isinstance(imatrix, dict):
        importance = {k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()}
    elif imatrix is not None:
        importance = load_imatrix(imatrix).importance()
    info = ModelInfo(n_layer=int(n_layer), n_gqa=max(1, int(n_head) // max(1, int(n_head_kv))),
                     tied="output.weight" not in names, has_imatrix=bool(importance) or method == "feedback",
                     n_expert=int(meta("expert_count", 0) or 0))

    warnings: list[str] = []
    quantized_src = sorted({t.tensor_type.name for t in reader.tensors
                            if len(t.shape) >= 2 and t.tensor_type not in FLOAT_TYPES})
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
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))          # numpy order, columns last
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
            plan.append((t, shape, new))
        else:
            plan.append((t, shape, None))                           # copied as is
    if fallbacks:
        what = ", ".join(f"{n} {k}" for k, n in sorted(fallbacks.items()))
        warnings.append(f"rows not a multiple of 256: tensors fell back to 32-element types as llama.cpp does ({what})")
    if missing_imatrix:
        warnings.append(f"{len(missing_imatrix)} tensors have no imatrix entry and are quantized without one "
                        f"(first: {missing_imatrix[0]})")

    cov = None
    if method == "feedback":
        from .calibrate import Covariances, collect_covariances, load_text

        cov = calibration if isinstance(calibration, Covariances) else collect_covariances(
            in_path, load_text(calibration), n_chunks=calibration_chunks, n_threads=n_threads or None,
            progress=progress)

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
        os.close(fd)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    tmp = Path(tmp_name)
    w = GGUFWriter(tmp, arch)
    total = sum(int(t.n_bytes) for t, _, _ in plan)
    bar = Progress(total, len(plan), enabled=progress)
    types: dict[str, int] = {}
    try:
        for key, f in fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS:
                continue
            val, vtype, sub = _field_value(f)
            w.add_key_value(key, val, vtype, sub_type=sub)
        w.add_file_type(int(preset.file_type))
        w.add_quantization_version(GGML_QUANT_VERSION)
        for t, shape, new in plan:
            qt = new if new is not None else t.tensor_type
            nbytes = int(t.n_bytes) if new is None else quants.nbytes(qt, shape)
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
            types[qt.name] = types.get(qt.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, shape, new in plan:
            if new is None:
                data = np.asarray(t.data)
            else:
                x = _to_float(t, t.name)
                imp = importance.get(t.name)
                if imp is not None and imp.size != shape[-1]:
                    raise ConversionError(f"imatrix entry for {t.name} has {imp.size} values, the tensor "
                                          f"{shape[-1]} columns")
                if new in FLOAT_TYPES:
                    data = quants.quantize(x, new)
                elif cov is not None and (data := _feedback(x, new, cov, t.name, imp, n_threads)) is not None:
                    pass
                else:
                    from pyengine import _C

                    data = _C.quantize(x, int(new), imp, n_threads=n_threads, name=t.name)
                data = data.reshape(*shape[:-1], -1)
            w.write_tensor_data(data)
            bar.update(t.name, int(t.n_bytes))
        w.close()
        bar.close()
        os.replace(tmp, out_path)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    n_params = int(sum(int(np.prod(s)) for _, s, _ in plan))
    return QuantizeReport(out_path, preset.name.upper(), len(plan), n_params, in_path.stat().st_size,
                          out_path.stat().st_size, time.perf_counter() - start, types, warnings)


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
                            method=args.method, calibration_chunks=args.calibration_chunks)
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
