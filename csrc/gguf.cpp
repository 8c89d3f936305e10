#include "gguf.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>

#include "ggml_types.h"

namespace pe {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS
constexpr uint64_t kMaxStringLen = 1ull << 30;

size_t scalar_size(GGUFType t) {
  switch (t) {
    case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::BOOL: return 1;
    case GGUFType::UINT16: case GGUFType::INT16: return 2;
    case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::FLOAT32: return 4;
    case GGUFType::UINT64: case GGUFType::INT64: case GGUFType::FLOAT64: return 8;
    default: return 0;
  }
}

// A cursor over the mapped bytes; every read checks the remaining length.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* p, size_t n) : path_(path), base_(p), n_(n) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return n_ - pos_; }

  const uint8_t* take(size_t bytes, const std::string& what) {
    PE_CHECK(bytes <= remaining(), ModelFormatError, path_, ": file is truncated while reading ", what, " (need ",
             bytes, " bytes at offset ", pos_, ", file has ", n_, ")");
    const uint8_t* p = base_ + pos_;
    pos_ += bytes;
    return p;
  }
  template <typename T>
  T read(const std::string& what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string read_string(const std::string& what) {
    const uint64_t len = read<uint64_t>(what + " (string length)");
    PE_CHECK(len <= kMaxStringLen && len <= remaining(), ModelFormatError, path_, ": ", what,
             ": string length ", len, " runs past the end of the file");
    const uint8_t* p = take(size_t(len), what);
    return std::string(reinterpret_cast<const char*>(p), size_t(len));
  }

 private:
  const std::string& path_;
  const uint8_t* base_;
  size_t n_;
  size_t pos_ = 0;
};

void read_scalar(Cursor& c, GGUFType t, GGUFValue& v, const std::string& what) {
  switch (t) {
    case GGUFType::UINT8: v.u = c.read<uint8_t>(what); v.i = int64_t(v.u); v.f = double(v.u); break;
    case GGUFType::INT8: v.i = c.read<int8_t>(what); v.u = uint64_t(v.i); v.f = double(v.i); break;
    case GGUFType::UINT16: v.u = c.read<uint16_t>(what); v.i = int64_t(v.u); v.f = double(v.u); break;
    case GGUFType::INT16: v.i = c.read<int16_t>(what); v.u = uint64_t(v.i); v.f = double(v.i); break;
    case GGUFType::UINT32: v.u = c.read<uint32_t>(what); v.i = int64_t(v.u); v.f = double(v.u); break;
    case GGUFType::INT32: v.i = c.read<int32_t>(what); v.u = uint64_t(v.i); v.f = double(v.i); break;
    case GGUFType::UINT64: v.u = c.read<uint64_t>(what); v.i = int64_t(v.u); v.f = double(v.u); break;
    case GGUFType::INT64: v.i = c.read<int64_t>(what); v.u = uint64_t(v.i); v.f = double(v.i); break;
    case GGUFType::FLOAT32: v.f = c.read<float>(what); break;
    case GGUFType::FLOAT64: v.f = c.read<double>(what); break;
    case GGUFType::BOOL: {
      const uint8_t b = c.read<uint8_t>(what);
      v.u = b != 0; v.i = int64_t(v.u); v.f = double(v.u);
      break;
    }
    case GGUFType::STRING: v.str = c.read_string(what); break;
    default: PE_THROW(ModelFormatError, "internal: not a scalar type");
  }
}

bool valid_type(uint32_t t) { return t <= uint32_t(GGUFType::FLOAT64); }

}  // namespace

const char* gguf_type_name(GGUFType t) {
  static const char* names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                "bool", "string", "array", "uint64", "int64", "float64"};
  return valid_type(uint32_t(t)) ? names[uint32_t(t)] : "invalid";
}

int64_t GGUFTensorInfo::nelements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

