// A model file's bytes: a read-only shared mapping (the default: pages come from the page cache,
// nothing is copied) or a private copy read into anonymous memory (use_mmap = false).
//
// A shared mapping reflects the file as it is now. If the file shrinks after it was mapped (a
// download replacing it in place, a copy over it, a full disk), touching a page past the new end
// raises SIGBUS, which would kill the whole process; if it is rewritten in place, the weights
// silently change. Two defences, because neither alone is enough:
//   - check(): a cheap fstat of the open file before and after every use (a forward pass, a metadata
//     read) compares size and mtime with what was mapped, so a file changed between calls is an
//     exception that names it;
//   - a process-wide SIGBUS handler covers a truncation *during* a pass (any thread): a fault inside
//     one of our mappings replaces its pages from the fault to the end with zero pages, marks the
//     mapping, and returns, so the read completes with zeros and the check after the pass raises.
//     Faults outside our mappings go to the handler that was there before (or the default action).
// A sigsetjmp/siglongjmp around reads was rejected: the reads happen in thread-pool workers in the
// middle of kernels, and jumping out of C++ frames skips destructors and leaves the pool waiting.
// Replacing the file by rename (the usual way to update a model) is harmless: the old inode stays
// mapped and unchanged until the model is closed.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace pe {

class MappedFile {
 public:
  MappedFile(const std::string& path, bool use_mmap = true);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool mapped() const { return fd_ >= 0; }

  // Throws ModelFormatError naming the file if it changed on disk since it was mapped (size, mtime)
  // or a read of the mapping faulted. A private copy never changes: no-op.
  void check() const;

  // Drops the pages wholly inside [p, p + n) from this process's memory (a shared mapping only: they
  // stay in the page cache and come back on the next read). For weights the engine keeps a copy of
  // elsewhere (cpu/panels.h), so that the copy does not double the resident memory.
  void release(const void* p, size_t n) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t alloc_ = 0;  // bytes of the mapping (private copy: page-rounded anonymous memory)
  int fd_ = -1;       // kept open while mapped, for fstat
  int slot_ = -1;     // entry in the SIGBUS guard's table
  int64_t mtime_ns_ = 0;
};

}  // namespace pe
