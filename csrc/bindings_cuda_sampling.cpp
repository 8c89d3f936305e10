// Test entry point for the GPU's top_logits: cuda_host_top_logits runs cuda/top_logits_math.cuh's
// radix selection on the host in the kernel's order (rounds of 256-bin counts, the early gather once
// the candidates fit, the tie fallback after the last round), so it is checked against numpy on
// machines without a GPU. The real op, on either backend, is _C.top_logits (bindings_kernels.cpp).
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cuda/top_logits_math.cuh"

namespace py = pybind11;

namespace pe {

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The candidates of x (index order) whose keys pass `take`, up to cap of them; returns how many pass.
uint32_t gather(const float* x, int n, const std::function<bool(uint32_t)>& take, uint64_t* out, uint32_t cap) {
  uint32_t count = 0;
  for (int i = 0; i < n; i++) {
    const uint32_t key = cuda::order_key(x[i]);
    if (!take(key)) continue;
    if (count < cap) out[count] = cuda::top_candidate(key, uint32_t(i));
    count++;
  }
  return count;
}

py::tuple host_top_logits(const F32Array& x, int k, int candidates) {
  if (x.ndim() != 1 || x.size() == 0) throw py::value_error("cuda_host_top_logits: x must be a non-empty 1-D array");
  const int n = int(x.size());
  if (k < 1 || k > n || candidates < k) throw py::value_error("cuda_host_top_logits: k must be in [1, len(x)]");
  const float* v = x.data();
  for (int i = 0; i < n; i++)
    if (!std::isfinite(v[i])) throw py::value_error("cuda_host_top_logits: x holds a NaN or an infinity");
  cuda::RadixState st = cuda::radix_start(uint32_t(k));
  int rounds = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t hist[256] = {};
    for (int i = 0; i < n; i++) {
      const uint32_t key = cuda::order_key(v[i]);
      if (cuda::radix_matches(key, st)) hist[cuda::radix_digit(key, shift)]++;
    }
    cuda::radix_pick(hist, shift, st);
    rounds++;
    if (st.above + st.bin_count <= uint32_t(candidates)) break;
  }
  std::vector<uint64_t> cand(static_cast<size_t>(candidates));
  uint32_t n_cand = gather(v, n, [&](uint32_t key) { return cuda::radix_candidate(key, st); }, cand.data(),
                           uint32_t(candidates));
  bool tie_fallback = false;
  if (n_cand > uint32_t(candidates)) {
    tie_fallback = true;
    const uint32_t kth = st.prefix;
    const uint32_t greater = gather(v, n, [&](uint32_t key) { return key > kth; }, cand.data(), uint32_t(candidates));
    gather(v, n, [&](uint32_t key) { return key == kth; }, cand.data() + greater, uint32_t(k) - greater);
    n_cand = uint32_t(k);
  }
  std::sort(cand.begin(), cand.begin() + n_cand, std::greater<uint64_t>());
  py::array_t<int32_t> ids(k);
  F32Array values(k);
  for (int j = 0; j < k; j++) {
    ids.mutable_data()[j] = int32_t(cuda::top_candidate_index(cand[size_t(j)]));
    values.mutable_data()[j] = cuda::order_key_value(cuda::top_candidate_key(cand[size_t(j)]));
  }
  return py::make_tuple(ids, values, rounds, tie_fallback);
}

}  // namespace

void bind_cuda_sampling(py::module_& m) {
  m.def("cuda_host_top_logits", &host_top_logits, py::arg("x"), py::arg("k"),
        py::arg("candidates") = cuda::kTopCandidates,
        "The GPU top_logits kernel's radix selection, run on the host: (ids, values, rounds, tie_fallback) "
        "of the k largest of x, largest first, ties lower index first. candidates: the kernel's shared-memory "
        "capacity (smaller values exercise the fallbacks).");
}

}  // namespace pe