GGUFFile::GGUFFile(const std::string& path, bool use_mmap)
    : path_(path), map_(std::make_shared<MappedFile>(path, use_mmap)) {
  Cursor c(path_, map_->data(), map_->size());
  PE_CHECK(map_->size() >= 4 && c.read<uint32_t>("magic") == kMagic, ModelFormatError, path_,
           ": not a GGUF file (bad magic)");
  version_ = c.read<uint32_t>("version");
  PE_CHECK(version_ == 2 || version_ == 3, UnsupportedModelError, path_, ": GGUF version ", version_,
           " is not supported (2 and 3 are)");
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Each key-value takes at least 12 bytes and each tensor info at least 24: bounds the counts by the file size.
  PE_CHECK(n_kv <= c.remaining() / 12, ModelFormatError, path_, ": metadata count ", n_kv, " is larger than the file allows");
  PE_CHECK(n_tensors <= c.remaining() / 24, ModelFormatError, path_, ": tensor count ", n_tensors,
           " is larger than the file allows");

  for (uint64_t k = 0; k < n_kv; k++) {
    const std::string key = c.read_string(str_cat("metadata key #", k));
    const uint32_t t = c.read<uint32_t>(str_cat("type of metadata key '", key, "'"));
    PE_CHECK(valid_type(t), ModelFormatError, path_, ": metadata key '", key, "' has invalid type id ", t);
    PE_CHECK(!kv_.count(key), ModelFormatError, path_, ": duplicate metadata key '", key, "'");
    GGUFValue v;
    v.type = GGUFType(t);
    const std::string what = str_cat("metadata key '", key, "'");
    if (v.type == GGUFType::ARRAY) {
      const uint32_t et = c.read<uint32_t>(what + " (array type)");
      PE_CHECK(valid_type(et) && et != uint32_t(GGUFType::ARRAY), ModelFormatError, path_, ": ", what,
               " has invalid array element type ", et);
      v.elem_type = GGUFType(et);
      v.count = c.read<uint64_t>(what + " (array length)");
      if (v.elem_type == GGUFType::STRING) {
        PE_CHECK(v.count <= c.remaining() / 8, ModelFormatError, path_, ": ", what, ": array length ", v.count,
                 " runs past the end of the file");
        v.strings.reserve(size_t(v.count));
        for (uint64_t j = 0; j < v.count; j++) v.strings.push_back(c.read_string(what));
      } else {
        const size_t es = scalar_size(v.elem_type);
        PE_CHECK(v.count <= c.remaining() / es, ModelFormatError, path_, ": ", what, ": array length ", v.count,
                 " runs past the end of the file");
        v.data = c.take(size_t(v.count) * es, what);
      }
    } else {
      read_scalar(c, v.type, v, what);
    }
    kv_.emplace(key, std::move(v));
  }

  if (const GGUFValue* a = find("general.alignment")) {
    PE_CHECK(a->type == GGUFType::UINT32 || a->type == GGUFType::INT32 || a->type == GGUFType::UINT64,
             ModelFormatError, path_, ": general.alignment has type ", gguf_type_name(a->type));
    PE_CHECK(a->u > 0 && a->u <= (1u << 20) && (a->u & (a->u - 1)) == 0, ModelFormatError, path_,
             ": general.alignment ", a->u, " is not a power of two");
    alignment_ = uint32_t(a->u);
  }

  tensors_.resize(size_t(n_tensors));
  for (uint64_t k = 0; k < n_tensors; k++) {
    GGUFTensorInfo& ti = tensors_[k];
    ti.name = c.read_string(str_cat("name of tensor #", k));
    const std::string what = str_cat("tensor '", ti.name, "'");
    PE_CHECK(!tensor_index_.count(ti.name), ModelFormatError, path_, ": duplicate tensor '", ti.name, "'");
    const uint32_t n_dims = c.read<uint32_t>(what + " (n_dims)");
    PE_CHECK(n_dims >= 1 && n_dims <= kMaxDims, ModelFormatError, path_, ": ", what, " has ", n_dims,
             " dimensions (1 to 4 allowed)");
    ti.ne.resize(n_dims);
    int64_t nel = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
      const uint64_t ne = c.read<uint64_t>(what + " (shape)");
      PE_CHECK(ne >= 1 && ne <= uint64_t(std::numeric_limits<int64_t>::max() / nel), ModelFormatError, path_, ": ",
               what, " has invalid dimension ", ne);
      ti.ne[d] = int64_t(ne);
      nel *= int64_t(ne);
    }
    ti.type = c.read<uint32_t>(what + " (type)");
    const TypeTraits* tr = type_traits(ti.type);
    PE_CHECK(tr, UnsupportedModelError, path_, ": ", what, " has unknown or unsupported tensor type id ", ti.type);
    PE_CHECK(ti.ne[0] % tr->block_size == 0, ModelFormatError, path_, ": ", what, " has a row of ", ti.ne[0],
             " elements, not a multiple of the ", tr->name, " block size ", tr->block_size);
    PE_CHECK(uint64_t(nel / tr->block_size) <= std::numeric_limits<uint64_t>::max() / tr->type_size,
             ModelFormatError, path_, ": ", what, " is too large");
    ti.nbytes = size_t(nel / tr->block_size) * tr->type_size;
    ti.offset = c.read<uint64_t>(what + " (offset)");
    PE_CHECK(ti.offset % alignment_ == 0, ModelFormatError, path_, ": ", what, " offset ", ti.offset,
             " is not aligned to ", alignment_);
    tensor_index_[ti.name] = size_t(k);
  }

  const size_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  PE_CHECK(data_start <= map_->size() || n_tensors == 0, ModelFormatError, path_,
           ": file is truncated before the tensor data section");
  const size_t data_size = map_->size() > data_start ? map_->size() - data_start : 0;
  for (auto& ti : tensors_) {
    PE_CHECK(ti.offset <= data_size && ti.nbytes <= data_size - ti.offset, ModelFormatError, path_, ": tensor '",
             ti.name, "' (", ti.nbytes, " bytes at data offset ", ti.offset, ") runs past the end of the file (",
             data_size, " bytes of tensor data): the file is truncated or corrupt");
    ti.data = map_->data() + data_start + ti.offset;
  }
  copy_misaligned_tensors();
  check_unchanged();
}

