// The CUDA kernels' dequantisation (cuda/quant_blocks.cuh) run on the host, so that tests compare it
// with the CPU backend and gguf-py on machines without a GPU. Compiled in every build, with or
// without CUDA: it includes only the host-clean header.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cuda/gemm_tile.cuh"
#include "cuda/gemv_span.cuh"
#include "cuda/quant_blocks.cuh"
#include "cuda/quant_dot.cuh"
#include "ggml_types.h"

namespace py = pybind11;

namespace pe {

namespace {

// Checks raw weight bytes of a rows x cols matrix of a chunk type; returns the type and row bytes.
GGMLType check_weights(const py::buffer_info& info, uint32_t type_id, int64_t rows, int64_t cols, size_t* rb_out) {
  // Bad arguments raise pe errors (ModelFormatError is a ValueError), as the engine's own checks do.
  PE_CHECK(info.itemsize == 1, ModelFormatError, "weights must be raw bytes (a uint8 array or bytes)");
  PE_CHECK(rows >= 0 && cols > 0, ModelFormatError, "bad weight shape ", rows, " x ", cols);
  PE_CHECK(type_traits(type_id), UnsupportedModelError, "unknown tensor type id ", type_id);
  const GGMLType t = GGMLType(type_id);
  PE_CHECK(cuda::chunk_type_supported(t), UnsupportedModelError, "type ", type_name(type_id),
           " has no CUDA chunk decoder");
  ssize_t expected_stride = 1;
  for (ssize_t i = info.ndim - 1; i >= 0; i--) {
    PE_CHECK(info.shape[i] == 1 || info.strides[i] == expected_stride, ModelFormatError,
             "weight bytes must be C-contiguous");
    expected_stride *= info.shape[i];
  }
  const size_t rb = row_bytes(t, cols);  // throws if cols is not a multiple of the block size
  PE_CHECK(size_t(info.size) == rb * size_t(rows), ModelFormatError, "weights of type ", type_name(type_id), " ",
           rows, " x ", cols, " take ", rb * size_t(rows), " bytes, got ", info.size);
  *rb_out = rb;
  return t;
}

using F32Rows = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The checked operands of a host mirror of y = x W^T: W's bytes, type and row bytes, x (m rows), and
// y (m, rows) to fill, which the mirror returns.
struct HostMatmul {
  const uint8_t* w;
  GGMLType t;
  size_t rb;
  int64_t m;
  const float* x;
  float* out;
  py::array_t<float> y;
};

HostMatmul host_matmul(const py::buffer_info& info, uint32_t type_id, int64_t rows, int64_t cols, const F32Rows& x) {
  HostMatmul h;
  h.t = check_weights(info, type_id, rows, cols, &h.rb);
  PE_CHECK(x.ndim() == 2 && x.shape(1) == cols, ModelFormatError, "x must be (m, ", cols, ")");
  h.w = static_cast<const uint8_t*>(info.ptr);
  h.m = x.shape(0);
  h.x = x.data();
  h.y = py::array_t<float>({h.m, rows});
  h.out = h.y.mutable_data();
  return h;
}

py::array_t<float> cuda_host_dequantize(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols) {
  const py::buffer_info info = w.request();
  size_t rb;
  const GGMLType t = check_weights(info, type_id, rows, cols, &rb);
  py::array_t<float> out({rows, cols});
  const auto* src = static_cast<const uint8_t*>(info.ptr);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int64_t n_chunks = (cols + cuda::kChunk - 1) / cuda::kChunk;
    float chunk[cuda::kChunk];
    for (int64_t r = 0; r < rows; r++) {
      const uint8_t* row = src + size_t(r) * rb;
      float* out_row = dst + r * cols;
      for (int64_t c = 0; c < n_chunks; c++) {
        cuda::dequantize_chunk(t, row, cols, c, chunk);
        const int64_t n = std::min<int64_t>(cuda::kChunk, cols - c * cuda::kChunk);
        std::copy(chunk, chunk + n, out_row + c * cuda::kChunk);
      }
    }
  }
  return out;
}

// The CUDA GEMV's path from weight bytes to floats, on the host: rows laid out contiguously from an
// address `misalign` (even) bytes past a 16-byte boundary, each span copied piece by piece as the 32
// lanes of gemv_kernel copy it (cuda/gemv_span.cuh) into a 16-byte aligned buffer at the same
// offset mod 16, then chunk `lane` of the staged span decoded as the kernel decodes it. Throws if
// the pieces overlap, leave a byte out, or are not aligned to their size, or if the decoded values
// past the row's end are not 0.
py::array_t<float> cuda_host_gemv_staged_dequantize(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                                                    int misalign) {
  const py::buffer_info info = w.request();
  size_t rb;
  const GGMLType t = check_weights(info, type_id, rows, cols, &rb);
  PE_CHECK(misalign >= 0 && misalign < 16 && misalign % cuda::chunk_row_alignment(t) == 0, ModelFormatError,
           "misalign must be in [0, 16) and a multiple of ", cuda::chunk_row_alignment(t), " for ", type_name(type_id));
  py::array_t<float> out({rows, cols});
  const auto* src = static_cast<const uint8_t*>(info.ptr);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    // The "global" copy of the weights, its first row at misalign mod 16.
    std::vector<uint8_t> global(rb * size_t(rows) + 16);
    const size_t base = (size_t(misalign) - reinterpret_cast<uintptr_t>(global.data())) & 15;
    std::copy(src, src + rb * size_t(rows), global.begin() + ptrdiff_t(base));
    alignas(16) uint8_t buf[cuda::span_max_bytes(GGMLType::F32) + 32];
    std::vector<int> covered;
    const int64_t n_chunks = (cols + cuda::kChunk - 1) / cuda::kChunk;
    const int64_t n_spans = (n_chunks + cuda::kSpanChunks - 1) / cuda::kSpanChunks;
    float chunk[cuda::kChunk];
    for (int64_t r = 0; r < rows; r++) {
      const uint8_t* row = global.data() + base + size_t(r) * rb;
      for (int64_t s = 0; s < n_spans; s++) {
        int64_t b, e;
        cuda::span_bytes(t, cols, s, &b, &e);
        const int n = int(e - b);
        PE_CHECK(n > 0 && n <= cuda::span_max_bytes(t) && n % 2 == 0, Error, "span ", s, " has ", n, " bytes");
        const uint8_t* span = row + b;
        const int mis = int(reinterpret_cast<uintptr_t>(span) & 15);
        std::fill(std::begin(buf), std::end(buf), uint8_t(0xa5));
        covered.assign(size_t(n), 0);
        for (int lane = 0; lane < 32; lane++) {
          cuda::for_each_span_piece(mis, n, lane, [&](int off, int size) {
            PE_CHECK((size == 2 || size == 4 || size == 8 || size == 16) && off >= 0 && off + size <= n &&
                         (mis + off) % size == 0,
                     Error, "bad piece (", off, ", ", size, ") of a ", n, "-byte span at ", mis, " mod 16");
            std::copy(span + off, span + off + size, buf + mis + off);
            for (int i = off; i < off + size; i++) covered[size_t(i)]++;
          });
        }
        for (int i = 0; i < n; i++)
          PE_CHECK(covered[size_t(i)] == 1, Error, "byte ", i, " of a ", n, "-byte span at ", mis, " mod 16 copied ",
                   covered[size_t(i)], " times");
        for (int lane = 0; lane < cuda::kSpanChunks && s * cuda::kSpanChunks + lane < n_chunks; lane++) {
          cuda::dequantize_chunk(t, buf + mis, cuda::span_cols(cols, s), lane, chunk);
          const int64_t k0 = (s * cuda::kSpanChunks + lane) * cuda::kChunk;
          const int64_t m = std::min<int64_t>(cuda::kChunk, cols - k0);
          std::copy(chunk, chunk + m, dst + r * cols + k0);
          // Past the row's end the kernel multiplies by x's zero padding: anything but 0 (bytes beyond
          // the staged span, which may be NaN) would leak into the sum.
          for (int64_t l = m; l < cuda::kChunk; l++)
            PE_CHECK(chunk[l] == 0.0f, Error, "element ", k0 + l, " past the end of a ", cols, "-element row is ",
                     chunk[l], ", not 0");
        }
      }
    }
  }
  return out;
}

