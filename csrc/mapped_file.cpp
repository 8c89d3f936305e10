#include "mapped_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "common.h"

namespace pe {

namespace {

// The SIGBUS guard's table of live mappings. Fixed size and lock-free: the handler may only read
// atomics. A mapping that finds no free slot is still checked by fstat, only not guarded.
struct GuardSlot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<int> faulted{0};
};
constexpr int kGuardSlots = 256;
GuardSlot g_slots[kGuardSlots];
struct sigaction g_prev_sigbus;
std::once_flag g_install_once;

size_t page_size() {
  static const size_t p = size_t(::sysconf(_SC_PAGESIZE));
  return p;
}

void forward_to_previous(int sig, siginfo_t* info, void* uctx) {
  if ((g_prev_sigbus.sa_flags & SA_SIGINFO) && g_prev_sigbus.sa_sigaction) {
    g_prev_sigbus.sa_sigaction(sig, info, uctx);
    return;
  }
  if (!(g_prev_sigbus.sa_flags & SA_SIGINFO) && g_prev_sigbus.sa_handler != SIG_DFL &&
      g_prev_sigbus.sa_handler != SIG_IGN) {
    g_prev_sigbus.sa_handler(sig);
    return;
  }
  // Default action: a fault re-executes the instruction and now dies as it would have; a signal
  // sent by kill() is sent again.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  ::sigaction(sig, &dfl, nullptr);
  if (info->si_code <= 0) ::raise(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  if (info->si_code > 0) {  // a fault, not a kill()
    for (GuardSlot& s : g_slots) {
      const uintptr_t b = s.begin.load(std::memory_order_acquire), e = s.end.load(std::memory_order_acquire);
      if (b == 0 || addr < b || addr >= e) continue;
      // The file shrank under the mapping: zero pages from the faulting one to the end, so the
      // read completes; MappedFile::check() reports it. (mmap is a plain system call on Linux.)
      const uintptr_t from = addr & ~uintptr_t(page_size() - 1);
      void* p = ::mmap(reinterpret_cast<void*>(from), e - from, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                       -1, 0);
      if (p != MAP_FAILED) {
        s.faulted.store(1, std::memory_order_release);
        return;
      }
      break;
    }
  }
  forward_to_previous(sig, info, uctx);
}

void install_guard() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, &g_prev_sigbus);
}

int guard(const uint8_t* p, size_t n) {
  std::call_once(g_install_once, install_guard);
  for (int i = 0; i < kGuardSlots; i++) {
    uintptr_t expected = 0;
    if (g_slots[i].begin.load() == 0 && g_slots[i].end.compare_exchange_strong(expected, 1)) {
      g_slots[i].faulted.store(0);
      g_slots[i].end.store(reinterpret_cast<uintptr_t>(p) + n, std::memory_order_release);
      g_slots[i].begin.store(reinterpret_cast<uintptr_t>(p), std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void unguard(int slot) {
  if (slot < 0) return;
  g_slots[slot].begin.store(0, std::memory_order_release);
  g_slots[slot].end.store(0, std::memory_order_release);
}

int64_t mtime_ns(const struct stat& st) { return int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec; }

}  // namespace

MappedFile::MappedFile(const std::string& path, bool use_mmap) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PE_CHECK(fd >= 0, Error, path, ": cannot open: ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    PE_THROW(Error, path, ": not a regular file");
  }
  size_ = size_t(st.st_size);
  mtime_ns_ = mtime_ns(st);
  if (size_ == 0) {
    ::close(fd);
    return;
  }
  if (use_mmap) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      PE_THROW(Error, path, ": mmap failed: ", std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
    alloc_ = size_;
    fd_ = fd;
    slot_ = guard(data_, alloc_);
    return;
  }
  // Private copy: anonymous pages (page-aligned, like a mapping), filled by read().
  alloc_ = (size_ + page_size() - 1) & ~(page_size() - 1);
  void* p = ::mmap(nullptr, alloc_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    ::close(fd);
    PE_THROW(Error, path, ": cannot allocate ", size_, " bytes to read the model into memory (use_mmap=False)");
  }
  uint8_t* dst = static_cast<uint8_t*>(p);
  size_t done = 0;
  while (done < size_) {
    const ssize_t r = ::pread(fd, dst + done, size_ - done, off_t(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = r < 0 ? errno : 0;
      ::munmap(p, alloc_);
      ::close(fd);
      PE_THROW(ModelFormatError, path, ": read failed at byte ", done, " of ", size_, ": ",
               err ? std::strerror(err) : "the file shrank while it was being read");
    }
    done += size_t(r);
  }
  ::close(fd);
  ::mprotect(p, alloc_, PROT_READ);
  data_ = dst;
}

MappedFile::~MappedFile() {
  unguard(slot_);
  if (data_) ::munmap(const_cast<uint8_t*>(data_), alloc_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::release(const void* p, size_t n) const {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(data_);
  if (!mapped() || a < base || n > size_ || a - base > size_ - n) return;
  const uintptr_t page = page_size(), from = (a + page - 1) & ~(page - 1), to = (a + n) & ~(page - 1);
  if (from < to) ::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);
}

void MappedFile::check() const {
  if (fd_ < 0) return;
  const bool faulted = slot_ >= 0 && g_slots[slot_].faulted.load(std::memory_order_acquire);
  struct stat st;
  const bool stat_ok = ::fstat(fd_, &st) == 0;
  const bool resized = stat_ok && size_t(st.st_size) != size_;
  const bool modified = stat_ok && mtime_ns(st) != mtime_ns_;
  if (!faulted && !resized && !modified) return;
  PE_THROW(ModelFormatError, path_, ": model file changed on disk after loading (",
           resized ? str_cat("size ", size_, " -> ", size_t(st.st_size), " bytes")
                   : std::string(faulted ? "its pages could no longer be read" : "modified in place"),
           "); the weights are no longer valid: load it again (replace model files by renaming a new one "
           "over them, or load with use_mmap=False to keep a private copy)");
}

}  // namespace pe
