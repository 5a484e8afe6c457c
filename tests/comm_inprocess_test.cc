// The in-process backend: every collective for group sizes 1-4, then the failure paths
// (timeouts, Abort, mismatched ops, bad arguments) and Split.
#include <gtest/gtest.h>

#include "comm/grid.h"
#include "comm/inprocess.h"
#include "tests/comm_test_util.h"
#include "tests/test_util.h"

namespace strata::comm {
namespace {

using std::chrono::milliseconds;
using testing::RunRanks;

class InProcessBackend final : public testing::Backend {
 public:
  void NewWorld(int n) override { world_ = std::make_unique<InProcessWorld>(n); }
  Result<std::unique_ptr<ProcessGroup>> Join(int rank) override {
    return MakeInProcessGroup(*world_, rank);
  }

 private:
  std::unique_ptr<InProcessWorld> world_;
};

class InProcessCollectives : public ::testing::TestWithParam<int> {
 protected:
  InProcessBackend backend_;
};

TEST_P(InProcessCollectives, AllReduce) { testing::AllReduceSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, ReduceScatter) { testing::ReduceScatterSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, AllGather) { testing::AllGatherSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, Broadcast) { testing::BroadcastSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, SendRecv) { testing::SendRecvSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, Barrier) { testing::BarrierSuite(backend_, GetParam()); }
TEST_P(InProcessCollectives, ManyInFlight) { testing::ManyInFlightSuite(backend_, GetParam()); }

INSTANTIATE_TEST_SUITE_P(GroupSize, InProcessCollectives, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) {
                           std::string name = "n";
                           name += std::to_string(info.param);
                           return name;
                         });

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(InProcess, BadWorldRank) {
  InProcessWorld world(2);
  auto g = MakeInProcessGroup(world, 2);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(g.status().message(), "rank 2");
}

// Rank 2 joins 400 ms late: the others' 100 ms wait reports the group, the op, and who is
// missing; waiting again after rank 2 joined completes the op with the right result.
TEST(InProcess, TimeoutNamesGroupOpAndMissingRankThenCompletesWhenLateRankJoins) {
  InProcessBackend backend;
  const auto t0 = std::chrono::steady_clock::now();
  RunRanks(backend, 3, [](int r, ProcessGroup& g) {
    auto buf = testing::Filled(ElemType::kF32, r, 5);
    if (r == 2) {
      std::this_thread::sleep_for(milliseconds(400));
      ASSERT_TRUE(g.AllReduce(buf.data(), 5, ElemType::kF32, ReduceOp::kSum)
                      ->Wait(milliseconds(5000))
                      .ok());
    } else {
      auto w = g.AllReduce(buf.data(), 5, ElemType::kF32, ReduceOp::kSum);
      Status s = w->Wait(milliseconds(100));
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
      EXPECT_HAS(s.message(), "world: all_reduce timed out after 100 ms");
      EXPECT_HAS(s.message(), "ranks that have not joined: [2]");
      ASSERT_TRUE(w->Wait(milliseconds(5000)).ok());
    }
    testing::ExpectAll(
        ElemType::kF32, buf.data(), 5,
        [](size_t i) { return testing::Expected(ElemType::kF32, ReduceOp::kSum, 3, i); },
        "late all_reduce");
  });
  EXPECT_LT(Seconds(t0), 3.0);
}

// A rank that never joins: the op times out, and destroying the groups neither hangs nor
// lets a late completion write into freed memory (ASan would see it).
TEST(InProcess, RankNeverJoinsThenGroupsAreDestroyed) {
  InProcessWorld world(2);
  auto g0 = MakeInProcessGroup(world, 0);
  auto g1 = MakeInProcessGroup(world, 1);
  ASSERT_TRUE(g0.ok() && g1.ok());
  const auto t0 = std::chrono::steady_clock::now();
  {
    std::vector<float> buf(100, 1.f);
    auto w = (*g0)->ReduceScatter(buf.data(), buf.data() + 50, 50, ElemType::kF32, ReduceOp::kSum);
    Status s = w->Wait(milliseconds(50));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
    EXPECT_HAS(s.message(), "world: reduce_scatter timed out after 50 ms");
    g0->reset();  // fails the op for everybody: buf may now go away
    EXPECT_EQ(w->Wait(milliseconds(10)).code(), StatusCode::kCancelled);
  }
  // Rank 1 arrives after rank 0 left: the group is broken, the op fails at once.
  std::vector<float> late(100, 1.f);
  Status s = (*g1)
                 ->ReduceScatter(late.data(), late.data(), 50, ElemType::kF32, ReduceOp::kSum)
                 ->Wait(milliseconds(5000));
  EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
  EXPECT_HAS(s.message(), "rank 0 destroyed its group handle");
  EXPECT_LT(Seconds(t0), 2.0);
}

TEST(InProcess, PointToPointTimeoutNamesPeerAndTag) {
  InProcessBackend backend;
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    if (r != 0) return;
    int x = 0;
    Status s = g.Recv(&x, 1, ElemType::kI32, 1, 42)->Wait(milliseconds(50));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
    EXPECT_HAS(s.message(), "world: recv from rank 1 (tag 42) timed out after 50 ms");
    g.Abort();
  });
}

