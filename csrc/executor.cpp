#include "executor.h"

#include <cstdlib>
#include <cstring>

namespace pe {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

Executor::Executor(Device device, int n_threads) : device_(device) {
  if (device == Device::CPU) pool_ = std::make_unique<ThreadPool>(n_threads);
}

std::shared_ptr<Executor> Executor::cpu(int n_threads) {
  PE_CHECK(n_threads >= 1 && n_threads <= 1024, Error, "n_threads must be in [1, 1024], not ", n_threads);
  return std::shared_ptr<Executor>(new Executor(Device::CPU, n_threads));
}

ThreadPool& Executor::pool() {
  PE_CHECK(pool_, Error, "the ", device_name(device_), " executor has no CPU thread pool");
  return *pool_;
}

void device_copy(Device device, void* dst, const void* src, size_t n) {
  PE_CHECK(device == Device::CPU, UnsupportedModelError, "no ", device_name(device), " backend in this build");
  std::memcpy(dst, src, n);
}

Buffer::Buffer(Device device, size_t bytes) : device_(device) { reserve(bytes); }

Buffer::~Buffer() { release(); }

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    size_ = o.size_;
    device_ = o.device_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void Buffer::release() {
  if (data_ && device_ == Device::CPU) std::free(data_);
  data_ = nullptr;
  size_ = 0;
}

void Buffer::reserve(size_t bytes) {
  if (bytes <= size_) return;
  PE_CHECK(device_ == Device::CPU, UnsupportedModelError, "no ", device_name(device_), " backend in this build");
  release();
  const size_t rounded = (bytes + 63) & ~size_t(63);
  data_ = std::aligned_alloc(64, rounded);
  PE_CHECK(data_, Error, "out of memory allocating ", rounded, " bytes");
  size_ = rounded;
}

void Buffer::zero() {
  if (data_) std::memset(data_, 0, size_);
}

}  // namespace pe