// The integer form of every chunk of a quantized matrix (cuda/quant_dot.cuh): q (rows, cols) as
// int8 and, per 16-element half chunk, scale and offset (rows, cols / 16), so that
// w = scale * q + offset elementwise.
py::tuple cuda_host_int_chunks(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols) {
  const py::buffer_info info = w.request();
  size_t rb;
  const GGMLType t = check_weights(info, type_id, rows, cols, &rb);
  PE_CHECK(!cuda::chunk_type_is_float(t), UnsupportedModelError, "type ", type_name(type_id),
           " has no integer chunk decoder");
  py::array_t<int8_t> q({rows, cols});
  py::array_t<float> scale({rows, cols / 16}), offset({rows, cols / 16});
  const auto* src = static_cast<const uint8_t*>(info.ptr);
  int8_t* qd = q.mutable_data();
  float* sd = scale.mutable_data();
  float* od = offset.mutable_data();
  {
    py::gil_scoped_release release;
    cuda::IntChunk chunk;
    for (int64_t r = 0; r < rows; r++) {
      for (int64_t c = 0; c < cols / cuda::kChunk; c++) {
        cuda::int_chunk(t, src + size_t(r) * rb, c, chunk);
        for (int l = 0; l < cuda::kChunk; l++)
          qd[r * cols + c * cuda::kChunk + l] = int8_t(cuda::byte_at(chunk.q, l));
        for (int h = 0; h < 2; h++) {
          sd[r * (cols / 16) + 2 * c + h] = chunk.scale[h];
          od[r * (cols / 16) + 2 * c + h] = chunk.offset[h];
        }
      }
    }
  }
  return py::make_tuple(q, scale, offset);
}

