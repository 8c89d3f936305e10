#include "cpu/panels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/quant_blocks.h"
#include "cpu_features.h"

namespace pe::cpu {

namespace {

// The copy units of one block: (offset, 2) for each fp16 field, (offset, 4) for each word between.
struct Unit {
  int off, size;
};

std::vector<Unit> block_units(const QuantScheme& s) {
  std::vector<Unit> units;
  for (int off = 0; off < s.block_bytes;) {
    const bool f16 = off == s.f16_at[0] || off == s.f16_at[1];
    const int size = f16 ? 2 : 4;
    PE_CHECK(off + size <= s.block_bytes, Error, "panel layout: ", type_name(uint32_t(s.type)),
             "'s block does not split into fp16 fields and 4-byte words");
    units.push_back({off, size});
    off += size;
  }
  return units;
}

}  // namespace

int panel_rows_for_cpu(const Tensor& w) {
  if (is_float_type(w.type)) return 1;
  switch (cpu_path()) {
    case CpuPath::AMX:  // the AVX-512 panels: AMX tiles read them too
    case CpuPath::AVX512: return 16;
    case CpuPath::AVX2: return 8;
    default: return 0;
  }
}

bool can_pack_panels(const Tensor& w) {
  if (w.device != Device::CPU || !w.data || w.rows <= 0) return false;
  if (is_float_type(w.type)) return w.row_stride == row_bytes(w.type, w.cols);
  const QuantScheme* s = quant_scheme(w.type);
  return s && w.cols % s->block == 0 && w.row_stride == size_t(w.cols / s->block) * size_t(s->block_bytes);
}

size_t panel_bytes(const Tensor& w, int r) { return size_t((w.rows + r - 1) / r) * size_t(r) * w.row_stride; }

void pack_panels(Executor& ex, const Tensor& w, int r, void* dst) {
  PE_CHECK(can_pack_panels(w) && r > 0 && (r == 1) == is_float_type(w.type), Error, "pack_panels: a ",
           type_name(uint32_t(w.type)), " tensor cannot be repacked in panels of ", r, " rows");
  if (r == 1) {  // float rows, copied as they are
    ex.pool().for_range(w.rows, 64, [&](int64_t r0, int64_t r1) {
      std::memcpy(static_cast<uint8_t*>(dst) + size_t(r0) * w.row_stride,
                  static_cast<const uint8_t*>(w.data) + size_t(r0) * w.row_stride, size_t(r1 - r0) * w.row_stride);
    });
    return;
  }
  const QuantScheme& s = *quant_scheme(w.type);
  const std::vector<Unit> units = block_units(s);
  const int64_t n_panels = (w.rows + r - 1) / r, nblk = w.cols / s.block;
  const size_t rb = w.row_stride;
  const auto* src = static_cast<const uint8_t*>(w.data);
  ex.pool().for_range(n_panels, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      uint8_t* panel = static_cast<uint8_t*>(dst) + size_t(p) * size_t(r) * rb;
      for (int i = 0; i < r; i++) {
        const uint8_t* row = src + size_t(std::min(p * r + i, w.rows - 1)) * rb;
        for (int64_t b = 0; b < nblk; b++) {
          const int64_t base = b * s.block_bytes;
          for (const Unit& u : units)
            std::memcpy(panel + size_t(r) * size_t(base + u.off) + size_t(i * u.size), row + base + u.off,
                        size_t(u.size));
        }
      }
    }
  });
}

void copy_panel_row(const Tensor& w, int64_t row, void* dst) {
  PE_CHECK(w.panels && w.panel_rows > 0 && row >= 0 && row < w.rows, Error, "copy_panel_row: row ", row,
           " of a tensor without a panel copy or out of range [0, ", w.rows, ")");
  const int r = w.panel_rows;
  const auto* panel = static_cast<const uint8_t*>(w.panels) + size_t(row / r) * size_t(r) * w.row_stride;
  auto* out = static_cast<uint8_t*>(dst);
  if (r == 1) {
    std::memcpy(out, panel, w.row_stride);
    return;
  }
  const QuantScheme& s = *quant_scheme(w.type);
  const int i = int(row % r);
  const std::vector<Unit> units = block_units(s);
  for (int64_t base = 0; base < int64_t(w.row_stride); base += s.block_bytes)
    for (const Unit& u : units)
      std::memcpy(out + base + u.off, panel + size_t(r) * size_t(base + u.off) + size_t(i * u.size), size_t(u.size));
}

}  // namespace pe::cpu