// Abort by one rank wakes the other ranks' waiters and its own, fails later ops at once, and
// is idempotent.
TEST(InProcess, AbortWakesEveryWaiter) {
  InProcessBackend backend;
  const auto t0 = std::chrono::steady_clock::now();
  RunRanks(backend, 3, [](int r, ProcessGroup& g) {
    std::vector<float> buf(10, 1.f);
    if (r == 2) {
      std::this_thread::sleep_for(milliseconds(100));
      g.Abort();
      g.Abort();
    } else if (r == 1) {
      Status s =
          g.AllReduce(buf.data(), 10, ElemType::kF32, ReduceOp::kSum)->Wait(milliseconds(10000));
      EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
      EXPECT_HAS(s.message(), "world: all_reduce failed: group aborted by rank 2");
    } else {
      // A waiter on a point-to-point op is woken as well.
      Status s = g.Recv(buf.data(), 10, ElemType::kF32, 1, 0)->Wait(milliseconds(10000));
      EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
    }
    Status later = g.Barrier()->Wait(milliseconds(10000));
    EXPECT_EQ(later.code(), StatusCode::kCancelled);
    EXPECT_HAS(later.message(), "world: barrier failed");
  });
  EXPECT_LT(Seconds(t0), 2.0);
}

TEST(InProcess, AbortFromAnotherThreadWakesOwnWaiter) {
  InProcessWorld world(2);
  auto g0 = MakeInProcessGroup(world, 0);
  auto g1 = MakeInProcessGroup(world, 1);
  ASSERT_TRUE(g0.ok() && g1.ok());
  std::vector<float> buf(10, 1.f);
  auto w = (*g0)->AllReduce(buf.data(), 10, ElemType::kF32, ReduceOp::kMax);
  std::thread aborter([&] {
    std::this_thread::sleep_for(milliseconds(50));
    (*g0)->Abort();
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(w->Wait(milliseconds(10000)).code(), StatusCode::kCancelled);
  EXPECT_LT(Seconds(t0), 2.0);
  aborter.join();
}

TEST(InProcess, MismatchedCollectivesAreReportedOnBothRanks) {
  InProcessBackend backend;
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    std::vector<float> buf(11, 1.f);
    Status s = g.AllReduce(buf.data(), r == 0 ? 10 : 11, ElemType::kF32, ReduceOp::kSum)
                   ->Wait(milliseconds(5000));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_HAS(s.message(), "differs between ranks");
    EXPECT_HAS(s.message(), "all_reduce(f32 x 10, sum)");
    EXPECT_HAS(s.message(), "all_reduce(f32 x 11, sum)");
  });
}

TEST(InProcess, SendRecvSizeMismatch) {
  InProcessBackend backend;
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    std::vector<int32_t> buf(8, 0);
    Status s = r == 0 ? g.Send(buf.data(), 4, ElemType::kI32, 1, 3)->Wait(milliseconds(5000))
                      : g.Recv(buf.data(), 8, ElemType::kI32, 0, 3)->Wait(milliseconds(5000));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_HAS(s.message(), "send of 16 bytes met recv of 32 bytes");
  });
}