// y = x W^T as the CUDA decode GEMV computes it for a quantized W: x rounded to 8 bits per chunk
// (quantize_x_chunk), integer dot products per chunk (dot_chunk), float sums over the chunks.
py::array_t<float> cuda_host_int_matmul(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                                        const F32Rows& x) {
  const py::buffer_info info = w.request();
  HostMatmul h = host_matmul(info, type_id, rows, cols, x);
  PE_CHECK(!cuda::chunk_type_is_float(h.t), UnsupportedModelError, "type ", type_name(type_id),
           " has no integer chunk decoder");
  const auto [src, t, rb, m, xd, yd] = std::tie(h.w, h.t, h.rb, h.m, h.x, h.out);
  {
    py::gil_scoped_release release;
    const int64_t n_chunks = cols / cuda::kChunk;
    std::vector<cuda::XRecord> recs(size_t(m * n_chunks));
    float xc[cuda::kChunk];
    for (int64_t i = 0; i < m * n_chunks; i++) {
      std::copy(xd + i * cuda::kChunk, xd + (i + 1) * cuda::kChunk, xc);
      cuda::quantize_x_chunk(xc, recs[size_t(i)]);
    }
    cuda::IntChunk chunk;
    for (int64_t r = 0; r < rows; r++) {
      for (int64_t i = 0; i < m; i++) yd[i * rows + r] = 0.0f;
      for (int64_t c = 0; c < n_chunks; c++) {
        cuda::int_chunk(t, src + size_t(r) * rb, c, chunk);
        for (int64_t i = 0; i < m; i++) {
          const cuda::XRecord& rec = recs[size_t(i * n_chunks + c)];
          uint32_t xq[8];
          std::memcpy(xq, rec.q, sizeof(xq));
          yd[i * rows + r] += cuda::int_chunk_has_halves(t)
                                  ? cuda::dot_chunk<true>(chunk, xq, rec.d, rec.dsum[0], rec.dsum[1])
                                  : cuda::dot_chunk<false>(chunk, xq, rec.d, rec.dsum[0], rec.dsum[1]);
        }
      }
    }
  }
  return h.y;
}

