// The MPI backend, run under mpirun (CTest: -np 3 and -np 4). Every TEST is collective: all
// ranks run the same tests in the same order. Its own main initialises MPI and makes non-zero
// ranks print only their failures (prefixed with the rank), so the output stays readable.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <thread>

#include "comm/grid.h"
#include "comm/mpi.h"
#include "tests/comm_test_util.h"
#include "tests/test_util.h"

namespace strata::comm {
namespace {

using std::chrono::milliseconds;

ProcessGroup* g_world = nullptr;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(Mpi, WorldGroup) {
  EXPECT_EQ(g_world->name(), "world");
  EXPECT_EQ(g_world->rank(), MpiWorldRank());
  EXPECT_EQ(g_world->size(), MpiWorldSize());
  EXPECT_GE(g_world->size(), 2) << "run under mpirun -np N with N >= 2";
}

TEST(Mpi, AllReduce) {
  ProcessGroup& g = *g_world;
  for (ElemType t : testing::AllTypes()) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
        testing::CheckAllReduce(g.rank(), g, t, op, count);
      }
    }
  }
  testing::CheckAllReduce(g.rank(), g, ElemType::kF32, ReduceOp::kSum, size_t{1} << 20);
  testing::CheckAllReduce(g.rank(), g, ElemType::kBF16, ReduceOp::kAvg, size_t{1} << 20);
}

TEST(Mpi, ReduceScatter) {
  ProcessGroup& g = *g_world;
  for (ElemType t : testing::AllTypes()) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
        testing::CheckReduceScatter(g.rank(), g, t, op, count);
      }
    }
  }
  testing::CheckReduceScatter(g.rank(), g, ElemType::kF32, ReduceOp::kAvg, size_t{1} << 19);
  for (ElemType t : {ElemType::kI32, ElemType::kBF16, ElemType::kF64}) {
    testing::CheckReduceScatterInPlace(g.rank(), g, t, 1001);
  }
}

TEST(Mpi, AllGather) {
  ProcessGroup& g = *g_world;
  for (ElemType t : testing::AllTypes()) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
      testing::CheckAllGather(g.rank(), g, t, count, false);
      testing::CheckAllGather(g.rank(), g, t, count, true);
    }
  }
  testing::CheckAllGather(g.rank(), g, ElemType::kF32, size_t{1} << 19, false);
}

TEST(Mpi, Broadcast) {
  ProcessGroup& g = *g_world;
  for (int root = 0; root < g.size(); ++root) {
    for (ElemType t : {ElemType::kF32, ElemType::kBF16, ElemType::kU8, ElemType::kI64}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
        testing::CheckBroadcast(g.rank(), g, t, count, root);
      }
    }
  }
  testing::CheckBroadcast(g.rank(), g, ElemType::kF32, size_t{1} << 20, g.size() - 1);
}

TEST(Mpi, SendRecv) {
  for (size_t count : {size_t{0}, size_t{1}, size_t{1001}, size_t{1} << 20}) {
    testing::CheckSendRecvRing(g_world->rank(), *g_world, count);
  }
}

TEST(Mpi, RecvCountMismatch) {
  ProcessGroup& g = *g_world;
  int32_t buf[8] = {};
  if (g.rank() == 0) {
    EXPECT_TRUE(g.Send(buf, 4, ElemType::kI32, 1, 5)->Wait(testing::kWait).ok());
  } else if (g.rank() == 1) {
    Status s = g.Recv(buf, 8, ElemType::kI32, 0, 5)->Wait(testing::kWait);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_HAS(s.message(), "world: recv from rank 0 (tag 5): received 4 elements, expected 8");
  }
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
}

// Rank 0 arrives 200 ms late at every barrier; nobody leaves before it arrives.
TEST(Mpi, Barrier) {
  ProcessGroup& g = *g_world;
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
  const auto t0 = std::chrono::steady_clock::now();
  if (g.rank() == 0) std::this_thread::sleep_for(milliseconds(200));
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
  EXPECT_GE(Seconds(t0), 0.19) << "rank " << g.rank() << " left the barrier early";
}

TEST(Mpi, ManyInFlight) { testing::CheckManyInFlight(g_world->rank(), *g_world); }

