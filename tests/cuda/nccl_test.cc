// The NCCL backend (comm/nccl.h) and the host-staging adapter (comm/device_staged.h).
//
// Without a GPU (or a driver) the GPU tests skip, loudly; what runs everywhere: option checks,
// the no-device answer of CreateNcclGroup, the stub (in builds without NCCL), the helpers'
// refusal of non-NCCL groups, the staging adapter's delegation and its clean failure without a
// device. With one GPU: single-rank collectives against expected values (every element type
// Strata trains in, sizes 0..4 MB), the abort paths (a rank that never joins init; an op that
// never completes, found by Wait and by the watchdog; the process then forms a new group), and
// the staging adapter over the in-process backend with two rank threads on one GPU against
// the CPU result. With two or more GPUs: multi-rank collectives, point-to-point and Split
// through a HashStore rendezvous, and a peer that never issues its collective.
#include "comm/nccl.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/device_staged.h"
#include "comm/inprocess.h"
#include "comm/nccl_testing.h"
#include "comm/store.h"
#include "tests/comm_test_util.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::comm {
namespace {

namespace ct = ::strata::comm::testing;
using model::DeviceBuffer;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

#define ASSERT_OK(expr)                                  \
  do {                                                   \
    const ::strata::Status _s = (expr);                  \
    ASSERT_TRUE(_s.ok()) << #expr ": " << _s.ToString(); \
  } while (0)

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

NcclGroupOptions OneRank(const std::string& name, milliseconds timeout = milliseconds(20000)) {
  NcclGroupOptions o;
  o.name = name;
  o.timeout = timeout;
  return o;
}

// Host bytes -> a new device buffer (at least 1 byte, so data() is never null).
Result<DeviceBuffer> Upload(const std::vector<uint8_t>& host) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(host.size(), 1)));
  if (!host.empty()) RETURN_IF_ERROR(buf.CopyFromHost(host.data(), host.size()));
  return buf;
}

Result<std::vector<uint8_t>> Download(const DeviceBuffer& buf, size_t bytes) {
  std::vector<uint8_t> host(bytes + 1);
  if (bytes > 0) RETURN_IF_ERROR(buf.CopyToHost(host.data(), bytes));
  return host;
}

// An all-reduce of ones over `g` (size 1), checked: the group works.
void ExpectGroupWorks(ProcessGroup& g) {
  const ElemType t = ElemType::kF32;
  auto host = ct::Filled(t, 0, 64);
  auto dev = Upload(host);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  ASSERT_OK(g.AllReduce(dev->data(), 64, t, ReduceOp::kSum)->Wait(milliseconds(20000)));
  auto out = Download(*dev, 64 * sizeof(float));
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  ct::ExpectAll(
      t, out->data(), 64, [&](size_t i) { return ct::Expected(t, ReduceOp::kSum, g.size(), i); },
      "all_reduce after recovery");
}

// ---------------------------------------------------------------- no GPU needed

TEST(NcclOptions, BadOptionsAreInvalidArgumentBeforeAnyDeviceWork) {
  if (!NcclAvailable()) GTEST_SKIP() << "built without NCCL: NcclStub.EverythingIsUnimplemented";
  auto store = MakeHashStore();
  struct Case {
    const char* what;
    std::function<void(NcclGroupOptions&)> edit;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"rank == size", [](NcclGroupOptions& o) { o.rank = 2, o.size = 2; }, "out of range"},
      {"size 0", [](NcclGroupOptions& o) { o.size = 0; }, "out of range"},
      {"negative rank", [](NcclGroupOptions& o) { o.rank = -1; }, "out of range"},
      {"zero timeout", [](NcclGroupOptions& o) { o.timeout = milliseconds(0); }, "timeout"},
      {"negative device", [](NcclGroupOptions& o) { o.device = -1; }, "negative"},
      {"short id", [](NcclGroupOptions& o) { o.unique_id = "abc"; }, "expected 128"},
      {"no rendezvous", [](NcclGroupOptions& o) { o.size = 2; },
       "needs a store or a pre-shared unique id"},
      {"store without prefix",
       [&](NcclGroupOptions& o) {
         o.size = 2;
         o.store = store;
       },
       "needs a key prefix"},
  };
  for (const Case& c : cases) {
    NcclGroupOptions o = OneRank("tp[3]");
    c.edit(o);
    auto g = CreateNcclGroup(o);
    ASSERT_FALSE(g.ok()) << c.what;
    EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument)
        << c.what << ": " << g.status().ToString();
    EXPECT_TRUE(Contains(g.status().message(), "tp[3]")) << g.status().ToString();
    EXPECT_TRUE(Contains(g.status().message(), c.needle))
        << c.what << ": " << g.status().ToString();
  }
}