// mma.sync.m16n8k16 with f16 A, B and f32 C, D, by its PTX definition: the A (16 x 16) and B
// (16 x 8) that the 32 lanes' registers hold (cuda/gemm_tile.cuh's fragment coordinates), D = A B + C
// with each element's 16 products summed exactly (double) and added to C once.
void mma_16816_host(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&d)[32][4]) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; lane++) {
    for (int r = 0; r < 4; r++)
      for (int h = 0; h < 2; h++)
        A[cuda::frag_a_row(lane, r)][cuda::frag_a_k(lane, r) + h] = fp16_to_fp32(fp16_t(a[lane][r] >> (16 * h)));
    for (int r = 0; r < 2; r++)
      for (int h = 0; h < 2; h++)
        B[cuda::frag_b_k(lane, r) + h][cuda::frag_b_n(lane)] = fp16_to_fp32(fp16_t(b[lane][r] >> (16 * h)));
    for (int e = 0; e < 4; e++) C[cuda::frag_c_row(lane, e)][cuda::frag_c_col(lane, e)] = d[lane][e];
  }
  for (int lane = 0; lane < 32; lane++)
    for (int e = 0; e < 4; e++) {
      const int i = cuda::frag_c_row(lane, e), j = cuda::frag_c_col(lane, e);
      double sum = 0.0;
      for (int k = 0; k < 16; k++) sum += double(A[i][k]) * double(B[k][j]);
      d[lane][e] = float(double(C[i][j]) + sum);
    }
}

