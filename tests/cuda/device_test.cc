// Device memory, streams, events and copies (model/cuda/device_cuda.h) on a real GPU, plus the
// behaviour without one: every Create returns UNAVAILABLE, argument checks need no device.
// The caching policy itself is tested without a GPU in caching_allocator_test.cc.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "model/cuda/caching_allocator.h"
#include "model/cuda/device_cuda.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaDeviceTest, CreateAnswersUnavailableWithoutADevice) {
  const int count = CudaDeviceCount();
  auto alloc = CudaAllocator::Create(0);
  auto stream = CudaStream::Create();
  auto event = CudaEvent::Create();
  auto pinned = CudaAllocPinnedHost(64);
  const Status set = CudaSetDevice(0);
  if (count == 0) {
    EXPECT_EQ(alloc.status().code(), StatusCode::kUnavailable) << alloc.status().ToString();
    EXPECT_EQ(stream.status().code(), StatusCode::kUnavailable) << stream.status().ToString();
    EXPECT_EQ(event.status().code(), StatusCode::kUnavailable) << event.status().ToString();
    EXPECT_EQ(pinned.status().code(), StatusCode::kUnavailable) << pinned.status().ToString();
    EXPECT_EQ(set.code(), StatusCode::kUnavailable) << set.ToString();
    std::printf("no CUDA device: CudaAllocator::Create says %s\n",
                alloc.status().ToString().c_str());
  } else {
    EXPECT_TRUE(alloc.ok()) << alloc.status().ToString();
    EXPECT_TRUE(stream.ok()) << stream.status().ToString();
    EXPECT_TRUE(event.ok()) << event.status().ToString();
    EXPECT_TRUE(pinned.ok()) << pinned.status().ToString();
    EXPECT_TRUE(set.ok()) << set.ToString();
  }
}

