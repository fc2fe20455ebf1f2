// The CPU attention kernels' memory: 64-byte-aligned arrays and the per-thread huge-page arena
// their workspaces are carved from (Note [Per-thread buffers]).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <c10/util/Exception.h>

namespace torchlane::attention::cpu {

// At least `bytes` bytes (*bytes is rounded up to whole 2 MiB), 2 MiB aligned, with a request
// for transparent huge pages (Note [Per-thread buffers]); released with std::free.
inline void* huge_alloc(size_t* bytes) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t asked = *bytes;
  *bytes = (asked + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, *bytes);
  TORCH_CHECK(p != nullptr, "torchlane.attention: cannot allocate ", asked, " bytes of workspace");
#ifdef MADV_HUGEPAGE
  madvise(p, *bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  return p;
}

// n elements of X at a 64-byte boundary, so that the vectors of a row never straddle two cache
// lines (std::vector's storage is 16-byte aligned: every 64-byte load and store of a tile row
// would be split in two): Huge::kNo zeroed, Huge::kYes uninitialised from huge_alloc.
enum class Huge { kNo, kYes };

template <typename X>
class AlignedArray {
 public:
  AlignedArray() = default;
  AlignedArray(int64_t n, Huge huge) {
    size_t bytes = (static_cast<size_t>(n) * sizeof(X) + 63) / 64 * 64;
    if (bytes == 0)
      return;
    if (huge == Huge::kYes) {
      data_.reset(static_cast<X*>(huge_alloc(&bytes)));
      return;
    }
    data_.reset(static_cast<X*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(data_ != nullptr, "torchlane.attention: cannot allocate ", bytes, " bytes");
    std::memset(data_.get(), 0, bytes);
  }
  X* data() const {
    return data_.get();
  }

 private:
  struct Free {
    void operator()(X* p) const {
      std::free(p);
    }
  };
  std::unique_ptr<X, Free> data_;
};

// Note [Per-thread buffers]
// The packed operands of a head and the per-task tiles are carved out of one arena per thread
// (workspace()), allocated in whole 2 MiB units at 2 MiB alignment with a request for
// transparent huge pages (madvise; the kernel may decline), and kept from one call to the next
// unless larger than kKeepBytes. Why:
//  - the L2 cache is indexed by physical address bits above the 4 KiB page, and AMX tile loads
//    read 16 rows up to ~1 KiB apart, across pages: with 4 KiB pages the GEMMs' speed depends on
//    where the kernel happened to place each page (it varies from one process to the next), with
//    2 MiB pages it does not;
//  - malloc hands out large blocks as fresh pages (mmap), and the first touch of every 4 KiB page
//    costs a fault and a zero fill: a buffer kept between calls and sized per head, not per
//    tensor, is touched once.
constexpr size_t kKeepBytes = size_t(16) << 20;

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    std::free(data_);
  }
  // At least `bytes` bytes, 2 MiB aligned; contents unspecified.
  char* get(size_t bytes) {
    if (bytes > bytes_) {
      std::free(data_);
      data_ = nullptr;
      bytes_ = 0;
      size_t rounded = bytes;
      data_ = huge_alloc(&rounded);
      bytes_ = rounded;
    }
    return static_cast<char*>(data_);
  }
  // Frees the arena if it grew beyond kKeepBytes.
  void trim() {
    if (bytes_ > kKeepBytes) {
      std::free(data_);
      data_ = nullptr;
      bytes_ = 0;
    }
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// The calling thread's arena.
inline Arena& workspace() {
  thread_local Arena arena;
  return arena;
}

// Lays out arrays, each 64-byte aligned, in the calling thread's arena: reserve() them all, then
// allocate() once (which trims the arena at the end of the task: Arena::trim), then at().
class Workspace {
 public:
  template <typename X>
  int64_t reserve(int64_t n) {
    const int64_t offset = bytes_;
    bytes_ += (n * static_cast<int64_t>(sizeof(X)) + 63) / 64 * 64;
    return offset;
  }
  void allocate() {
    base_ = workspace().get(static_cast<size_t>(bytes_));
  }
  template <typename X>
  X* at(int64_t offset) const {
    return reinterpret_cast<X*>(base_ + offset);
  }
  ~Workspace() {
    if (base_ != nullptr)
      workspace().trim();
  }

 private:
  int64_t bytes_ = 0;
  char* base_ = nullptr;
};

}  // namespace torchlane::attention::cpu