// y = x W^T as the CUDA tensor-core GEMM (matmul.cu, m > 8) computes it, run block by block, thread
// by thread and lane by lane on the host: x rounded to half into its padded copy (x_to_half_kernel);
// for every block and K step, each thread's x pieces and W chunk staged where gemm_tile.cuh says
// (W dequantised by the kernel's decoder and rounded to half), the rest of the stage left as NaN so
// that a fragment reading an unstaged element poisons y; each warp's A and B registers read at the
// kernel's offsets and multiplied by mma.sync's definition (mma_16816_host); each lane's
// accumulators stored where the kernel's epilogue stores them. With `sms` multiprocessors the grid is
// split along K as launch_gemm splits it (gemm_splits; 0: never), each split's partials stored apart
// and added in split order as split_k_sum_kernel adds them. Throws if an element of y (or of a
// split's partials) is written other than once. Any m (the kernel runs for m > 8).
py::array_t<float> cuda_host_gemm(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                                  const F32Rows& x, int sms) {
  const py::buffer_info info = w.request();
  HostMatmul h = host_matmul(info, type_id, rows, cols, x);
  const auto [src, t, rb, m, xd, yd] = std::tie(h.w, h.t, h.rb, h.m, h.x, h.out);
  {
    py::gil_scoped_release release;
    const int64_t ldxh = cuda::gemm_x_cols(cols), all_steps = cuda::gemm_steps(cols);
    const int64_t tiles = (rows + cuda::kGemmN - 1) / cuda::kGemmN * ((m + cuda::kGemmM - 1) / cuda::kGemmM);
    const int splits = sms > 0 ? cuda::gemm_splits(tiles, all_steps, sms) : 1;
    const int64_t split_steps = cuda::gemm_split_steps(all_steps, splits);
    std::vector<float> part(size_t(splits * m * rows), 0.0f);
    std::vector<fp16_t> xh(size_t(cuda::gemm_x_rows(m) * ldxh), 0);
    for (int64_t r = 0; r < m; r++)
      for (int64_t c = 0; c < cols; c++) xh[size_t(r * ldxh + c)] = fp32_to_fp16(xd[r * cols + c]);
    std::vector<int> writes(size_t(splits * m * rows), 0);
    std::vector<fp16_t> stage(size_t(cuda::kGemmStageHalves));
    constexpr int kWarps = cuda::kGemmThreads / 32;
    std::vector<float> acc_store(size_t(kWarps) * cuda::kGemmFragsM * cuda::kGemmFragsN * 32 * 4);
    auto acc = [&](int warp, int i, int j) {  // the warp's accumulators of mma tile (i, j), per lane
      const size_t tile = size_t((warp * cuda::kGemmFragsM + i) * cuda::kGemmFragsN + j);
      return reinterpret_cast<float(*)[4]>(&acc_store[tile * 32 * 4]);
    };
    for (int64_t n0 = 0; n0 < rows; n0 += cuda::kGemmN)
      for (int64_t m0 = 0; m0 < m; m0 += cuda::kGemmM)
        for (int z = 0; z < splits; z++) {
          const int64_t first = z * split_steps;
          const int64_t steps = cuda::gemm_split_count(all_steps, split_steps, z);
          std::fill(acc_store.begin(), acc_store.end(), 0.0f);
          for (int64_t s = first; s < first + steps; s++) {
            std::fill(stage.begin(), stage.end(), fp16_t(0x7e00));  // NaN
            for (int tid = 0; tid < cuda::kGemmThreads; tid++) {
              for (int i = 0; i < cuda::kGemmXPieces; i++) {
                int r, c;
                cuda::gemm_x_piece(tid, i, r, c);
                for (int h = 0; h < 8; h++)
                  stage[size_t(r * cuda::kGemmLd + c + h)] = xh[size_t((m0 + r) * ldxh + s * cuda::kGemmK + c + h)];
              }
              int w_row, w_half;
              cuda::gemm_w_chunk(tid, w_row, w_half);
              float v[cuda::kChunk] = {};
              if (n0 + w_row < rows)
                cuda::dequantize_chunk(t, src + size_t(n0 + w_row) * rb, cols,
                                       s * (cuda::kGemmK / cuda::kChunk) + w_half, v);
              for (int l = 0; l < cuda::kChunk; l++)
                stage[size_t((cuda::kGemmM + w_row) * cuda::kGemmLd + w_half * cuda::kChunk + l)] = fp32_to_fp16(v[l]);
            }
            auto word = [&](int off) { return uint32_t(stage[size_t(off)]) | uint32_t(stage[size_t(off + 1)]) << 16; };
            for (int warp = 0; warp < kWarps; warp++) {
              int row_x, row_w;
              cuda::gemm_warp_origin(warp, row_x, row_w);
              for (int kk = 0; kk < cuda::kGemmK; kk += 16)
                for (int i = 0; i < cuda::kGemmFragsM; i++)
                  for (int j = 0; j < cuda::kGemmFragsN; j++) {
                    uint32_t a[32][4], b[32][2];
                    for (int lane = 0; lane < 32; lane++) {
                      for (int r = 0; r < 4; r++) a[lane][r] = word(cuda::gemm_a_offset(row_x, i, kk, lane, r));
                      for (int r = 0; r < 2; r++) b[lane][r] = word(cuda::gemm_b_offset(row_w, j, kk, lane, r));
                    }
                    mma_16816_host(a, b, *reinterpret_cast<float(*)[32][4]>(acc(warp, i, j)));
                  }
            }
          }
          for (int warp = 0; warp < kWarps; warp++) {
            int row_x, row_w;
            cuda::gemm_warp_origin(warp, row_x, row_w);
            for (int i = 0; i < cuda::kGemmFragsM; i++)
              for (int j = 0; j < cuda::kGemmFragsN; j++)
                for (int lane = 0; lane < 32; lane++)
                  for (int e = 0; e < 4; e++) {
                    const int64_t r = m0 + row_x + 16 * i + cuda::frag_c_row(lane, e);
                    const int64_t n = n0 + row_w + 8 * j + cuda::frag_c_col(lane, e);
                    if (r < m && n < rows) {
                      part[size_t((z * m + r) * rows + n)] = acc(warp, i, j)[lane][e];
                      writes[size_t((z * m + r) * rows + n)]++;
                    }
                  }
          }
        }
    for (int64_t i = 0; i < splits * m * rows; i++)
      PE_CHECK(writes[size_t(i)] == 1, Error, "split ", i / (m * rows), "'s y[", i % (m * rows) / rows, "][", i % rows,
               "] written ", writes[size_t(i)], " times");
    for (int64_t i = 0; i < m * rows; i++) {
      float sum = part[size_t(i)];
      for (int z = 1; z < splits; z++) sum += part[size_t(z * m * rows + i)];
      yd[i] = sum;
    }
  }
  return h.y;
}

}  // namespace