TEST(NcclOptions, NameDefaultsToThePrefix) {
  if (!NcclAvailable()) GTEST_SKIP() << "built without NCCL: NcclStub.EverythingIsUnimplemented";
  NcclGroupOptions o;
  o.prefix = "job7/gen3/dp";
  o.timeout = milliseconds(0);  // invalid, so the answer comes before any device work
  auto g = CreateNcclGroup(o);
  ASSERT_EQ(g.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(g.status().message(), "job7/gen3/dp")) << g.status().ToString();
}

TEST(NcclOptions, NoDeviceIsUnavailableWithoutWaitingForTheStore) {
  if (!NcclAvailable()) GTEST_SKIP() << "built without NCCL: NcclStub.EverythingIsUnimplemented";
  if (model::CudaDeviceCount() > 0) {
    GTEST_SKIP() << "a CUDA device is visible: the no-device answer cannot be observed here";
  }
  auto g = CreateNcclGroup(OneRank("world"));
  ASSERT_EQ(g.status().code(), StatusCode::kUnavailable) << g.status().ToString();
  EXPECT_TRUE(Contains(g.status().message(), "world")) << g.status().ToString();
  EXPECT_TRUE(Contains(g.status().message(), "CUDA")) << g.status().ToString();
  // Rank 1 of 2 would wait for rank 0's id: the device check comes first, so it fails at once.
  NcclGroupOptions o = OneRank("dp[0]", milliseconds(30000));
  o.rank = 1;
  o.size = 2;
  o.store = MakeHashStore();
  o.prefix = "gen1/dp0";
  const auto start = Clock::now();
  g = CreateNcclGroup(o);
  EXPECT_EQ(g.status().code(), StatusCode::kUnavailable) << g.status().ToString();
  EXPECT_LT(SecondsSince(start), 5.0);
}

TEST(NcclStub, EverythingIsUnimplemented) {
  if (NcclAvailable()) GTEST_SKIP() << "this build has NCCL: the stub is not linked";
  auto g = CreateNcclGroup(OneRank("world"));
  EXPECT_EQ(g.status().code(), StatusCode::kUnimplemented);
  EXPECT_TRUE(Contains(g.status().message(), "NCCL")) << g.status().ToString();
  EXPECT_EQ(NcclUniqueId().status().code(), StatusCode::kUnimplemented);
}

TEST(NcclUniqueIdTest, HasTheDocumentedSizeAndIsFreshEachTime) {
  if (!NcclAvailable()) GTEST_SKIP() << "built without NCCL: NcclStub.EverythingIsUnimplemented";
  auto a = NcclUniqueId();
  auto b = NcclUniqueId();
  if (!a.ok()) {
    // No usable network interface for NCCL's bootstrap: a clean UNAVAILABLE, never a crash.
    EXPECT_EQ(a.status().code(), StatusCode::kUnavailable) << a.status().ToString();
    GTEST_SKIP() << "NCCL could not make an id here: " << a.status().ToString();
  }
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(a->size(), kNcclUniqueIdBytes);
  EXPECT_EQ(b->size(), kNcclUniqueIdBytes);
  EXPECT_NE(*a, *b);
}

// The mpirun mode's exchange, over the in-process backend standing in for MPI.
TEST(NcclUniqueIdTest, SharedOverACpuGroupEveryRankGetsRankZerosId) {
  constexpr int kRanks = 3;
  InProcessWorld world(kRanks);
  std::vector<Result<std::string>> ids(kRanks, Result<std::string>(Internal("unset")));
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      auto g = MakeInProcessGroup(world, r);
      ASSERT_TRUE(g.ok());
      ids[r] = ShareNcclUniqueId(**g, ct::kWait);
    });
  }
  for (auto& t : threads) t.join();
  if (!NcclAvailable()) {
    for (const auto& id : ids) EXPECT_EQ(id.status().code(), StatusCode::kUnimplemented);
    return;
  }
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(ids[r].ok()) << "rank " << r << ": " << ids[r].status().ToString();
    EXPECT_EQ(ids[r]->size(), kNcclUniqueIdBytes);
    EXPECT_EQ(*ids[r], *ids[0]) << "rank " << r;
  }
}

