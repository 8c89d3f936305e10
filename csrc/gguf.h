// GGUF v2/v3 reader over an mmap of the file. Every count, length, offset, shape and type read
// from the file is bounds-checked; violations throw ModelFormatError naming the key or tensor.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "mapped_file.h"

namespace pe {

enum class GGUFType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GGUFType t);

struct GGUFValue {
  GGUFType type = GGUFType::UINT8;
  // Scalars: the value widened (integers in i/u, floats in f, bools in u).
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string str;
  // Arrays: element type and count; numeric elements point into the mapping, strings are copied.
  GGUFType elem_type = GGUFType::UINT8;
  uint64_t count = 0;
  const uint8_t* data = nullptr;
  std::vector<std::string> strings;
};

struct GGUFTensorInfo {
  std::string name;
  uint32_t type = 0;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the contiguous (row) dimension
  uint64_t offset = 0;      // from the start of the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t nelements() const;
};

class GGUFFile {
 public:
  // use_mmap: map the file (default) or read it into private memory (see mapped_file.h).
  explicit GGUFFile(const std::string& path, bool use_mmap = true);
  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  bool mapped() const { return map_->mapped(); }
  size_t file_size() const { return map_->size(); }
  // Throws ModelFormatError naming the file if it changed on disk since it was opened (mapped_file.h).
  // Called around every read of the mapping after load: forward passes, metadata, tensor bytes.
  void check_unchanged() const { map_->check(); }
  // MappedFile::release for bytes of this file's mapping (a no-op for anything else).
  void release_pages(const void* p, size_t n) const { map_->release(p, n); }

  const std::map<std::string, GGUFValue>& metadata() const { return kv_; }
  const std::vector<GGUFTensorInfo>& tensors() const { return tensors_; }
  const GGUFValue* find(const std::string& key) const;
  const GGUFTensorInfo* find_tensor(const std::string& name) const;

  // Typed getters: a missing key or a wrong type throws ModelFormatError naming the key.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t dflt) const;
  double get_float(const std::string& key) const;
  double get_float(const std::string& key, double dflt) const;
  bool get_bool(const std::string& key, bool dflt) const;
  std::string get_str(const std::string& key) const;
  std::string get_str(const std::string& key, const std::string& dflt) const;

 private:
  void copy_misaligned_tensors();

  std::string path_;
  std::shared_ptr<MappedFile> map_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  std::map<std::string, GGUFValue> kv_;
  std::vector<GGUFTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
  // Aligned copies of tensors whose data the file places at an address the kernels may not read
  // (general.alignment below 4 with odd offsets): F16/BF16 and block fp16 scales are read as 2-byte
  // and F32 as 4-byte values, which must not be misaligned (undefined behaviour in C++).
  std::vector<std::shared_ptr<uint8_t>> aligned_copies_;
};

}  // namespace pe
