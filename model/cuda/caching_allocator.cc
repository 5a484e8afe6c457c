#include "model/cuda/caching_allocator.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>

namespace strata::model {
namespace {

size_t RoundUp(size_t bytes, size_t granule) { return (bytes + granule - 1) / granule * granule; }

std::string MiB(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

}  // namespace

size_t CachingAllocatorBlockSize(size_t bytes) {
  if (bytes == 0) return 0;
  return bytes <= kSmallBlockLimit ? RoundUp(bytes, kSmallBlockGranule)
                                   : RoundUp(bytes, kLargeBlockGranule);
}

size_t CachingAllocatorMaxReuseSize(size_t block_size) {
  const size_t granule = block_size <= kSmallBlockLimit ? kSmallBlockGranule : kLargeBlockGranule;
  return block_size + std::max(block_size / 8, granule);
}

CachingAllocator::CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free)
    : name_(std::move(name)), raw_alloc_(std::move(raw_alloc)), raw_free_(std::move(raw_free)) {}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [ptr, block] : blocks_) raw_free_(ptr, block.size).IgnoreError();
}

Result<void*> CachingAllocator::RawAllocateLocked(size_t block_size) {
  Result<void*> raw = raw_alloc_(block_size);
  if (!raw.ok()) {
    ++stats_.raw_alloc_failures;
    return raw.status();
  }
  void* ptr = *raw;
  if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % kCachingAllocatorAlignment != 0) {
    if (ptr != nullptr) raw_free_(ptr, block_size).IgnoreError();
    ++stats_.raw_alloc_failures;
    return Internal(name_ + ": the raw allocator returned " +
                    (ptr == nullptr ? std::string("nullptr")
                                    : "a pointer not aligned to " +
                                          std::to_string(kCachingAllocatorAlignment) + " bytes") +
                    " for " + std::to_string(block_size) + " bytes");
  }
  ++stats_.raw_allocs;
  stats_.reserved_bytes += block_size;
  return ptr;
}

Result<void*> CachingAllocator::Allocate(size_t bytes) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  if (bytes > kCachingAllocatorMaxBytes) {
    return ResourceExhausted(name_ + ": cannot allocate " + std::to_string(bytes) +
                             " bytes (more than the allocator's limit of " +
                             std::to_string(kCachingAllocatorMaxBytes) + ")");
  }
  const size_t block_size = CachingAllocatorBlockSize(bytes);

  std::lock_guard<std::mutex> lock(mu_);
  void* ptr = nullptr;
  auto it = free_by_size_.lower_bound(block_size);
  if (it != free_by_size_.end() && it->first <= CachingAllocatorMaxReuseSize(block_size)) {
    ptr = it->second;
    free_by_size_.erase(it);
    ++stats_.cache_hits;
  } else {
    Result<void*> raw = RawAllocateLocked(block_size);
    if (!raw.ok() && raw.status().code() == StatusCode::kResourceExhausted &&
        !free_by_size_.empty()) {
      // Cached blocks of other sizes may be what stands in the way: give them back, try again.
      ++stats_.oom_retries;
      ReleaseCachedLocked().IgnoreError();
      raw = RawAllocateLocked(block_size);
    }
    if (!raw.ok()) {
      if (raw.status().code() != StatusCode::kResourceExhausted) {
        return raw.status().WithContext(name_ + ": allocating " + std::to_string(bytes) + " bytes");
      }
      return ResourceExhausted(
          name_ + ": out of memory allocating " + std::to_string(bytes) + " bytes (block of " +
          std::to_string(block_size) + " bytes) after releasing the cache; this allocator holds " +
          MiB(stats_.reserved_bytes) + ", " + MiB(stats_.in_use_bytes) + " of it in use (peak " +
          MiB(stats_.peak_in_use_bytes) + "): " + raw.status().message());
    }
    ptr = *raw;
    blocks_.emplace(ptr, Block{block_size, 0, false});
  }

  Block& block = blocks_.at(ptr);
  block.in_use = true;
  block.requested = bytes;
  ++stats_.allocations;
  stats_.in_use_bytes += block.size;
  stats_.requested_bytes += bytes;
  stats_.peak_in_use_bytes = std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes);
  return ptr;
}

Status CachingAllocator::Free(void* ptr) {
  if (ptr == nullptr) return Status::Ok();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = blocks_.find(ptr);
  if (it == blocks_.end() || !it->second.in_use) {
    return InvalidArgument(
        name_ + ": Free of a pointer that is not an allocated block" +
        (it == blocks_.end() ? std::string(" of this allocator") : std::string(" (double free)")));
  }
  Block& block = it->second;
  block.in_use = false;
  stats_.in_use_bytes -= block.size;
  stats_.requested_bytes -= block.requested;
  block.requested = 0;
  free_by_size_.emplace(block.size, ptr);
  return Status::Ok();
}

Status CachingAllocator::ReleaseCached() {
  std::lock_guard<std::mutex> lock(mu_);
  return ReleaseCachedLocked();
}

Status CachingAllocator::ReleaseCachedLocked() {
  Status first;
  for (const auto& [size, ptr] : free_by_size_) {
    Status st = raw_free_(ptr, size);
    if (first.ok() && !st.ok()) first = st.WithContext(name_ + ": releasing a cached block");
    blocks_.erase(ptr);
    ++stats_.raw_frees;
    stats_.reserved_bytes -= size;
  }
  free_by_size_.clear();
  return first;
}

CachingAllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CachingAllocatorStats s = stats_;
  s.cached_bytes = s.reserved_bytes - s.in_use_bytes;
  s.cached_blocks = static_cast<int64_t>(free_by_size_.size());
  return s;
}

}  // namespace strata::model