void GGUFFile::copy_misaligned_tensors() {
  constexpr uintptr_t kNeed = 4;  // the widest scalar a kernel reads from weights (F32)
  // One copy per distinct offset (tensors may share data); bounded by twice the file, so that a file
  // of many overlapping misaligned tensors cannot make us copy without end.
  std::map<const uint8_t*, std::pair<size_t, uint8_t*>> copies;
  size_t copied = 0;
  for (const auto& ti : tensors_)
    if (reinterpret_cast<uintptr_t>(ti.data) % kNeed != 0 && ti.nbytes > 0) {
      size_t& n = copies[ti.data].first;
      n = std::max(n, ti.nbytes);
    }
  for (auto& [src, c] : copies) {
    PE_CHECK(copied + c.first <= 2 * map_->size() + 4096, ModelFormatError, path_,
             ": misaligned tensors overlap too much to be copied (", copied + c.first, " bytes)");
    copied += c.first;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, (c.first + 63) & ~size_t(63)));
    PE_CHECK(p, Error, path_, ": cannot allocate ", c.first, " bytes for an aligned copy of a tensor");
    aligned_copies_.emplace_back(p, std::free);
    std::memcpy(p, src, c.first);
    c.second = p;
  }
  for (auto& ti : tensors_) {
    auto it = copies.find(ti.data);
    if (it != copies.end()) ti.data = it->second.second;
  }
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

const GGUFTensorInfo* GGUFFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
bool is_int(GGUFType t) {
  return t == GGUFType::UINT8 || t == GGUFType::INT8 || t == GGUFType::UINT16 || t == GGUFType::INT16 ||
         t == GGUFType::UINT32 || t == GGUFType::INT32 || t == GGUFType::UINT64 || t == GGUFType::INT64 ||
         t == GGUFType::BOOL;
}
}  // namespace

int64_t GGUFFile::get_int(const std::string& key) const {
  const GGUFValue* v = find(key);
  PE_CHECK(v, ModelFormatError, path_, ": missing required metadata key '", key, "'");
  PE_CHECK(is_int(v->type), ModelFormatError, path_, ": metadata key '", key, "' should be an integer, not ",
           gguf_type_name(v->type));
  return v->i;
}
int64_t GGUFFile::get_int(const std::string& key, int64_t dflt) const { return find(key) ? get_int(key) : dflt; }

double GGUFFile::get_float(const std::string& key) const {
  const GGUFValue* v = find(key);
  PE_CHECK(v, ModelFormatError, path_, ": missing required metadata key '", key, "'");
  PE_CHECK(v->type == GGUFType::FLOAT32 || v->type == GGUFType::FLOAT64 || is_int(v->type), ModelFormatError, path_,
           ": metadata key '", key, "' should be a number, not ", gguf_type_name(v->type));
  return is_int(v->type) ? double(v->i) : v->f;
}
double GGUFFile::get_float(const std::string& key, double dflt) const { return find(key) ? get_float(key) : dflt; }

bool GGUFFile::get_bool(const std::string& key, bool dflt) const {
  const GGUFValue* v = find(key);
  if (!v) return dflt;
  PE_CHECK(v->type == GGUFType::BOOL, ModelFormatError, path_, ": metadata key '", key, "' should be a bool, not ",
           gguf_type_name(v->type));
  return v->u != 0;
}

std::string GGUFFile::get_str(const std::string& key) const {
  const GGUFValue* v = find(key);
  PE_CHECK(v, ModelFormatError, path_, ": missing required metadata key '", key, "'");
  PE_CHECK(v->type == GGUFType::STRING, ModelFormatError, path_, ": metadata key '", key,
           "' should be a string, not ", gguf_type_name(v->type));
  return v->str;
}
std::string GGUFFile::get_str(const std::string& key, const std::string& dflt) const {
  return find(key) ? get_str(key) : dflt;
}

}  // namespace pe
