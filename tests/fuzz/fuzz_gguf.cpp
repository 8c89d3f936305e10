// libFuzzer harness over everything a model file reaches: the GGUF parser, the model constructor
// (configuration, tensor shapes and types) and a short forward pass of two sequences on every CPU
// kernel family this machine has. Any exception derived from pe::Error is the expected answer to a
// malformed file; anything else (a sanitizer report, a crash, another exception, a timeout, an
// allocation over -malloc_limit_mb) is a finding. Build and run: tests/fuzz/run.sh (see README.md).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "gguf.h"
#include "kv_cache.h"
#include "model/context.h"
#include "model/model.h"

namespace {

// The input as a file: the engine maps files by path. A memfd is a file in memory, reachable by a
// path of /proc/self/fd.
std::string write_input(const uint8_t* data, size_t size, int& fd) {
  fd = ::memfd_create("fuzz.gguf", MFD_CLOEXEC);
  if (fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  size_t done = 0;
  while (done < size) {
    const ssize_t w = ::write(fd, data + done, size - done);
    if (w <= 0) std::abort();
    done += size_t(w);
  }
  return "/proc/self/fd/" + std::to_string(fd);
}

std::vector<pe::CpuPath> cpu_paths() {
  std::vector<pe::CpuPath> paths = {pe::CpuPath::Portable};
#if defined(PE_X86)
  if (pe::best_cpu_path() >= pe::CpuPath::AVX2) paths.push_back(pe::CpuPath::AVX2);
  if (pe::best_cpu_path() >= pe::CpuPath::AVX512) paths.push_back(pe::CpuPath::AVX512);
  if (pe::best_cpu_path() >= pe::CpuPath::AMX) paths.push_back(pe::CpuPath::AMX);
#endif
  return paths;
}

void run(const std::string& path) {
  pe::GGUFFile file(path, /*use_mmap=*/true);
  (void)file.metadata();
  auto model = std::make_shared<pe::Model>(path);
  static const std::shared_ptr<pe::Executor> executor = pe::Executor::cpu(1);
  static const std::vector<pe::CpuPath> paths = cpu_paths();
  const int64_t n_vocab = model->config().n_vocab;
  // The Q8_0 cache too where the heads allow it: its stores turn the file's numbers into int8.
  std::vector<pe::GGMLType> kv_types = {pe::GGMLType::F16};
  if (model->config().head_dim % pe::KVCache::kQ8Block == 0) kv_types.push_back(pe::GGMLType::Q8_0);
  for (pe::CpuPath p : paths) {
    pe::set_cpu_path(p);
    for (pe::GGMLType kv : kv_types) {
      // Small context, small passes, and a memory cap: the file decides the model's size, and the
      // memory check must refuse what would not fit rather than allocate it.
      pe::Context ctx(model, executor, /*n_ctx=*/8, /*n_seq_max=*/2, /*n_batch=*/4, kv,
                      /*max_memory=*/size_t(256) << 20);
      pe::Batch b;
      for (int i = 0; i < 5; i++) b.add(int32_t((i * 7 + 1) % n_vocab), i % 2, i >= 3);
      std::vector<float> logits(size_t(b.n_logits() * n_vocab));
      try {
        ctx.decode(b, logits.data());
      } catch (const pe::NumericalError&) {
        // Random weights may be NaN: a clean error, and the next path must behave the same.
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = -1;
  const std::string path = write_input(data, size, fd);
  try {
    run(path);
  } catch (const pe::Error&) {
    // A clean rejection of a malformed file.
  }
  ::close(fd);
  return 0;
}