void bind_cuda_quant(py::module_& m) {
  m.def("cuda_host_dequantize", &cuda_host_dequantize, py::arg("w"), py::arg("type_id"), py::arg("rows"),
        py::arg("cols"),
        "Raw GGUF bytes of a rows x cols matrix of ggml type `type_id` as float32 (rows, cols), decoded on "
        "the host by the CUDA kernels' chunk decoders (cuda/quant_blocks.cuh). For tests.");
  m.def("cuda_host_gemv_staged_dequantize", &cuda_host_gemv_staged_dequantize, py::arg("w"), py::arg("type_id"),
        py::arg("rows"), py::arg("cols"), py::arg("misalign") = 0,
        "As cuda_host_dequantize, but through the CUDA GEMV's shared-memory staging (cuda/gemv_span.cuh) with the "
        "rows starting `misalign` bytes past a 16-byte boundary. For tests.");
  m.def("cuda_host_int_chunks", &cuda_host_int_chunks, py::arg("w"), py::arg("type_id"), py::arg("rows"),
        py::arg("cols"),
        "The CUDA decode GEMV's integer form of a quantized matrix (cuda/quant_dot.cuh), on the host: (q int8 "
        "(rows, cols), scale, offset (rows, cols / 16)) with w = scale * q + offset per 16-element half chunk. "
        "For tests.");
  m.def("cuda_host_int_matmul", &cuda_host_int_matmul, py::arg("w"), py::arg("type_id"), py::arg("rows"),
        py::arg("cols"), py::arg("x"),
        "x W^T (x float32 (m, cols)) as the CUDA decode GEMV computes it for a quantized W: x rounded to 8 bits "
        "per 32-element chunk, integer dot products. For tests.");
  m.def(
      "cuda_host_gemm_fragments",
      [] {
        py::array_t<int32_t> a_row({32, 4}), a_k({32, 4}), b_n({32, 2}), b_k({32, 2}), c_row({32, 4}), c_col({32, 4});
        for (int lane = 0; lane < 32; lane++) {
          for (int r = 0; r < 4; r++) {
            a_row.mutable_at(lane, r) = cuda::frag_a_row(lane, r);
            a_k.mutable_at(lane, r) = cuda::frag_a_k(lane, r);
            c_row.mutable_at(lane, r) = cuda::frag_c_row(lane, r);
            c_col.mutable_at(lane, r) = cuda::frag_c_col(lane, r);
          }
          for (int r = 0; r < 2; r++) {
            b_n.mutable_at(lane, r) = cuda::frag_b_n(lane);
            b_k.mutable_at(lane, r) = cuda::frag_b_k(lane, r);
          }
        }
        py::dict d;
        d["a_row"] = a_row, d["a_k"] = a_k, d["b_n"] = b_n, d["b_k"] = b_k, d["c_row"] = c_row, d["c_col"] = c_col;
        return d;
      },
      "The (lane, register) -> element coordinates the tensor-core GEMM assumes for mma.sync.m16n8k16 "
      "(cuda/gemm_tile.cuh): A's row and first k, B's n and first k, C's row and column. For tests.");
  m.def("cuda_host_gemm", &cuda_host_gemm, py::arg("w"), py::arg("type_id"), py::arg("rows"), py::arg("cols"),
        py::arg("x"), py::arg("sms") = 0,
        "x W^T (x float32 (m, cols)) as the CUDA tensor-core GEMM (m > 8) computes it, its blocks, threads, "
        "warps and lanes run on the host with mma.sync by its PTX definition (cuda/gemm_tile.cuh); split along K "
        "as on a GPU of `sms` multiprocessors (0: not split). For tests.");
}

}  // namespace pe
