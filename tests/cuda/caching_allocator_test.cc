// The caching policy behind CudaAllocator (model/cuda/caching_allocator.h), driven by a fake
// "device" made of host memory with a capacity, so every test here runs without a GPU.
#include "model/cuda/caching_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

namespace strata::model {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// Host memory posing as device memory: a byte budget, counters, and switches for failures.
class FakeDevice {
 public:
  explicit FakeDevice(size_t capacity = SIZE_MAX) : capacity_(capacity) {}
  ~FakeDevice() {
    for (const auto& [ptr, block] : live_) std::free(block.base);
  }

  CachingAllocator::RawAlloc alloc() {
    return [this](size_t bytes) -> Result<void*> {
      ++alloc_calls;
      if (!next_error.ok()) return next_error;
      if (bytes > capacity_ - used) {
        return ResourceExhausted("fake device: " + std::to_string(bytes) + " bytes do not fit");
      }
      const size_t shift = misalign ? 16 : 0;
      void* base =
          std::aligned_alloc(kCachingAllocatorAlignment, bytes + kCachingAllocatorAlignment);
      if (base == nullptr) return Internal("host out of memory");
      void* ptr = static_cast<char*>(base) + shift;
      live_[ptr] = Live{base, bytes};
      used += bytes;
      ++mallocs;
      return ptr;
    };
  }

  CachingAllocator::RawFree free() {
    return [this](void* ptr, size_t bytes) -> Status {
      auto it = live_.find(ptr);
      if (it == live_.end()) return Internal("fake device: free of an unknown pointer");
      if (it->second.bytes != bytes) return Internal("fake device: free with the wrong size");
      std::free(it->second.base);
      used -= bytes;
      live_.erase(it);
      ++frees;
      return Status::Ok();
    };
  }

  size_t live_blocks() const { return live_.size(); }

  size_t used = 0;
  int64_t alloc_calls = 0;  // attempts, failed ones included
  int64_t mallocs = 0;
  int64_t frees = 0;
  Status next_error;  // returned by every alloc while non-OK
  bool misalign = false;

 private:
  struct Live {
    void* base;
    size_t bytes;
  };
  const size_t capacity_;
  std::map<void*, Live> live_;
};

void* MustAllocate(CachingAllocator& a, size_t bytes) {
  Result<void*> r = a.Allocate(bytes);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : nullptr;
}

TEST(CachingAllocatorTest, SizeClasses) {
  EXPECT_EQ(CachingAllocatorBlockSize(0), 0u);
  EXPECT_EQ(CachingAllocatorBlockSize(1), 512u);
  EXPECT_EQ(CachingAllocatorBlockSize(512), 512u);
  EXPECT_EQ(CachingAllocatorBlockSize(513), 1024u);
  EXPECT_EQ(CachingAllocatorBlockSize(1000), 1024u);
  EXPECT_EQ(CachingAllocatorBlockSize(kMiB - 1), kMiB);
  EXPECT_EQ(CachingAllocatorBlockSize(kMiB), kMiB);
  EXPECT_EQ(CachingAllocatorBlockSize(kMiB + 1), 2 * kMiB);
  EXPECT_EQ(CachingAllocatorBlockSize(2 * kMiB), 2 * kMiB);
  EXPECT_EQ(CachingAllocatorBlockSize(2 * kMiB + 1), 4 * kMiB);
  EXPECT_EQ(CachingAllocatorBlockSize(5 * kMiB), 6 * kMiB);
  // Reuse bound: max(size / 8, granule) of slack.
  EXPECT_EQ(CachingAllocatorMaxReuseSize(512), 1024u);
  EXPECT_EQ(CachingAllocatorMaxReuseSize(64 * kKiB), 72 * kKiB);
  EXPECT_EQ(CachingAllocatorMaxReuseSize(2 * kMiB), 4 * kMiB);
  EXPECT_EQ(CachingAllocatorMaxReuseSize(64 * kMiB), 72 * kMiB);
  // Small requests can never be served by a large (>= 2 MiB) block.
  EXPECT_LT(CachingAllocatorMaxReuseSize(kMiB), 2 * kMiB);
}

TEST(CachingAllocatorTest, ZeroBytesIsNullAndAllocatesNothing) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  Result<void*> r = a.Allocate(0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, nullptr);
  EXPECT_TRUE(a.Free(nullptr).ok());
  EXPECT_EQ(dev.alloc_calls, 0);
  EXPECT_EQ(a.stats().allocations, 0);
}