TEST(Mpi, SplitByParity) {
  ProcessGroup& g = *g_world;
  const int r = g.rank(), n = g.size();
  std::vector<int> mine;
  for (int q = n - 1; q >= 0; --q) {
    if (q % 2 == r % 2) mine.push_back(q);  // reverse order: new rank = index in the list
  }
  auto sub = g.Split(mine, r % 2 ? "odd" : "even");
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  EXPECT_EQ((*sub)->name(), r % 2 ? "odd" : "even");
  EXPECT_EQ((*sub)->size(), static_cast<int>(mine.size()));
  EXPECT_EQ((*sub)->rank(),
            static_cast<int>(std::find(mine.begin(), mine.end(), r) - mine.begin()));
  int64_t v = r, want = 0;
  for (int q : mine) want += q;
  ASSERT_TRUE((*sub)->AllReduce(&v, 1, ElemType::kI64, ReduceOp::kSum)->Wait(testing::kWait).ok());
  EXPECT_EQ(v, want);
  // Sub-group collectives of every kind.
  testing::CheckAllGather((*sub)->rank(), **sub, ElemType::kF16, 33, true);
  testing::CheckReduceScatter((*sub)->rank(), **sub, ElemType::kBF16, ReduceOp::kAvg, 33);
}

TEST(Mpi, SplitGrid) {
  ProcessGroup& g = *g_world;
  const int tp = g.size() % 2 == 0 ? 2 : 1;
  auto grid = Grid::Create(g.size(), g.size() / tp, tp, 1);
  ASSERT_TRUE(grid.ok());
  if (g.rank() == 0) std::printf("%s", grid->Describe().c_str());
  auto groups = SplitGrid(g, *grid);
  ASSERT_TRUE(groups.ok()) << groups.status().ToString();
  const int r = g.rank();
  for (auto [pg, members] : {std::pair{groups->tp.get(), grid->tp_group(r)},
                             std::pair{groups->pp.get(), grid->pp_group(r)},
                             std::pair{groups->dp.get(), grid->dp_group(r)}}) {
    int64_t v = r, want = 0;
    for (int m : members) want += m;
    ASSERT_TRUE(pg->AllReduce(&v, 1, ElemType::kI64, ReduceOp::kSum)->Wait(testing::kWait).ok());
    EXPECT_EQ(v, want) << pg->name();
  }
}

// The last rank joins 500 ms late. The others' 100 ms Wait reports DEADLINE_EXCEEDED naming
// group and op; the op stays in flight, so waiting again completes it and MPI can finalise.
// Both paths: a direct-path op and one of MPI's collectives, which the progress thread watches.
TEST(Mpi, TimeoutThenLateRankCompletes) {
  ProcessGroup& g = *g_world;
  const int n = g.size(), r = g.rank();
  for (size_t count : {size_t{64}, size_t{1} << 18}) {
    SCOPED_TRACE("count " + std::to_string(count));
    ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
    auto buf = testing::Filled(ElemType::kF32, r, count);
    const auto t0 = std::chrono::steady_clock::now();
    if (r == n - 1) std::this_thread::sleep_for(milliseconds(500));
    auto w = g.AllReduce(buf.data(), count, ElemType::kF32, ReduceOp::kSum);
    if (r != n - 1) {
      Status s = w->Wait(milliseconds(100));
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
      EXPECT_HAS(s.message(), "world: all_reduce timed out after 100 ms");
      EXPECT_LT(Seconds(t0), 0.45) << "the timeout was not honoured";
    }
    Status s = w->Wait(milliseconds(10000));
    ASSERT_TRUE(s.ok()) << s.ToString();
    testing::ExpectAll(
        ElemType::kF32, buf.data(), count,
        [&](size_t i) { return testing::Expected(ElemType::kF32, ReduceOp::kSum, n, i); },
        "late all_reduce");
  }
}

TEST(Mpi, PointToPointTimeoutThenLateSend) {
  ProcessGroup& g = *g_world;
  int32_t x = 0;
  if (g.rank() == 0) {
    auto w = g.Recv(&x, 1, ElemType::kI32, 1, 77);
    Status s = w->Wait(milliseconds(100));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
    EXPECT_HAS(s.message(), "world: recv from rank 1 (tag 77) timed out after 100 ms");
    ASSERT_TRUE(w->Wait(milliseconds(10000)).ok());
    EXPECT_EQ(x, 1234);
  } else if (g.rank() == 1) {
    std::this_thread::sleep_for(milliseconds(300));
    x = 1234;
    ASSERT_TRUE(g.Send(&x, 1, ElemType::kI32, 0, 77)->Wait(milliseconds(10000)).ok());
  }
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
}