TEST(NcclHelpers, RefuseGroupsOfOtherBackends) {
  InProcessWorld world(1);
  auto g = MakeInProcessGroup(world, 0);
  ASSERT_TRUE(g.ok());
  const StatusCode want =
      NcclAvailable() ? StatusCode::kInvalidArgument : StatusCode::kUnimplemented;
  EXPECT_EQ(SetNcclComputeStream(**g, nullptr).code(), want);
  EXPECT_EQ(NcclStreamWaitForIssued(**g, nullptr).code(), want);
  EXPECT_EQ(NcclStallNextOpForTesting(**g).status().code(), want);
}

// The adapter's own logic, which needs no device: identity, pass-through barrier, count 0,
// argument checks, Split wrapping.
TEST(HostStaging, DelegatesToTheInnerGroup) {
  InProcessWorld world(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto inner = MakeInProcessGroup(world, r);
      ASSERT_TRUE(inner.ok());
      auto g = WrapWithHostStaging(std::move(*inner));
      EXPECT_EQ(g->rank(), r);
      EXPECT_EQ(g->size(), 2);
      EXPECT_EQ(g->name(), "world");
      EXPECT_TRUE(g->Barrier()->Wait(ct::kWait).ok());
      EXPECT_TRUE(g->AllReduce(nullptr, 0, ElemType::kF32, ReduceOp::kSum)->Wait(ct::kWait).ok());
      EXPECT_EQ(g->AllReduce(nullptr, 4, ElemType::kF32, ReduceOp::kSum)->Wait(ct::kWait).code(),
                StatusCode::kInvalidArgument);
      int dummy = 0;
      EXPECT_EQ(g->Broadcast(&dummy, 1, ElemType::kI32, 5)->Wait(ct::kWait).code(),
                StatusCode::kInvalidArgument);
      auto sub = g->Split({r}, "solo" + std::to_string(r));
      ASSERT_TRUE(sub.ok()) << sub.status().ToString();
      EXPECT_EQ((*sub)->size(), 1);
      EXPECT_EQ((*sub)->name(), "solo" + std::to_string(r));
      EXPECT_TRUE((*sub)->Barrier()->Wait(ct::kWait).ok());
    });
  }
  for (auto& t : threads) t.join();
}

TEST(HostStaging, WithoutADeviceOpsFailCleanly) {
  if (model::CudaDeviceCount() > 0) {
    GTEST_SKIP() << "a CUDA device is visible: HostStagingGpu covers the adapter";
  }
  InProcessWorld world(1);
  auto inner = MakeInProcessGroup(world, 0);
  ASSERT_TRUE(inner.ok());
  auto g = WrapWithHostStaging(std::move(*inner));
  std::vector<float> buf(4, 1.f);
  Status s = g->AllReduce(buf.data(), 4, ElemType::kF32, ReduceOp::kSum)->Wait(ct::kWait);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "world: all_reduce")) << s.ToString();
  // The group itself is fine: a barrier (nothing to stage) still works.
  EXPECT_TRUE(g->Barrier()->Wait(ct::kWait).ok());
}

// ---------------------------------------------------------------- one GPU

struct Shape {
  ElemType type;
  size_t count;
};

class NcclSingleRank : public ::testing::TestWithParam<Shape> {};

TEST_P(NcclSingleRank, CollectivesMatchExpectedValues) {
  STRATA_REQUIRE_GPU();
  const ElemType t = GetParam().type;
  const size_t n = GetParam().count;
  const size_t bytes = n * ElemSize(t);
  const milliseconds wait(20000);
  auto group = CreateNcclGroup(OneRank("single"));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  ProcessGroup& g = **group;
  ASSERT_EQ(g.size(), 1);
  ASSERT_EQ(g.rank(), 0);
  const std::string shape = std::string(ct::TypeName(t)) + " x" + std::to_string(n);

  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
    auto host = ct::Filled(t, 0, n);
    auto dev = Upload(host);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    ASSERT_OK(g.AllReduce(dev->data(), n, t, op)->Wait(wait));
    auto out = Download(*dev, bytes);
    ASSERT_TRUE(out.ok());
    ct::ExpectAll(
        t, out->data(), n, [&](size_t i) { return ct::Expected(t, op, 1, i); },
        "all_reduce " + std::string(ct::OpName(op)) + " " + shape);
  }
  {  // reduce-scatter: one rank's block is the whole input
    auto in = Upload(ct::Filled(t, 0, n, 1));
    auto out = Upload(std::vector<uint8_t>(bytes, 0xAB));
    ASSERT_TRUE(in.ok() && out.ok());
    ASSERT_OK(g.ReduceScatter(in->data(), out->data(), n, t, ReduceOp::kSum)->Wait(wait));
    auto host = Download(*out, bytes);
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        t, host->data(), n, [&](size_t i) { return ct::Expected(t, ReduceOp::kSum, 1, i, 1); },
        "reduce_scatter " + shape);
  }
  {  // all-gather: block 0 is the input
    auto in = Upload(ct::Filled(t, 0, n, 2));
    auto out = Upload(std::vector<uint8_t>(bytes, 0xAB));
    ASSERT_TRUE(in.ok() && out.ok());
    ASSERT_OK(g.AllGather(in->data(), out->data(), n, t)->Wait(wait));
    auto host = Download(*out, bytes);
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        t, host->data(), n, [&](size_t i) { return double(ct::Val(t, 0, i, 2)); },
        "all_gather " + shape);
  }
  {  // broadcast from the only rank leaves the buffer as it was
    auto dev = Upload(ct::Filled(t, 0, n, 3));
    ASSERT_TRUE(dev.ok());
    ASSERT_OK(g.Broadcast(dev->data(), n, t, 0)->Wait(wait));
    auto host = Download(*dev, bytes);
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        t, host->data(), n, [&](size_t i) { return double(ct::Val(t, 0, i, 3)); },
        "broadcast " + shape);
  }
  ASSERT_OK(g.Barrier()->Wait(wait));
}