TEST(CudaDeviceTest, ArgumentChecksNeedNoDevice) {
  char host[16] = {};
  // Null pointers with bytes > 0: rejected before any CUDA call.
  EXPECT_EQ(CudaCopyHostToDevice(nullptr, host, 16, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaCopyDeviceToHost(host, nullptr, 16, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaCopyDeviceToDevice(nullptr, nullptr, 1, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaMemsetZero(nullptr, 8, nullptr).code(), StatusCode::kInvalidArgument);
  // Zero bytes: nothing to do, OK.
  EXPECT_TRUE(CudaCopyHostToDevice(nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaCopyDeviceToHost(nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaCopyDeviceToDevice(nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaMemsetZero(nullptr, 0, nullptr).ok());
  auto pinned = CudaAllocPinnedHost(0);
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  EXPECT_EQ(pinned->get(), nullptr);
  // Empty (default / moved-from) handles.
  CudaStream stream;
  EXPECT_EQ(stream.get(), nullptr);
  EXPECT_EQ(stream.Synchronize().code(), StatusCode::kFailedPrecondition);
  CudaEvent event;
  EXPECT_EQ(event.Record(nullptr).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(event.WaitOn(nullptr).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(event.Synchronize().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(event.Query().status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(CudaEvent::ElapsedMs(event, event).status().code(), StatusCode::kFailedPrecondition);
  // Bad device indices.
  EXPECT_NE(CudaSetDevice(-1).code(), StatusCode::kOk);
  EXPECT_NE(CudaAllocator::Create(-1).status().code(), StatusCode::kOk);
}

// ---- needs a GPU ----------------------------------------------------------------------------

TEST(CudaDeviceGpuTest, DeviceIndexOutOfRangeIsInvalidArgument) {
  STRATA_REQUIRE_GPU();
  const int count = CudaDeviceCount();
  EXPECT_EQ(CudaSetDevice(count).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaAllocator::Create(count).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(CudaSetDevice(0).ok());
}

TEST(CudaDeviceGpuTest, AllocatorRoundTripsDataAndReusesBlocks) {
  STRATA_REQUIRE_GPU();
  auto alloc = CudaAllocator::Create(0);
  ASSERT_TRUE(alloc.ok()) << alloc.status().ToString();
  CudaAllocator& a = **alloc;
  auto stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status().ToString();

  const size_t n = 300001;  // odd, not a class size
  std::vector<float> host(n);
  std::iota(host.begin(), host.end(), 1.f);
  auto dev = a.Allocate(n * sizeof(float));
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(*dev) % 256, 0u);
  ASSERT_TRUE(CudaCopyHostToDevice(*dev, host.data(), n * sizeof(float), stream->get()).ok());
  std::vector<float> back(n, -1.f);
  ASSERT_TRUE(CudaCopyDeviceToHost(back.data(), *dev, n * sizeof(float), stream->get()).ok());
  ASSERT_TRUE(stream->Synchronize().ok());
  EXPECT_EQ(back, host);

  const CudaAllocatorStats s1 = a.stats();
  EXPECT_EQ(s1.device_mallocs, 1);
  EXPECT_EQ(s1.in_use_bytes, CachingAllocatorBlockSize(n * sizeof(float)));
  a.Free(*dev);
  auto again = a.Allocate(n * sizeof(float));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *dev);
  EXPECT_EQ(a.stats().device_mallocs, 1);
  a.Free(*again);

  auto zero = a.Allocate(0);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(*zero, nullptr);
  a.Free(nullptr);
}

TEST(CudaDeviceGpuTest, StepLoopDoesNoDeviceMallocAfterTheFirstStep) {
  STRATA_REQUIRE_GPU();
  auto alloc = CudaAllocator::Create(0);
  ASSERT_TRUE(alloc.ok()) << alloc.status().ToString();
  CudaAllocator& a = **alloc;
  const size_t sizes[] = {4096, 3 << 20, 123457, 48 << 20, 512, (1 << 20) + 1};
  int64_t mallocs_after_first = -1;
  for (int step = 0; step < 20; ++step) {
    std::vector<void*> live;
    for (size_t s : sizes) {
      auto p = a.Allocate(s);
      ASSERT_TRUE(p.ok()) << p.status().ToString();
      ASSERT_TRUE(CudaMemsetZero(*p, s, nullptr).ok());
      live.push_back(*p);
    }
    for (auto it = live.rbegin(); it != live.rend(); ++it) a.Free(*it);
    if (step == 0) mallocs_after_first = a.stats().device_mallocs;
  }
  ASSERT_TRUE(CudaStreamSynchronize(nullptr).ok());
  EXPECT_EQ(a.stats().device_mallocs, mallocs_after_first);
  EXPECT_EQ(a.stats().in_use_bytes, 0u);
  const size_t reserved = a.stats().reserved_bytes;
  EXPECT_GT(reserved, 0u);
  ASSERT_TRUE(a.ReleaseCached().ok());
  EXPECT_EQ(a.stats().reserved_bytes, 0u);
}

TEST(CudaDeviceGpuTest, OutOfMemoryIsResourceExhaustedAndTheAllocatorSurvives) {
  STRATA_REQUIRE_GPU();
  auto alloc = CudaAllocator::Create(0);
  ASSERT_TRUE(alloc.ok()) << alloc.status().ToString();
  CudaAllocator& a = **alloc;
  auto small = a.Allocate(1 << 20);
  ASSERT_TRUE(small.ok());
  a.Free(*small);                           // cached: released by the retry
  auto huge = a.Allocate(size_t{1} << 46);  // 64 TiB: no GPU has it
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), StatusCode::kResourceExhausted) << huge.status().ToString();
  EXPECT_NE(huge.status().message().find(std::to_string(size_t{1} << 46)), std::string::npos)
      << huge.status().message();
  std::printf("%s\n", huge.status().ToString().c_str());
  EXPECT_EQ(a.stats().reserved_bytes, 0u) << "the cache was released for the retry";
  // The failed cudaMalloc left no error behind: the allocator and other CUDA calls still work.
  auto ok = a.Allocate(4096);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  ASSERT_TRUE(CudaMemsetZero(*ok, 4096, nullptr).ok());
  ASSERT_TRUE(CudaStreamSynchronize(nullptr).ok());
  a.Free(*ok);
}

TEST(CudaDeviceGpuTest, EventsOrderTwoStreamsWithoutHostSync) {
  STRATA_REQUIRE_GPU();
  auto alloc = CudaAllocator::Create(0);
  ASSERT_TRUE(alloc.ok());
  auto s1 = CudaStream::Create();
  auto s2 = CudaStream::Create();
  ASSERT_TRUE(s1.ok() && s2.ok());
  auto done = CudaEvent::Create();
  ASSERT_TRUE(done.ok()) << done.status().ToString();

  const size_t bytes = size_t{64} << 20;
  auto pinned_src = CudaAllocPinnedHost(bytes);
  auto pinned_dst = CudaAllocPinnedHost(bytes);
  ASSERT_TRUE(pinned_src.ok() && pinned_dst.ok());
  auto* src = static_cast<uint8_t*>(pinned_src->get());
  auto* dst = static_cast<uint8_t*>(pinned_dst->get());
  for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  std::memset(dst, 0, bytes);

  auto a = (*alloc)->Allocate(bytes);
  auto b = (*alloc)->Allocate(bytes);
  ASSERT_TRUE(a.ok() && b.ok());
  // s1: upload into a; s2 waits on the event, then copies a -> b and downloads b.
  ASSERT_TRUE(CudaCopyHostToDevice(*a, src, bytes, s1->get()).ok());
  ASSERT_TRUE(done->Record(s1->get()).ok());
  ASSERT_TRUE(done->WaitOn(s2->get()).ok());
  ASSERT_TRUE(CudaCopyDeviceToDevice(*b, *a, bytes, s2->get()).ok());
  ASSERT_TRUE(CudaCopyDeviceToHost(dst, *b, bytes, s2->get()).ok());
  ASSERT_TRUE(s2->Synchronize().ok());
  EXPECT_EQ(std::memcmp(src, dst, bytes), 0);
  auto q = done->Query();
  ASSERT_TRUE(q.ok());
  EXPECT_TRUE(*q);

  // Memset on a stream, then check the zeros.
  ASSERT_TRUE(CudaMemsetZero(*b, bytes, s1->get()).ok());
  ASSERT_TRUE(CudaCopyDeviceToHost(dst, *b, bytes, s1->get()).ok());
  ASSERT_TRUE(s1->Synchronize().ok());
  EXPECT_TRUE(std::all_of(dst, dst + bytes, [](uint8_t v) { return v == 0; }));

  (*alloc)->Free(*a);
  (*alloc)->Free(*b);
}

TEST(CudaDeviceGpuTest, TimingEventsMeasureElapsedTime) {
  STRATA_REQUIRE_GPU();
  auto s = CudaStream::Create();
  ASSERT_TRUE(s.ok());
  auto start = CudaEvent::Create(/*timing=*/true);
  auto end = CudaEvent::Create(/*timing=*/true);
  ASSERT_TRUE(start.ok() && end.ok());
  auto buf = DeviceBuffer::Allocate(size_t{256} << 20);
  ASSERT_TRUE(buf.ok());
  ASSERT_TRUE(start->Record(s->get()).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(CudaMemsetZero(buf->data(), buf->size(), s->get()).ok());
  ASSERT_TRUE(end->Record(s->get()).ok());
  ASSERT_TRUE(end->Synchronize().ok());
  auto ms = CudaEvent::ElapsedMs(*start, *end);
  ASSERT_TRUE(ms.ok()) << ms.status().ToString();
  EXPECT_GT(*ms, 0.f);
  std::printf("4 x memset of 256 MiB: %.3f ms\n", *ms);
  // Events made without timing cannot be timed: an error, not a crash.
  auto plain = CudaEvent::Create();
  ASSERT_TRUE(plain.ok());
  ASSERT_TRUE(plain->Record(s->get()).ok());
  ASSERT_TRUE(plain->Synchronize().ok());
  EXPECT_FALSE(CudaEvent::ElapsedMs(*start, *plain).ok());
}

TEST(CudaDeviceGpuTest, HandlesMoveAndDestroyCleanly) {
  STRATA_REQUIRE_GPU();
  auto s = CudaStream::Create();
  ASSERT_TRUE(s.ok());
  void* raw = s->get();
  EXPECT_NE(raw, nullptr);
  CudaStream moved = std::move(*s);
  EXPECT_EQ(moved.get(), raw);
  EXPECT_EQ(s->get(), nullptr);
  CudaStream other;
  other = std::move(moved);
  EXPECT_EQ(other.get(), raw);
  EXPECT_TRUE(other.Synchronize().ok());

  auto e = CudaEvent::Create();
  ASSERT_TRUE(e.ok());
  CudaEvent e2 = std::move(*e);
  EXPECT_EQ(e->get(), nullptr);
  EXPECT_TRUE(e2.Record(other.get()).ok());
  EXPECT_TRUE(e2.Synchronize().ok());
}

}  // namespace
}  // namespace strata::model