TEST(CachingAllocatorTest, ReusesAFreedBlockOfTheSameClass) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* p = MustAllocate(a, 1000);
  ASSERT_TRUE(a.Free(p).ok());
  EXPECT_EQ(MustAllocate(a, 1000), p);
  ASSERT_TRUE(a.Free(p).ok());
  EXPECT_EQ(MustAllocate(a, 600), p) << "600 and 1000 bytes share the 1024-byte class";
  const CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.raw_allocs, 1);
  EXPECT_EQ(dev.mallocs, 1);
  EXPECT_EQ(s.allocations, 3);
  EXPECT_EQ(s.cache_hits, 2);
  EXPECT_EQ(s.in_use_bytes, 1024u);
  EXPECT_EQ(s.requested_bytes, 600u);
}

TEST(CachingAllocatorTest, BlocksAre256ByteAlignedAndDisjoint) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  std::vector<std::pair<char*, size_t>> blocks;
  for (size_t bytes : {size_t{1}, size_t{255}, size_t{257}, size_t{4097}, size_t{100000}, kMiB + 3,
                       3 * kMiB + 7}) {
    char* p = static_cast<char*>(MustAllocate(a, bytes));
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u) << bytes;
    std::memset(p, 0xab, bytes);  // the whole request is usable
    blocks.emplace_back(p, bytes);
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t i = 1; i < blocks.size(); ++i) {
    EXPECT_LE(blocks[i - 1].first + blocks[i - 1].second, blocks[i].first);
  }
}

TEST(CachingAllocatorTest, BestFitWithinTheWasteBound) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* big = MustAllocate(a, 8 * kMiB);
  void* mid = MustAllocate(a, 4 * kMiB);
  void* one = MustAllocate(a, kMiB);
  ASSERT_TRUE(a.Free(big).ok());
  ASSERT_TRUE(a.Free(mid).ok());
  ASSERT_TRUE(a.Free(one).ok());
  const int64_t mallocs = dev.mallocs;

  // 3 MiB -> class 4 MiB: the 4 MiB block, not the 8 MiB one.
  EXPECT_EQ(MustAllocate(a, 3 * kMiB), mid);
  // 7 MiB -> class 8 MiB: the 8 MiB block.
  EXPECT_EQ(MustAllocate(a, 7 * kMiB), big);
  EXPECT_EQ(dev.mallocs, mallocs);
  // 512 bytes must not pin the cached 1 MiB block: a new small block.
  void* tiny = MustAllocate(a, 512);
  EXPECT_NE(tiny, one);
  EXPECT_EQ(dev.mallocs, mallocs + 1);
  // 960 KiB -> class 960 KiB may take the 1 MiB block (64 KiB over, within 960/8 = 120 KiB).
  EXPECT_EQ(MustAllocate(a, 960 * kKiB), one);
  EXPECT_EQ(dev.mallocs, mallocs + 1);
}

