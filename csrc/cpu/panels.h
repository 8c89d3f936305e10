// The panel layout: quantized weights repacked once, at load, into the order the SIMD kernels read.
//
// The kernels work on panels of R rows (16 with AVX-512, 8 with AVX2): one vector holds the same four
// bytes of each of the R rows. Read from the file's row-major layout, that takes a transpose (R loads
// of a few bytes each and a shuffle network) per vector, and R streams that advance a few bytes a step,
// which the hardware prefetchers do not follow; decode is then bound by shuffles and misses rather than
// by memory bandwidth. In the panel layout a panel's bytes are interleaved so that each vector the
// kernel needs is one contiguous load, and a panel is one contiguous run of memory:
//
//     byte `off` of panel row i is at  R * off + i * unit(off)
//
// where unit(off) is 2 inside the block's fp16 fields (QuantScheme::f16_at: R scales side by side
// convert in one instruction) and 4 elsewhere (a 4-byte word of R rows is one int32 lane each). A
// panel takes R * row_bytes bytes, as its rows did, so panel p starts where row p * R did. A tensor
// whose row count is not a multiple of R gets a last panel padded with copies of its last row (the
// kernels compute those lanes and drop them).
//
// Float weights (F32, F16, BF16) get a copy too, of height 1: their rows as they are. The copy is not
// for the order but for the memory it lives in: all copies share one buffer in huge pages (see
// Model::pack_cpu_weights), where the file's mapping has 4 KiB pages whose TLB misses stall a decode
// step that streams every weight (SmolLM2 F16 decode on Zen 4, one thread: 68 -> 104 tokens/s).
#pragma once
#include <cstddef>
#include <cstdint>

#include "executor.h"
#include "tensor.h"

namespace pe::cpu {

// The panel height the current kernel path reads for w's type (cpu_path()): 1 for float weights; 0
// where it reads a quantized type's rows as they are (the portable path).
int panel_rows_for_cpu(const Tensor& w);
// Whether w can be repacked: rows of a float type, or of a quantized type the SIMD kernels handle in
// whole blocks.
bool can_pack_panels(const Tensor& w);
// Bytes of w in the panel layout of height r (its rows rounded up to whole panels).
size_t panel_bytes(const Tensor& w, int r);
// Writes w (row-major, w.data) in the panel layout of height r to dst (panel_bytes(w, r) bytes),
// the work split over ex's threads.
void pack_panels(Executor& ex, const Tensor& w, int r, void* dst);
// Row `row` of w's panel copy (w.panels, height w.panel_rows) in the file's layout: w.row_stride bytes
// to dst. Embedding lookups of a table tied to the output read it, so that the file's pages stay
// released (each lookup would map 64 KiB of them back: up to the whole table in resident memory).
void copy_panel_row(const Tensor& w, int64_t row, void* dst);

}  // namespace pe::cpu