INSTANTIATE_TEST_SUITE_P(
    TypesAndSizes, NcclSingleRank,
    ::testing::Values(Shape{ElemType::kF32, 0}, Shape{ElemType::kF32, 1},
                      Shape{ElemType::kF32, 1000}, Shape{ElemType::kF32, 1 << 20},
                      Shape{ElemType::kBF16, 0}, Shape{ElemType::kBF16, 7},
                      Shape{ElemType::kBF16, 4097}, Shape{ElemType::kBF16, 1 << 21},
                      Shape{ElemType::kF16, 1}, Shape{ElemType::kF16, 4097},
                      Shape{ElemType::kF16, 1 << 21}, Shape{ElemType::kI32, 333},
                      Shape{ElemType::kF64, 333}, Shape{ElemType::kU8, 333}),
    [](const ::testing::TestParamInfo<Shape>& info) {
      return std::string(ct::TypeName(info.param.type)) + "_" + std::to_string(info.param.count);
    });

TEST(NcclGpu, ManyOpsInFlightWaitedInReverse) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("many"));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  const ElemType t = ElemType::kF32;
  const size_t n = 4096;
  std::vector<DeviceBuffer> bufs;
  std::vector<std::unique_ptr<Work>> works;
  for (int k = 0; k < 16; ++k) {
    auto dev = Upload(ct::Filled(t, 0, n, k));
    ASSERT_TRUE(dev.ok());
    bufs.push_back(std::move(*dev));
    works.push_back((*group)->AllReduce(bufs.back().data(), n, t, ReduceOp::kMax));
  }
  for (int k = 15; k >= 0; --k) ASSERT_OK(works[k]->Wait(milliseconds(20000)));
  for (int k = 0; k < 16; ++k) {
    auto host = Download(bufs[k], n * sizeof(float));
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        t, host->data(), n, [&](size_t i) { return double(ct::Val(t, 0, i, k)); },
        "op " + std::to_string(k));
  }
}

TEST(NcclGpu, AbortFailsLaterOpsAtOnce) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("tp[1]"));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  (*group)->Abort();
  (*group)->Abort();  // idempotent
  auto dev = Upload(ct::Filled(ElemType::kF32, 0, 8));
  ASSERT_TRUE(dev.ok());
  const auto start = Clock::now();
  Status s = (*group)
                 ->AllReduce(dev->data(), 8, ElemType::kF32, ReduceOp::kSum)
                 ->Wait(milliseconds(20000));
  EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "tp[1]: all_reduce")) << s.ToString();
  EXPECT_LT(SecondsSince(start), 1.0);
  EXPECT_FALSE((*group)->Split({0}, "sub").ok());
}

TEST(NcclGpu, SplitOfOneRank) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("world"));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  auto sub = (*group)->Split({0}, "dp[0]");
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  EXPECT_EQ((*sub)->name(), "dp[0]");
  EXPECT_EQ((*sub)->size(), 1);
  ExpectGroupWorks(**sub);
  ExpectGroupWorks(**group);
  EXPECT_EQ((*group)->Split({1}, "bad").status().code(), StatusCode::kInvalidArgument);
}