TEST(InProcess, InvalidArguments) {
  InProcessWorld world(1);
  auto g = MakeInProcessGroup(world, 0);
  ASSERT_TRUE(g.ok());
  float x = 0;
  auto code = [](std::unique_ptr<Work> w) { return w->Wait(milliseconds(10)); };
  Status s = code((*g)->Broadcast(&x, 1, ElemType::kF32, 1));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "world: broadcast: root 1 is not a rank of this group (size 1)");
  s = code((*g)->Send(&x, 1, ElemType::kF32, 0, 0));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "dst 0 is this rank");
  s = code((*g)->Recv(&x, 1, ElemType::kF32, -1, 0));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  s = code((*g)->AllReduce(nullptr, 3, ElemType::kF32, ReduceOp::kSum));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "null buffer");
  // Bad arguments do not break the group.
  EXPECT_TRUE(code((*g)->AllReduce(&x, 1, ElemType::kF32, ReduceOp::kSum)).ok());
}

TEST(InProcess, NegativeTag) {
  InProcessWorld world(2);
  auto g = MakeInProcessGroup(world, 0);
  ASSERT_TRUE(g.ok());
  float x = 0;
  Status s = (*g)->Send(&x, 1, ElemType::kF32, 1, -3)->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "tag -3 is negative");
}

// Split into odd and even ranks, lists given in reverse order: a rank's new rank is its index
// in the list; sub-groups work independently and can be split again.
TEST(InProcess, SplitByParityThenSplitAgain) {
  InProcessBackend backend;
  RunRanks(backend, 4, [](int r, ProcessGroup& g) {
    const std::vector<int> mine = r % 2 ? std::vector<int>{3, 1} : std::vector<int>{2, 0};
    auto sub = g.Split(mine, r % 2 ? "odd" : "even");
    ASSERT_TRUE(sub.ok()) << sub.status().ToString();
    EXPECT_EQ((*sub)->name(), r % 2 ? "odd" : "even");
    EXPECT_EQ((*sub)->size(), 2);
    EXPECT_EQ((*sub)->rank(), r >= 2 ? 0 : 1);
    int32_t v = r;
    ASSERT_TRUE(
        (*sub)->AllReduce(&v, 1, ElemType::kI32, ReduceOp::kSum)->Wait(milliseconds(5000)).ok());
    EXPECT_EQ(v, r % 2 ? 4 : 2);
    // The world still works alongside.
    int32_t w = 1;
    ASSERT_TRUE(g.AllReduce(&w, 1, ElemType::kI32, ReduceOp::kSum)->Wait(milliseconds(5000)).ok());
    EXPECT_EQ(w, 4);
    // A split of a split: singletons.
    auto single = (*sub)->Split({(*sub)->rank()}, "single");
    ASSERT_TRUE(single.ok()) << single.status().ToString();
    EXPECT_EQ((*single)->size(), 1);
    int32_t s = 7;
    EXPECT_TRUE(
        (*single)->AllReduce(&s, 1, ElemType::kI32, ReduceOp::kAvg)->Wait(milliseconds(1000)).ok());
    EXPECT_EQ(s, 7);
  });
}

TEST(InProcess, SplitMembersMustAgree) {
  InProcessBackend backend;
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    // Both pass lists with smallest rank 0, but different names: the second caller notices.
    auto sub = g.Split({0, 1}, r == 0 ? "a" : "b");
    if (!sub.ok()) {
      EXPECT_EQ(sub.status().code(), StatusCode::kInvalidArgument);
      EXPECT_HAS(sub.status().message(), "members disagree");
    }
  });
}