// Abort on rank 0 while its op waits for late peers: its Wait returns CANCELLED at once and
// later ops fail; the abandoned op completes when the peers join and MpiFinalize drains it.
TEST(Mpi, AbortFailsLocalWorks) {
  ProcessGroup& g = *g_world;
  auto sub = g.Split(
      [&] {
        std::vector<int> all;
        for (int q = 0; q < g.size(); ++q) all.push_back(q);
        return all;
      }(),
      "abortable");
  ASSERT_TRUE(sub.ok());
  static std::vector<float> buf(16, 1.f);  // outlives the test: the op completes later
  if (g.rank() == 0) {
    auto w = (*sub)->AllReduce(buf.data(), 16, ElemType::kF32, ReduceOp::kSum);
    std::thread aborter([&] {
      std::this_thread::sleep_for(milliseconds(50));
      (*sub)->Abort();
    });
    const auto t0 = std::chrono::steady_clock::now();
    Status s = w->Wait(milliseconds(10000));
    aborter.join();
    EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
    EXPECT_HAS(s.message(), "abortable: all_reduce failed: group aborted by rank 0");
    EXPECT_LT(Seconds(t0), 1.0);
    EXPECT_EQ((*sub)->Barrier()->Wait(milliseconds(10)).code(), StatusCode::kCancelled);
  } else {
    std::this_thread::sleep_for(milliseconds(300));
    std::vector<float> mine(16, 1.f);
    EXPECT_TRUE((*sub)
                    ->AllReduce(mine.data(), 16, ElemType::kF32, ReduceOp::kSum)
                    ->Wait(testing::kWait)
                    .ok());
  }
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
}

// Both sides of the direct path's limits: the direct path (point-to-point messages, reduced
// locally) and MPI's collectives give the same results for every type and op.
TEST(Mpi, DirectPathBoundary) {
  ProcessGroup& g = *g_world;
  const int r = g.rank();
  const size_t peers = static_cast<size_t>(g.size() - 1);
  for (ElemType t : testing::AllTypes()) {
    const size_t reduce_at = kMpiDirectReduceMaxBytes / peers / ElemSize(t);
    for (size_t count : {reduce_at, reduce_at + 1}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
        testing::CheckAllReduce(r, g, t, op, count);
        testing::CheckReduceScatter(r, g, t, op, count);
      }
      testing::CheckReduceScatterInPlace(r, g, t, count);
    }
    const size_t copy_at = kMpiDirectCopyMaxBytes / peers / ElemSize(t);
    for (size_t count : {copy_at, copy_at + 1}) {
      testing::CheckAllGather(r, g, t, count, false);
      testing::CheckAllGather(r, g, t, count, true);
      testing::CheckBroadcast(r, g, t, count, g.size() - 1);
    }
  }
}

// A group of one rank: every collective completes at issue, without messages.
TEST(Mpi, SingleRankGroup) {
  ProcessGroup& g = *g_world;
  auto self = g.Split({g.rank()}, "self");
  ASSERT_TRUE(self.ok()) << self.status().ToString();
  for (size_t count : {size_t{0}, size_t{3}, size_t{5000}}) {
    testing::CheckAllReduce(0, **self, ElemType::kBF16, ReduceOp::kAvg, count);
    testing::CheckAllReduce(0, **self, ElemType::kI32, ReduceOp::kMax, count);
    testing::CheckReduceScatter(0, **self, ElemType::kF32, ReduceOp::kSum, count);
    testing::CheckAllGather(0, **self, ElemType::kF64, count, false);
    testing::CheckBroadcast(0, **self, ElemType::kU8, count, 0);
  }
}

bool ProgressThreadOff() {
  const char* v = std::getenv("STRATA_MPI_PROGRESS_US");
  return v && std::atoi(v) == 0;
}

// The progress thread moves a collective while ranks are busy elsewhere. Every rank but 0
// issues a 4 MB bf16 all-reduce, then "computes" (sleeps) for 600 ms before it waits; rank 0
// waits at once. Open MPI advances non-blocking collectives only inside MPI calls, so without
// the thread rank 0 would wait for the others' Wait.
TEST(Mpi, ProgressWhileOtherRanksCompute) {
  if (ProgressThreadOff()) GTEST_SKIP() << "STRATA_MPI_PROGRESS_US=0";
  ProcessGroup& g = *g_world;
  const int n = g.size(), r = g.rank();
  const size_t count = size_t{1} << 21;
  auto buf = testing::Filled(ElemType::kBF16, r, count);
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
  const auto t0 = std::chrono::steady_clock::now();
  auto w = g.AllReduce(buf.data(), count, ElemType::kBF16, ReduceOp::kAvg);
  if (r != 0) std::this_thread::sleep_for(milliseconds(600));
  Status s = w->Wait(testing::kWait);
  ASSERT_TRUE(s.ok()) << s.ToString();
  if (r == 0) {
    EXPECT_LT(Seconds(t0), 0.4) << "the all-reduce did not move while the other ranks slept";
  }
  testing::ExpectAll(
      ElemType::kBF16, buf.data(), count,
      [&](size_t i) { return testing::Expected(ElemType::kBF16, ReduceOp::kAvg, n, i); },
      "all_reduce finished in the background");
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
}