// The peer never joins: init ends with DEADLINE_EXCEEDED within the timeout, the half-made
// communicator is aborted, and the process forms a working group afterwards.
TEST(NcclGpu, InitTimesOutWhenARankNeverJoins) {
  STRATA_REQUIRE_GPU();
  NcclGroupOptions o = OneRank("world", milliseconds(1500));
  o.size = 2;
  o.store = MakeHashStore();
  o.prefix = "gen1/world";
  const auto start = Clock::now();
  auto g = CreateNcclGroup(o);
  const double took = SecondsSince(start);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), StatusCode::kDeadlineExceeded) << g.status().ToString();
  EXPECT_TRUE(Contains(g.status().message(), "world")) << g.status().ToString();
  EXPECT_TRUE(Contains(g.status().message(), "1500 ms")) << g.status().ToString();
  EXPECT_GE(took, 1.4);
  EXPECT_LT(took, 10.0) << "ncclCommAbort of the half-made communicator took too long";
  // Rank 1 would find the id rank 0 published.
  EXPECT_TRUE(o.store->Get("gen1/world/nccl_id", milliseconds(0)).ok());

  // Same with a pre-shared id (mpirun mode) from rank 1's side.
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  NcclGroupOptions p = OneRank("mpi-world", milliseconds(1000));
  p.size = 2;
  p.rank = 1;
  p.unique_id = *id;
  g = CreateNcclGroup(p);
  EXPECT_EQ(g.status().code(), StatusCode::kDeadlineExceeded) << g.status().ToString();

  auto fresh = CreateNcclGroup(OneRank("world-again"));
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  ExpectGroupWorks(**fresh);
}

// An op that never completes (its comm stream is held by the fault hook, as by a hung peer):
// Wait returns DEADLINE_EXCEEDED naming group and op, the communicator is aborted, later ops
// fail at once, and a new group works.
TEST(NcclGpu, WaitTimeoutAbortsTheGroupAndTheProcessRecovers) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("dp[2]", milliseconds(10000)));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  auto release = NcclStallNextOpForTesting(**group);
  ASSERT_TRUE(release.ok()) << release.status().ToString();
  // Released late, from another thread: ncclCommAbort or the drain may wait for the stream.
  std::thread releaser([&] {
    std::this_thread::sleep_for(milliseconds(1500));
    (*release)();
  });
  auto dev = Upload(ct::Filled(ElemType::kF32, 0, 1024));
  ASSERT_TRUE(dev.ok());
  const auto start = Clock::now();
  Status s = (*group)
                 ->AllReduce(dev->data(), 1024, ElemType::kF32, ReduceOp::kSum)
                 ->Wait(milliseconds(300));
  const double took = SecondsSince(start);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "dp[2]: all_reduce timed out after 300 ms")) << s.ToString();
  EXPECT_LT(took, 10.0);
  const auto later = Clock::now();
  Status t = (*group)->Barrier()->Wait(milliseconds(20000));
  EXPECT_EQ(t.code(), StatusCode::kDeadlineExceeded) << t.ToString();
  EXPECT_TRUE(Contains(t.message(), "dp[2]: barrier failed")) << t.ToString();
  EXPECT_LT(SecondsSince(later), 1.0);
  releaser.join();
  group->reset();
  auto fresh = CreateNcclGroup(OneRank("dp[2]-gen2"));
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  ExpectGroupWorks(**fresh);
}

// Nobody waits: the watchdog finds the op past the group's timeout and aborts.
TEST(NcclGpu, WatchdogAbortsAnOpNobodyWaitsFor) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("pp[0]", milliseconds(400)));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  auto release = NcclStallNextOpForTesting(**group);
  ASSERT_TRUE(release.ok());
  std::thread releaser([&] {
    std::this_thread::sleep_for(milliseconds(1500));
    (*release)();
  });
  auto dev = Upload(ct::Filled(ElemType::kF32, 0, 16));
  ASSERT_TRUE(dev.ok());
  auto work = (*group)->AllReduce(dev->data(), 16, ElemType::kF32, ReduceOp::kSum);
  std::this_thread::sleep_for(milliseconds(1000));  // past the 400 ms limit, nobody waiting
  Status s = work->Wait(milliseconds(0));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "watchdog")) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "pp[0]: all_reduce")) << s.ToString();
  releaser.join();
}