TEST(InProcess, SplitRejectsBadLists) {
  InProcessWorld world(1);
  auto g = MakeInProcessGroup(world, 0);
  ASSERT_TRUE(g.ok());
  for (const auto& [ranks, needle] : std::vector<std::pair<std::vector<int>, std::string>>{
           {{}, "empty rank list"}, {{0, 0}, "duplicates"}, {{0, 1}, "outside [0, 1)"}}) {
    auto sub = (*g)->Split(ranks, "x");
    ASSERT_FALSE(sub.ok());
    EXPECT_EQ(sub.status().code(), StatusCode::kInvalidArgument);
    EXPECT_HAS(sub.status().message(), needle);
  }
  InProcessWorld world2(2);
  auto h = MakeInProcessGroup(world2, 0);
  ASSERT_TRUE(h.ok());
  auto sub = (*h)->Split({1}, "other");
  ASSERT_FALSE(sub.ok());
  EXPECT_HAS(sub.status().message(), "does not contain rank 0");
}

// dp=2, tp=2, pp=2 over 8 thread ranks: every group sums its members' world ranks.
TEST(InProcess, SplitGridGroupsMatchTheGrid) {
  auto grid = Grid::Create(8, 2, 2, 2);
  ASSERT_TRUE(grid.ok());
  InProcessBackend backend;
  RunRanks(backend, 8, [&](int r, ProcessGroup& world) {
    auto groups = SplitGrid(world, *grid);
    ASSERT_TRUE(groups.ok()) << groups.status().ToString();
    const GridCoords c = grid->coords(r);
    EXPECT_EQ(groups->tp->rank(), c.t);
    EXPECT_EQ(groups->pp->rank(), c.p);
    EXPECT_EQ(groups->dp->rank(), c.d);
    EXPECT_EQ(groups->tp->name(), grid->tp_group_name(r));
    struct {
      ProcessGroup* g;
      std::vector<int> members;
    } cases[] = {{groups->tp.get(), grid->tp_group(r)},
                 {groups->pp.get(), grid->pp_group(r)},
                 {groups->dp.get(), grid->dp_group(r)}};
    for (auto& k : cases) {
      int64_t v = r;
      ASSERT_TRUE(
          k.g->AllReduce(&v, 1, ElemType::kI64, ReduceOp::kSum)->Wait(milliseconds(5000)).ok());
      int64_t want = 0;
      for (int m : k.members) want += m;
      EXPECT_EQ(v, want) << k.g->name();
    }
  });
}

// Groups can be destroyed and formed again from the same world object.
TEST(InProcess, ReformAfterDestroy) {
  InProcessWorld world(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      for (int generation = 0; generation < 3; ++generation) {
        auto g = MakeInProcessGroup(world, r);
        ASSERT_TRUE(g.ok());
        int32_t v = generation + r;
        ASSERT_TRUE(
            (*g)->AllReduce(&v, 1, ElemType::kI32, ReduceOp::kSum)->Wait(milliseconds(5000)).ok());
        EXPECT_EQ(v, 3 * generation + 3);
      }
    });
  }
  for (auto& t : threads) t.join();
}

TEST(InProcess, HalfConversionsRoundOnceToNearestEven) {
  // 1 + 2^-8 is halfway between two bf16 values around 1; three ranks contribute 1/3 each
  // of values whose fp32 sum needs the single final rounding.
  InProcessBackend backend;
  RunRanks(backend, 3, [](int, ProcessGroup& g) {
    uint16_t v = model::FloatToBf16(1.0f + 1.0f / 128).bits;  // exact in bf16
    ASSERT_TRUE(g.AllReduce(&v, 1, ElemType::kBF16, ReduceOp::kAvg)->Wait(milliseconds(5000)).ok());
    EXPECT_EQ(v, model::FloatToBf16(1.0f + 1.0f / 128).bits);
    uint16_t h = model::FloatToHalfBits(0.1f);
    ASSERT_TRUE(g.AllReduce(&h, 1, ElemType::kF16, ReduceOp::kSum)->Wait(milliseconds(5000)).ok());
    EXPECT_EQ(h, model::FloatToHalfBits(3 * model::HalfBitsToFloat(model::FloatToHalfBits(0.1f))));
  });
}

}  // namespace
}  // namespace strata::comm
