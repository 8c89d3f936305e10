// Errors and small utilities shared by the whole engine.
#pragma once
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pe {

// Each error type maps to a Python exception class (see bindings.cpp):
//   ModelFormatError      -> pyengine.ModelFormatError      (malformed / truncated / inconsistent file)
//   UnsupportedModelError -> pyengine.UnsupportedModelError (valid file we cannot run: arch, type)
//   ContextLengthError    -> pyengine.ContextLengthError    (more tokens than n_ctx)
//   DeviceMemoryError     -> pyengine.DeviceMemoryError     (the GPU has not enough free memory)
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

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace pe

// PE_CHECK(cond, ErrorType, message parts...): throw ErrorType with the parts concatenated.
#define PE_CHECK(cond, ErrType, ...)                 \
  do {                                               \
    if (!(cond)) throw ::pe::ErrType(::pe::str_cat(__VA_ARGS__)); \
  } while (0)
#define PE_THROW(ErrType, ...) throw ::pe::ErrType(::pe::str_cat(__VA_ARGS__))