// Ordering through the compute stream: an op waits for the compute stream's earlier work.
// Held by the fault hook... on the compute side there is no hook, so this checks the plumbing:
// a group created with the default stream as compute stream, then switched, still works, and
// a stream can be made to wait for issued ops.
TEST(NcclGpu, ComputeStreamPlumbing) {
  STRATA_REQUIRE_GPU();
  auto group = CreateNcclGroup(OneRank("world"));
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  ASSERT_OK(SetNcclComputeStream(**group, nullptr));
  auto dev = Upload(ct::Filled(ElemType::kF32, 0, 256));
  ASSERT_TRUE(dev.ok());
  auto work = (*group)->AllReduce(dev->data(), 256, ElemType::kF32, ReduceOp::kSum);
  ASSERT_OK(NcclStreamWaitForIssued(**group, nullptr));
  ASSERT_OK(model::CudaStreamSynchronize(nullptr));
  // The default stream waited for the op: it is complete, so Wait(0) succeeds.
  ASSERT_OK(work->Wait(milliseconds(0)));
}

// ---------------------------------------------------------------- host staging on one GPU

// Two in-process ranks as threads on GPU 0, device buffers through the adapter, against the
// values the CPU backends produce (comm_test_util's Expected).
TEST(HostStagingGpu, TwoRankThreadsOnOneGpuMatchTheCpuResult) {
  STRATA_REQUIRE_GPU();
  constexpr int kRanks = 2;
  InProcessWorld world(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      auto inner = MakeInProcessGroup(world, r);
      ASSERT_TRUE(inner.ok());
      auto g = WrapWithHostStaging(std::move(*inner), HostStagingOptions{0, nullptr});
      for (ElemType t : {ElemType::kF32, ElemType::kBF16, ElemType::kF16, ElemType::kI64}) {
        for (size_t n : {size_t{0}, size_t{1}, size_t{1000}, size_t{1} << 18}) {
          const size_t es = ElemSize(t);
          const std::string shape =
              "rank " + std::to_string(r) + " " + ct::TypeName(t) + " x" + std::to_string(n);
          for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
            auto dev = Upload(ct::Filled(t, r, n));
            ASSERT_TRUE(dev.ok());
            ASSERT_OK(g->AllReduce(dev->data(), n, t, op)->Wait(ct::kWait));
            auto host = Download(*dev, n * es);
            ASSERT_TRUE(host.ok());
            ct::ExpectAll(
                t, host->data(), n, [&](size_t i) { return ct::Expected(t, op, kRanks, i); },
                "staged all_reduce " + std::string(ct::OpName(op)) + " " + shape);
          }
          {
            auto in = Upload(ct::Filled(t, r, n * kRanks));
            auto out = Upload(std::vector<uint8_t>(n * es, 0xAB));
            ASSERT_TRUE(in.ok() && out.ok());
            ASSERT_OK(
                g->ReduceScatter(in->data(), out->data(), n, t, ReduceOp::kSum)->Wait(ct::kWait));
            auto host = Download(*out, n * es);
            ASSERT_TRUE(host.ok());
            ct::ExpectAll(
                t, host->data(), n,
                [&](size_t i) { return ct::Expected(t, ReduceOp::kSum, kRanks, r * n + i); },
                "staged reduce_scatter " + shape);
          }
          {
            auto in = Upload(ct::Filled(t, r, n, 1));
            auto out = Upload(std::vector<uint8_t>(n * es * kRanks, 0xAB));
            ASSERT_TRUE(in.ok() && out.ok());
            ASSERT_OK(g->AllGather(in->data(), out->data(), n, t)->Wait(ct::kWait));
            auto host = Download(*out, n * es * kRanks);
            ASSERT_TRUE(host.ok());
            ct::ExpectAll(
                t, host->data(), n * kRanks,
                [&](size_t i) {
                  return double(ct::Val(t, static_cast<int>(i / std::max<size_t>(n, 1)), i % n, 1));
                },
                "staged all_gather " + shape);
          }
          {
            auto dev = Upload(ct::Filled(t, r, n, 2));
            ASSERT_TRUE(dev.ok());
            ASSERT_OK(g->Broadcast(dev->data(), n, t, 1)->Wait(ct::kWait));
            auto host = Download(*dev, n * es);
            ASSERT_TRUE(host.ok());
            ct::ExpectAll(
                t, host->data(), n, [&](size_t i) { return double(ct::Val(t, 1, i, 2)); },
                "staged broadcast " + shape);
          }
          {  // exchange: post the Recv, then the Send, then wait for both
            const int peer = 1 - r;
            auto send = Upload(ct::Filled(t, r, n, 4));
            auto recv = Upload(std::vector<uint8_t>(n * es, 0));
            ASSERT_TRUE(send.ok() && recv.ok());
            auto rw = g->Recv(recv->data(), n, t, peer, 3);
            auto sw = g->Send(send->data(), n, t, peer, 3);
            ASSERT_OK(sw->Wait(ct::kWait));
            ASSERT_OK(rw->Wait(ct::kWait));
            auto host = Download(*recv, n * es);
            ASSERT_TRUE(host.ok());
            ct::ExpectAll(
                t, host->data(), n, [&](size_t i) { return double(ct::Val(t, peer, i, 4)); },
                "staged recv " + shape);
          }
        }
      }
      ASSERT_OK(g->Barrier()->Wait(ct::kWait));
    });
  }
  for (auto& t : threads) t.join();
}