// One training step: persistent parameters, activations kept from forward to backward (freed in
// reverse order), per-layer temporaries, gradient buffers.
void TrainingStep(CachingAllocator& a, int layers, std::vector<void*>& scratch) {
  std::vector<void*> acts;
  for (int l = 0; l < layers; ++l) {
    acts.push_back(MustAllocate(a, 3 * kMiB + 17));  // qkv
    acts.push_back(MustAllocate(a, kMiB));           // attention output
    void* tmp = MustAllocate(a, 12 * kMiB + 1);      // attention scores
    acts.push_back(MustAllocate(a, 4 * kMiB));       // mlp
    EXPECT_TRUE(a.Free(tmp).ok());
    acts.push_back(MustAllocate(a, 3000));  // small stats
  }
  void* logits = MustAllocate(a, 50 * kMiB + 5);
  void* loss = MustAllocate(a, 4);
  EXPECT_TRUE(a.Free(logits).ok());
  for (int l = layers - 1; l >= 0; --l) {
    void* dtmp = MustAllocate(a, 12 * kMiB + 1);
    void* dx = MustAllocate(a, kMiB);
    for (int j = 0; j < 4; ++j) {
      EXPECT_TRUE(a.Free(acts.back()).ok());
      acts.pop_back();
    }
    EXPECT_TRUE(a.Free(dtmp).ok());
    EXPECT_TRUE(a.Free(dx).ok());
  }
  EXPECT_TRUE(a.Free(loss).ok());
  scratch.clear();
}

TEST(CachingAllocatorTest, TrainingStepLoopStopsCallingTheRawAllocator) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  std::vector<void*> params;
  for (int i = 0; i < 10; ++i) params.push_back(MustAllocate(a, (i + 1) * 300 * kKiB));
  std::vector<void*> scratch;
  TrainingStep(a, 4, scratch);
  const CachingAllocatorStats after_first = a.stats();
  for (int step = 1; step < 50; ++step) TrainingStep(a, 4, scratch);
  const CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.raw_allocs, after_first.raw_allocs) << "raw allocations after the first step";
  EXPECT_EQ(s.reserved_bytes, after_first.reserved_bytes);
  EXPECT_EQ(s.peak_in_use_bytes, after_first.peak_in_use_bytes);
  EXPECT_GT(s.cache_hits, after_first.cache_hits);
  EXPECT_EQ(s.raw_frees, 0);
  for (void* p : params) EXPECT_TRUE(a.Free(p).ok());
  EXPECT_EQ(a.stats().in_use_bytes, 0u);
}

// The same random sequence of allocations and frees every "step" (sizes across both pools):
// the raw allocations stop after a few steps and never come back.
TEST(CachingAllocatorTest, RepeatedRandomPatternConverges) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> pick_size(0, 11);
  const size_t sizes[] = {100,  512,      513,      4000,     65536,         700 * kKiB,
                          kMiB, kMiB + 1, 3 * kMiB, 5 * kMiB, 17 * kMiB + 3, 2 * kMiB};
  // A step: 200 operations; each allocates (and later frees) or frees a live block.
  struct Op {
    bool alloc;
    size_t size_or_index;
  };
  std::vector<Op> ops;
  int live = 0;
  for (int i = 0; i < 200; ++i) {
    if (live > 0 && rng() % 3 == 0) {
      ops.push_back({false, static_cast<size_t>(rng() % live)});
      --live;
    } else {
      ops.push_back({true, sizes[pick_size(rng)]});
      ++live;
    }
  }
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  std::vector<int64_t> raw_after;
  for (int step = 0; step < 30; ++step) {
    std::vector<void*> held;
    for (const Op& op : ops) {
      if (op.alloc) {
        held.push_back(MustAllocate(a, op.size_or_index));
      } else {
        ASSERT_TRUE(a.Free(held[op.size_or_index]).ok());
        held.erase(held.begin() + static_cast<ptrdiff_t>(op.size_or_index));
      }
    }
    for (void* p : held) ASSERT_TRUE(a.Free(p).ok());
    raw_after.push_back(a.stats().raw_allocs);
  }
  std::printf("raw allocations after steps 1..5: %lld %lld %lld %lld %lld\n",
              static_cast<long long>(raw_after[0]), static_cast<long long>(raw_after[1]),
              static_cast<long long>(raw_after[2]), static_cast<long long>(raw_after[3]),
              static_cast<long long>(raw_after[4]));
  EXPECT_EQ(raw_after[3], raw_after.back()) << "still allocating after step 4";
  EXPECT_EQ(a.stats().in_use_bytes, 0u);
}

