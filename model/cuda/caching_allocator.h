// The caching logic behind CudaAllocator (device_cuda.h), written against two callbacks instead of
// cudaMalloc/cudaFree so that it is tested on any machine with host memory
// (tests/cuda/caching_allocator_test.cc). Plain C++; no CUDA type appears here.
//
// Policy:
// - Size classes: a request is rounded up to a multiple of 512 bytes when it is at most 1 MiB and
//   to a multiple of 2 MiB above that (CachingAllocatorBlockSize). Every block is one raw
//   allocation of exactly its class size; blocks are never split or merged.
// - Free puts the block on a free list keyed by size. Allocate takes the smallest free block that
//   is large enough and wastes at most max(size / 8, granule) bytes (best fit with a bound, so a
//   small request never pins a huge block); only when there is none does it call the raw
//   allocator. A training step that allocates and frees the same sizes every step therefore
//   stops calling the raw allocator after its first steps (stats().raw_allocs stops growing).
// - Out of memory: when the raw allocator answers RESOURCE_EXHAUSTED, every cached free block is
//   given back and the raw allocation is tried once more; if that fails too, Allocate returns
//   RESOURCE_EXHAUSTED naming the request, its class size and the reserved / in-use bytes.
// - Alignment: every pointer returned is 256-byte aligned (the raw allocator must provide that;
//   a misaligned raw block is given back and reported as INTERNAL).
//
// Reuse is in host order: a block freed here may be handed out by the next Allocate at once. That
// is safe when all work touching the memory is queued on one stream (stream order then orders the
// old user's kernels before the new user's); a caller that frees memory still in use on another
// stream must first make that stream's work complete or be waited on by the allocating stream.
//
// Thread-safe (one mutex); the raw callbacks are called with the mutex held.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/status.h"

namespace strata::model {

inline constexpr size_t kCachingAllocatorAlignment = 256;
inline constexpr size_t kSmallBlockGranule = 512;
inline constexpr size_t kSmallBlockLimit = size_t{1} << 20;  // requests up to 1 MiB are "small"
inline constexpr size_t kLargeBlockGranule = size_t{2} << 20;
// Larger requests are refused (RESOURCE_EXHAUSTED) before any rounding could overflow.
inline constexpr size_t kCachingAllocatorMaxBytes = size_t{1} << 48;

// The class (block) size for a request of `bytes`: 0 for 0, else rounded up to a multiple of 512
// (bytes <= 1 MiB) or of 2 MiB. bytes must be <= kCachingAllocatorMaxBytes.
size_t CachingAllocatorBlockSize(size_t bytes);

// The largest cached block that may serve a request of class size `block_size`.
size_t CachingAllocatorMaxReuseSize(size_t block_size);

struct CachingAllocatorStats {
  int64_t raw_allocs = 0;          // successful raw allocations so far
  int64_t raw_frees = 0;           // raw frees so far (ReleaseCached, OOM retry, destructor)
  int64_t raw_alloc_failures = 0;  // raw allocations that failed (out of memory or otherwise)
  int64_t oom_retries = 0;         // times the cache was released to retry a raw allocation
  int64_t allocations = 0;         // successful Allocate calls with bytes > 0
  int64_t cache_hits = 0;          // ... of which were served from the free lists
  size_t reserved_bytes = 0;       // held from the raw allocator: in use + cached
  size_t in_use_bytes = 0;         // class sizes of the blocks handed out and not yet freed
  size_t requested_bytes = 0;      // bytes asked for by those blocks' Allocate calls
  size_t peak_in_use_bytes = 0;    // maximum of in_use_bytes so far
  size_t cached_bytes = 0;         // reserved_bytes - in_use_bytes
  int64_t cached_blocks = 0;       // number of blocks on the free lists
};

class CachingAllocator {
 public:
  // Returns a block of exactly `bytes` (a class size) aligned to 256 bytes, or a non-OK status:
  // RESOURCE_EXHAUSTED means "out of memory" (the cache is then released and the call retried
  // once); any other code is returned to the caller unchanged, without a retry.
  using RawAlloc = std::function<Result<void*>(size_t bytes)>;
  // Gives back a block from RawAlloc with the size it was allocated with.
  using RawFree = std::function<Status(void* ptr, size_t bytes)>;

  // `name` prefixes error messages ("CudaAllocator(device 0)").
  CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free);
  // Gives every block back to the raw allocator, cached and in use alike: pointers handed out by
  // this allocator are invalid afterwards. Errors from RawFree are ignored here.
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // A 256-byte aligned block of at least `bytes`; bytes == 0 returns nullptr (and is no
  // allocation). On failure nothing is allocated and the stats are unchanged except for the
  // failure counters (and the cache, which an out-of-memory retry has released).
  Result<void*> Allocate(size_t bytes);
  // Returns the block to the cache. nullptr is a no-op. INVALID_ARGUMENT (nothing changes) for a
  // pointer that is not an in-use block of this allocator, e.g. on a double free.
  Status Free(void* ptr);
  // Gives every cached free block back to the raw allocator. Returns the first RawFree error;
  // the blocks are forgotten either way.
  Status ReleaseCached();
  CachingAllocatorStats stats() const;

 private:
  struct Block {
    size_t size = 0;       // class size (what RawAlloc was called with)
    size_t requested = 0;  // bytes of the Allocate call that holds it (when in use)
    bool in_use = false;
  };

  Status ReleaseCachedLocked();
  Result<void*> RawAllocateLocked(size_t block_size);

  const std::string name_;
  const RawAlloc raw_alloc_;
  const RawFree raw_free_;

  mutable std::mutex mu_;
  std::unordered_map<void*, Block> blocks_;    // every block we hold; guarded by mu_
  std::multimap<size_t, void*> free_by_size_;  // the cached ones, by class size; mu_
  CachingAllocatorStats stats_;                // cached_* filled in by stats(); mu_
};

}  // namespace strata::model