// ---------------------------------------------------------------- two or more GPUs

#define STRATA_REQUIRE_GPUS(n)                                                                   \
  do {                                                                                           \
    if (::strata::model::CudaDeviceCount() < (n)) {                                              \
      GTEST_SKIP() << "needs " << (n) << " CUDA devices, " << ::strata::model::CudaDeviceCount() \
                   << " visible: this multi-GPU test did not run";                               \
    }                                                                                            \
  } while (0)

// Runs fn(rank, group) on one thread per GPU, the groups formed through one HashStore.
void RunNcclRanks(int n, const std::string& prefix, milliseconds timeout,
                  const std::function<void(int, ProcessGroup&)>& fn) {
  auto store = MakeHashStore();
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      NcclGroupOptions o;
      o.rank = r;
      o.size = n;
      o.device = r;
      o.store = store;
      o.prefix = prefix;
      o.name = "world";
      o.timeout = timeout;
      auto g = CreateNcclGroup(o);
      ASSERT_TRUE(g.ok()) << "rank " << r << ": " << g.status().ToString();
      fn(r, **g);
    });
  }
  for (auto& t : threads) t.join();
}

TEST(NcclMultiGpu, CollectivesPointToPointAndSplit) {
  STRATA_REQUIRE_GPUS(2);
  const int n = std::min(model::CudaDeviceCount(), 4);
  RunNcclRanks(n, "gen1/world", milliseconds(30000), [n](int r, ProcessGroup& g) {
    const milliseconds wait(30000);
    // Sums of small integers are exact whatever order NCCL adds them in; avg and max too.
    for (ElemType t : {ElemType::kF32, ElemType::kBF16, ElemType::kI32}) {
      const size_t count = 4099;
      const size_t es = ElemSize(t);
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
        auto dev = Upload(ct::Filled(t, r, count));
        ASSERT_TRUE(dev.ok());
        ASSERT_OK(g.AllReduce(dev->data(), count, t, op)->Wait(wait));
        auto host = Download(*dev, count * es);
        ASSERT_TRUE(host.ok());
        ct::ExpectAll(
            t, host->data(), count, [&](size_t i) { return ct::Expected(t, op, n, i); },
            "rank " + std::to_string(r) + " all_reduce " + ct::TypeName(t));
      }
      auto in = Upload(ct::Filled(t, r, count * n));
      auto out = Upload(std::vector<uint8_t>(count * es, 0));
      ASSERT_TRUE(in.ok() && out.ok());
      ASSERT_OK(g.ReduceScatter(in->data(), out->data(), count, t, ReduceOp::kSum)->Wait(wait));
      auto host = Download(*out, count * es);
      ASSERT_TRUE(host.ok());
      ct::ExpectAll(
          t, host->data(), count,
          [&](size_t i) { return ct::Expected(t, ReduceOp::kSum, n, r * count + i); },
          "reduce_scatter");
      auto gin = Upload(ct::Filled(t, r, count, 1));
      auto gout = Upload(std::vector<uint8_t>(count * es * n, 0));
      ASSERT_TRUE(gin.ok() && gout.ok());
      ASSERT_OK(g.AllGather(gin->data(), gout->data(), count, t)->Wait(wait));
      host = Download(*gout, count * es * n);
      ASSERT_TRUE(host.ok());
      ct::ExpectAll(
          t, host->data(), count * n,
          [&](size_t i) { return double(ct::Val(t, static_cast<int>(i / count), i % count, 1)); },
          "all_gather");
      auto b = Upload(ct::Filled(t, r, count, 2));
      ASSERT_TRUE(b.ok());
      ASSERT_OK(g.Broadcast(b->data(), count, t, n - 1)->Wait(wait));
      host = Download(*b, count * es);
      ASSERT_TRUE(host.ok());
      ct::ExpectAll(
          t, host->data(), count, [&](size_t i) { return double(ct::Val(t, n - 1, i, 2)); },
          "broadcast");
    }
    {  // ring exchange with two tags posted in opposite orders (one batch: no Wait between)
      const ElemType t = ElemType::kI32;
      const size_t count = 1000;
      const int right = (r + 1) % n, left = (r + n - 1) % n;
      auto a = Upload(ct::Filled(t, r, count, 3));
      auto c = Upload(ct::Filled(t, r, count, 5));
      auto ra = Upload(std::vector<uint8_t>(count * 4, 0));
      auto rc = Upload(std::vector<uint8_t>(count * 4, 0));
      ASSERT_TRUE(a.ok() && c.ok() && ra.ok() && rc.ok());
      std::vector<std::unique_ptr<Work>> works;
      works.push_back(g.Recv(rc->data(), count, t, left, 9));
      works.push_back(g.Send(a->data(), count, t, right, 7));
      works.push_back(g.Recv(ra->data(), count, t, left, 7));
      works.push_back(g.Send(c->data(), count, t, right, 9));
      for (auto& w : works) ASSERT_OK(w->Wait(wait));
      auto ha = Download(*ra, count * 4);
      auto hc = Download(*rc, count * 4);
      ASSERT_TRUE(ha.ok() && hc.ok());
      ct::ExpectAll(
          t, ha->data(), count, [&](size_t i) { return double(ct::Val(t, left, i, 3)); },
          "recv tag 7");
      ct::ExpectAll(
          t, hc->data(), count, [&](size_t i) { return double(ct::Val(t, left, i, 5)); },
          "recv tag 9");
    }
    ASSERT_OK(g.Barrier()->Wait(wait));
    // Split by parity.
    std::vector<int> mine;
    for (int q = r % 2; q < n; q += 2) mine.push_back(q);
    auto sub = g.Split(mine, "parity" + std::to_string(r % 2));
    ASSERT_TRUE(sub.ok()) << sub.status().ToString();
    EXPECT_EQ((*sub)->size(), static_cast<int>(mine.size()));
    EXPECT_EQ((*sub)->rank(), r / 2);
    auto dev = Upload(ct::Filled(ElemType::kF32, 0, 64));
    ASSERT_TRUE(dev.ok());
    ASSERT_OK((*sub)->AllReduce(dev->data(), 64, ElemType::kF32, ReduceOp::kSum)->Wait(wait));
    auto host = Download(*dev, 64 * 4);
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        ElemType::kF32, host->data(), 64,
        [&](size_t i) { return double(ct::Val(ElemType::kF32, 0, i)) * mine.size(); },
        "split all_reduce");
  });
}