// A Work dropped while its op is in flight (the last rank is late): the progress thread
// completes the op in the background and MpiFinalize, at exit, finds nothing left.
TEST(Mpi, DroppedWorkCompletesInBackground) {
  ProcessGroup& g = *g_world;
  const int n = g.size(), r = g.rank();
  static std::vector<float> big(size_t{1} << 18, 1.f);  // outlives the test, like the op
  static std::vector<float> small(16, 1.f);
  if (r == n - 1) std::this_thread::sleep_for(milliseconds(200));
  auto w1 = g.AllReduce(big.data(), big.size(), ElemType::kF32, ReduceOp::kMax);
  auto w2 = g.AllReduce(small.data(), small.size(), ElemType::kF32, ReduceOp::kMax);
  if (r == n - 1) {
    ASSERT_TRUE(w1->Wait(testing::kWait).ok());
    ASSERT_TRUE(w2->Wait(testing::kWait).ok());
  }
  w1.reset();
  w2.reset();
  ASSERT_TRUE(g.Barrier()->Wait(testing::kWait).ok());
}

// Several threads at once: two threads each drive their own group (same members), and on a
// third group one thread issues while another waits. Ops of every group are in flight together,
// several threads are inside Wait, and the progress thread runs beside them.
TEST(Mpi, OpsFromSeveralThreads) {
  ProcessGroup& g = *g_world;
  const int n = g.size(), r = g.rank();
  std::vector<int> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  auto left = g.Split(all, "left");
  auto right = g.Split(all, "right");
  auto relay = g.Split(all, "relay");
  ASSERT_TRUE(left.ok() && right.ok() && relay.ok());
  constexpr int kRounds = 20;
  const std::vector<size_t> counts = {1, 1000, size_t{1} << 16};
  auto drive = [&](ProcessGroup* pg, int salt) {
    for (int it = 0; it < kRounds; ++it) {
      for (size_t count : counts) {
        auto buf = testing::Filled(ElemType::kF32, r, count, salt);
        Status s =
            pg->AllReduce(buf.data(), count, ElemType::kF32, ReduceOp::kSum)->Wait(testing::kWait);
        ASSERT_TRUE(s.ok()) << s.ToString();
        testing::ExpectAll(
            ElemType::kF32, buf.data(), count,
            [&](size_t i) { return testing::Expected(ElemType::kF32, ReduceOp::kSum, n, i, salt); },
            pg->name() + " all_reduce");
      }
    }
  };
  // relay: this thread issues, the waiter thread waits, handing Works over a queue.
  std::vector<std::vector<uint8_t>> bufs(kRounds * counts.size());
  std::vector<std::unique_ptr<Work>> works(bufs.size());
  std::mutex mu;
  std::condition_variable cv;
  size_t issued = 0;
  std::thread waiter([&] {
    for (size_t k = 0; k < works.size(); ++k) {
      std::unique_ptr<Work> w;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return issued > k; });
        w = std::move(works[k]);
      }
      Status s = w->Wait(testing::kWait);
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
  });
  std::thread t1(drive, left->get(), 1);
  std::thread t2(drive, right->get(), 2);
  for (size_t k = 0; k < works.size(); ++k) {
    const size_t count = counts[k % counts.size()];
    bufs[k] = testing::Filled(ElemType::kI64, r, count, 3);
    auto w = (*relay)->AllReduce(bufs[k].data(), count, ElemType::kI64, ReduceOp::kMax);
    std::lock_guard<std::mutex> lock(mu);
    works[k] = std::move(w);
    issued = k + 1;
    cv.notify_one();
  }
  waiter.join();
  t1.join();
  t2.join();
  for (size_t k = 0; k < bufs.size(); ++k) {
    const size_t count = counts[k % counts.size()];
    testing::ExpectAll(
        ElemType::kI64, bufs[k].data(), count,
        [&](size_t i) { return testing::Expected(ElemType::kI64, ReduceOp::kMax, n, i, 3); },
        "relay all_reduce " + std::to_string(k));
  }
}

TEST(Mpi, InvalidArguments) {
  ProcessGroup& g = *g_world;
  float x = 0;
  Status s = g.Broadcast(&x, 1, ElemType::kF32, g.size())->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "world: broadcast: root");
  s = g.Send(&x, 1, ElemType::kF32, g.rank(), 0)->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  s = g.Send(&x, 1, ElemType::kF32, (g.rank() + 1) % g.size(), -1)->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "tag -1 is negative");
}

// Prints only failures, prefixed with the rank (for ranks other than 0).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace strata::comm

int main(int argc, char** argv) {
  using namespace strata::comm;
  strata::Status s = MpiInit(&argc, &argv);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = MpiWorldRank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int rc;
  {
    auto world = MakeMpiWorldGroup();
    if (!world.ok()) {
      std::fprintf(stderr, "%s\n", world.status().ToString().c_str());
      return 1;
    }
    g_world = world->get();
    rc = RUN_ALL_TESTS();
    g_world = nullptr;
  }
  s = MpiFinalize();
  if (!s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
    return 1;
  }
  return rc;
}