TEST(CachingAllocatorTest, OutOfMemoryReleasesTheCacheAndRetries) {
  FakeDevice dev(8 * kMiB);
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* p4 = MustAllocate(a, 4 * kMiB);
  void* p2 = MustAllocate(a, 2 * kMiB);
  ASSERT_TRUE(a.Free(p4).ok());
  ASSERT_TRUE(a.Free(p2).ok());
  EXPECT_EQ(a.stats().cached_bytes, 6 * kMiB);
  // 6 MiB: no cached block fits; 6 + 6 MiB exceeds the device; after the cache goes, it fits.
  void* p6 = MustAllocate(a, 6 * kMiB);
  ASSERT_NE(p6, nullptr);
  const CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.oom_retries, 1);
  EXPECT_EQ(s.raw_frees, 2);
  EXPECT_EQ(s.raw_alloc_failures, 1);
  EXPECT_EQ(s.reserved_bytes, 6 * kMiB);
  EXPECT_EQ(s.cached_blocks, 0);
  EXPECT_EQ(dev.used, 6 * kMiB);
}

TEST(CachingAllocatorTest, OutOfMemoryAfterTheRetryIsResourceExhausted) {
  FakeDevice dev(4 * kMiB + 1024);
  CachingAllocator a("CudaAllocator(test)", dev.alloc(), dev.free());
  void* held = MustAllocate(a, 3 * kMiB);  // class 4 MiB: the whole device
  void* cached = MustAllocate(a, 1000);
  ASSERT_TRUE(a.Free(cached).ok());  // something to release, which does not help
  const CachingAllocatorStats before = a.stats();
  Result<void*> r = a.Allocate(kMiB);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  const std::string& msg = r.status().message();
  EXPECT_NE(msg.find("CudaAllocator(test)"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(kMiB) + " bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4.0 MiB of it in use"), std::string::npos) << msg;
  const CachingAllocatorStats after = a.stats();
  EXPECT_EQ(after.in_use_bytes, before.in_use_bytes);
  EXPECT_EQ(after.allocations, before.allocations);
  // Still usable: free the big block, then the small one fits (the cache is released for it).
  EXPECT_EQ(after.oom_retries, 1);
  EXPECT_EQ(after.cached_blocks, 0);
  ASSERT_TRUE(a.Free(held).ok());
  EXPECT_NE(MustAllocate(a, kMiB), nullptr);
}

TEST(CachingAllocatorTest, OtherRawErrorsPropagateWithoutRetry) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* p = MustAllocate(a, 4096);
  ASSERT_TRUE(a.Free(p).ok());
  dev.next_error = Internal("device lost");
  Result<void*> r = a.Allocate(8 * kMiB);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
  EXPECT_NE(r.status().message().find("device lost"), std::string::npos);
  EXPECT_EQ(a.stats().oom_retries, 0);
  EXPECT_EQ(a.stats().cached_blocks, 1) << "the cache is kept on a non-OOM error";
  dev.next_error = Status::Ok();
  EXPECT_EQ(MustAllocate(a, 4096), p);
}

TEST(CachingAllocatorTest, MisalignedRawBlockIsRejected) {
  FakeDevice dev;
  dev.misalign = true;
  CachingAllocator a("test", dev.alloc(), dev.free());
  Result<void*> r = a.Allocate(1000);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
  EXPECT_EQ(dev.live_blocks(), 0u) << "the misaligned block is given back";
  EXPECT_EQ(a.stats().reserved_bytes, 0u);
}

TEST(CachingAllocatorTest, DoubleFreeAndForeignPointersAreRejected) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* p = MustAllocate(a, 100);
  ASSERT_TRUE(a.Free(p).ok());
  Status st = a.Free(p);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("double free"), std::string::npos) << st.message();
  int local = 0;
  EXPECT_EQ(a.Free(&local).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a.stats().cached_blocks, 1);
  EXPECT_EQ(a.stats().in_use_bytes, 0u);
}