// Rank 1 joins but never issues the collective: rank 0's Wait times out and aborts; rank 1
// then aborts too (as the coordinator would tell it to); both form a new group.
TEST(NcclMultiGpu, PeerThatNeverIssuesTimesOutAndGroupsReform) {
  STRATA_REQUIRE_GPUS(2);
  std::atomic<bool> rank0_done{false};
  RunNcclRanks(2, "gen1/hang", milliseconds(20000), [&](int r, ProcessGroup& g) {
    if (r == 0) {
      auto dev = Upload(ct::Filled(ElemType::kF32, 0, 1 << 16));
      ASSERT_TRUE(dev.ok());
      const auto start = Clock::now();
      Status s = g.AllReduce(dev->data(), 1 << 16, ElemType::kF32, ReduceOp::kSum)
                     ->Wait(milliseconds(500));
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
      EXPECT_TRUE(Contains(s.message(), "world: all_reduce timed out after 500 ms"))
          << s.ToString();
      EXPECT_LT(SecondsSince(start), 10.0);
      rank0_done = true;
    } else {
      while (!rank0_done) std::this_thread::sleep_for(milliseconds(10));
      g.Abort();
    }
  });
  RunNcclRanks(2, "gen2/hang", milliseconds(20000), [](int r, ProcessGroup& g) {
    auto dev = Upload(ct::Filled(ElemType::kF32, r, 256));
    ASSERT_TRUE(dev.ok());
    ASSERT_OK(
        g.AllReduce(dev->data(), 256, ElemType::kF32, ReduceOp::kSum)->Wait(milliseconds(20000)));
    auto host = Download(*dev, 256 * 4);
    ASSERT_TRUE(host.ok());
    ct::ExpectAll(
        ElemType::kF32, host->data(), 256,
        [&](size_t i) { return ct::Expected(ElemType::kF32, ReduceOp::kSum, 2, i); },
        "all_reduce after re-forming");
  });
}

}  // namespace
}  // namespace strata::comm
