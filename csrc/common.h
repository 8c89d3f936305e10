// Errors and small utilities shared by the whole engine.
#pragma once
#include <cstddef>
#include <cstdint>
#include <charconv>
#include <cstdio>
#include <string_view>
#include <type_traits>
#include <stdexcept>
#include <string>

namespace pe {

// Each error type maps to a Python exception class (see bindings.cpp):
//   ModelFormatError      -> pyengine.ModelFormatError      (malformed / truncated / inconsistent file)
//   UnsupportedModelError -> pyengine.UnsupportedModelError (valid file we cannot run: arch, type)
//   ContextLengthError    -> pyengine.ContextLengthError    (more tokens than n_ctx)
//   DeviceMemoryError     -> pyengine.DeviceMemoryError     (the GPU has not enough free memory)
//   MemoryLimitError      -> pyengine.MemoryLimitError      (a model + context larger than RAM or max_memory)
//   NumericalError        -> pyengine.NumericalError        (NaN or Inf in a layer's output)
//   Error                 -> RuntimeError
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ModelFormatError : Error {
  using Error::Error;
};
struct UnsupportedModelError : Error {
  using Error::Error;
};
struct ContextLengthError : Error {
  using Error::Error;
};
struct DeviceMemoryError : Error {
  using Error::Error;
};
struct MemoryLimitError : Error {
  using Error::Error;
};
struct NumericalError : Error {
  using Error::Error;
};

// Message text from parts. Deliberately not std::ostringstream: a module that carries its own copy
// of libstdc++ (some CUDA toolchains link it statically) crashes formatting numbers through iostream
// locales when the host process has loaded another copy; to_chars/snprintf need no locale.
namespace detail {
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T>
inline std::enable_if_t<std::is_integral_v<T> || std::is_enum_v<T>> append(std::string& s, T v) {
  if constexpr (std::is_enum_v<T>) {
    append(s, static_cast<std::underlying_type_t<T>>(v));
  } else {
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof buf, v);
    s.append(buf, r.ptr);
  }
}
template <typename T>
inline std::enable_if_t<std::is_floating_point_v<T>> append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", double(v));
  s += buf;
}
}  // namespace detail

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace pe

// PE_CHECK(cond, ErrorType, message parts...): throw ErrorType with the parts concatenated.
#define PE_CHECK(cond, ErrType, ...)                 \
  do {                                               \
    if (!(cond)) throw ::pe::ErrType(::pe::str_cat(__VA_ARGS__)); \
  } while (0)
#define PE_THROW(ErrType, ...) throw ::pe::ErrType(::pe::str_cat(__VA_ARGS__))