TEST(CachingAllocatorTest, StatsTrackUseCacheAndPeak) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* p1 = MustAllocate(a, 1000);      // 1024
  void* p2 = MustAllocate(a, 3 * kMiB);  // 4 MiB
  CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.in_use_bytes, 1024 + 4 * kMiB);
  EXPECT_EQ(s.requested_bytes, 1000 + 3 * kMiB);
  EXPECT_EQ(s.reserved_bytes, 1024 + 4 * kMiB);
  EXPECT_EQ(s.cached_bytes, 0u);
  ASSERT_TRUE(a.Free(p2).ok());
  s = a.stats();
  EXPECT_EQ(s.in_use_bytes, 1024u);
  EXPECT_EQ(s.requested_bytes, 1000u);
  EXPECT_EQ(s.cached_bytes, 4 * kMiB);
  EXPECT_EQ(s.cached_blocks, 1);
  EXPECT_EQ(s.peak_in_use_bytes, 1024 + 4 * kMiB);
  ASSERT_TRUE(a.Free(p1).ok());
  EXPECT_EQ(a.stats().peak_in_use_bytes, 1024 + 4 * kMiB);
  EXPECT_EQ(a.stats().in_use_bytes, 0u);
}

TEST(CachingAllocatorTest, ReleaseCachedKeepsBlocksInUse) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  void* keep = MustAllocate(a, 5000);
  void* drop1 = MustAllocate(a, 6000);
  void* drop2 = MustAllocate(a, 3 * kMiB);
  ASSERT_TRUE(a.Free(drop1).ok());
  ASSERT_TRUE(a.Free(drop2).ok());
  ASSERT_TRUE(a.ReleaseCached().ok());
  const CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.raw_frees, 2);
  EXPECT_EQ(s.reserved_bytes, s.in_use_bytes);
  EXPECT_EQ(s.cached_blocks, 0);
  EXPECT_EQ(dev.live_blocks(), 1u);
  std::memset(keep, 1, 5000);  // still valid
  ASSERT_TRUE(a.Free(keep).ok());
}

TEST(CachingAllocatorTest, DestructorGivesEverythingBack) {
  FakeDevice dev;
  {
    CachingAllocator a("test", dev.alloc(), dev.free());
    void* cached = MustAllocate(a, 100);
    ASSERT_TRUE(a.Free(cached).ok());
    MustAllocate(a, 4 * kMiB);  // still in use at destruction
    EXPECT_EQ(dev.live_blocks(), 2u);
  }
  EXPECT_EQ(dev.live_blocks(), 0u);
  EXPECT_EQ(dev.used, 0u);
}

TEST(CachingAllocatorTest, AbsurdRequestIsRefusedWithoutTouchingTheDevice) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  Result<void*> r = a.Allocate(SIZE_MAX);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(dev.alloc_calls, 0);
}

TEST(CachingAllocatorTest, ConcurrentUseKeepsTheBooksStraight) {
  FakeDevice dev;
  CachingAllocator a("test", dev.alloc(), dev.free());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&a, t] {
      std::vector<void*> mine;
      for (int i = 0; i < 2000; ++i) {
        Result<void*> r = a.Allocate(static_cast<size_t>(512 * (1 + (i + t) % 7)));
        if (r.ok()) mine.push_back(*r);
        if (mine.size() > 5) {
          a.Free(mine.front()).IgnoreError();
          mine.erase(mine.begin());
        }
      }
      for (void* p : mine) a.Free(p).IgnoreError();
    });
  }
  for (auto& th : threads) th.join();
  const CachingAllocatorStats s = a.stats();
  EXPECT_EQ(s.allocations, 8000);
  EXPECT_EQ(s.in_use_bytes, 0u);
  EXPECT_EQ(s.requested_bytes, 0u);
  EXPECT_EQ(s.reserved_bytes, s.cached_bytes);
}

}  // namespace
}  // namespace strata::model
