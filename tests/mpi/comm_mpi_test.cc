// The MPI backend, run under mpirun (CTest: -np 3 and -np 4). Every TEST is collective: all
// ranks run the same tests in the same order. Its own main initialises MPI and makes non-zero
// ranks print only their failures (prefixed with the rank), so the output stays readable.
#include <gtest/gtest.h>

#include <cstdio>
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
TEST(Mpi, TimeoutThenLateRankCompletes) {
  ProcessGroup& g = *g_world;
  const int n = g.size(), r = g.rank();
  auto buf = testing::Filled(ElemType::kF32, r, 64);
  const auto t0 = std::chrono::steady_clock::now();
  if (r == n - 1) std::this_thread::sleep_for(milliseconds(500));
  auto w = g.AllReduce(buf.data(), 64, ElemType::kF32, ReduceOp::kSum);
  if (r != n - 1) {
    Status s = w->Wait(milliseconds(100));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_HAS(s.message(), "world: all_reduce timed out after 100 ms");
    EXPECT_LT(Seconds(t0), 0.45) << "the timeout was not honoured";
  }
  Status s = w->Wait(milliseconds(10000));
  ASSERT_TRUE(s.ok()) << s.ToString();
  testing::ExpectAll(
      ElemType::kF32, buf.data(), 64,
      [&](size_t i) { return testing::Expected(ElemType::kF32, ReduceOp::kSum, n, i); },
      "late all_reduce");
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
