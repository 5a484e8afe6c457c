// The Gloo backend with ranks as threads over TCP loopback: every collective for group sizes
// 1-4 over an in-memory store and over a file store, Split, destroy-and-re-form, and the
// failure paths (a rank that never joins the group or an op, Abort).
// If Gloo's TCP transport cannot work here, the tests are skipped with the reason.
#include <gtest/gtest.h>

#include "comm/gloo.h"
#include "comm/store.h"
#include "tests/comm_test_util.h"
#include "tests/test_util.h"

namespace strata::comm {
namespace {

using std::chrono::milliseconds;
using testing::RunRanks;

// Forms a 2-rank group once per process; the reason Gloo does not work here, or "".
const std::string& GlooUnusableReason() {
  static const std::string reason = [] {
    auto store = MakeHashStore();
    Result<std::unique_ptr<ProcessGroup>> groups[2] = {Status(StatusCode::kInternal, "unset"),
                                                       Status(StatusCode::kInternal, "unset")};
    std::thread t([&] { groups[1] = MakeGlooGroup(store, "probe", 1, 2, milliseconds(5000)); });
    groups[0] = MakeGlooGroup(store, "probe", 0, 2, milliseconds(5000));
    t.join();
    for (auto& g : groups) {
      if (!g.ok()) return "Gloo TCP transport unusable on this machine: " + g.status().ToString();
    }
    return std::string();
  }();
  return reason;
}

#define SKIP_IF_NO_GLOO()                                                    \
  do {                                                                       \
    if (!GlooUnusableReason().empty()) GTEST_SKIP() << GlooUnusableReason(); \
  } while (0)

class GlooBackend final : public testing::Backend {
 public:
  GlooBackend(std::shared_ptr<Store> store, milliseconds timeout = milliseconds(20000))
      : store_(std::move(store)), timeout_(timeout) {}
  void NewWorld(int n) override {
    n_ = n;
    prefix_ = "world" + std::to_string(generation_++);
  }
  Result<std::unique_ptr<ProcessGroup>> Join(int rank) override {
    GlooOptions opts;
    opts.name = "gloo-world";
    return MakeGlooGroup(store_, prefix_, rank, n_, timeout_, opts);
  }

 private:
  std::shared_ptr<Store> store_;
  milliseconds timeout_;
  int n_ = 0;
  int generation_ = 0;
  std::string prefix_;
};

enum class StoreKind { kHash, kFile };

class GlooCollectives : public ::testing::TestWithParam<std::tuple<StoreKind, int>> {
 protected:
  void SetUp() override {
    SKIP_IF_NO_GLOO();
    std::shared_ptr<Store> store;
    if (std::get<0>(GetParam()) == StoreKind::kHash) {
      store = MakeHashStore();
    } else {
      auto fs = MakeFileStore(dir_.path() + "/store");
      ASSERT_TRUE(fs.ok()) << fs.status().ToString();
      store = *fs;
    }
    backend_ = std::make_unique<GlooBackend>(store);
  }
  int n() const { return std::get<1>(GetParam()); }

  strata::testing::ScratchDir dir_;
  std::unique_ptr<GlooBackend> backend_;
};

TEST_P(GlooCollectives, AllReduce) { testing::AllReduceSuite(*backend_, n()); }
TEST_P(GlooCollectives, ReduceScatter) { testing::ReduceScatterSuite(*backend_, n()); }
TEST_P(GlooCollectives, AllGather) { testing::AllGatherSuite(*backend_, n()); }
TEST_P(GlooCollectives, Broadcast) { testing::BroadcastSuite(*backend_, n()); }
TEST_P(GlooCollectives, SendRecv) { testing::SendRecvSuite(*backend_, n()); }
TEST_P(GlooCollectives, Barrier) { testing::BarrierSuite(*backend_, n()); }
TEST_P(GlooCollectives, ManyInFlight) { testing::ManyInFlightSuite(*backend_, n()); }

INSTANTIATE_TEST_SUITE_P(StoreAndSize, GlooCollectives,
                         ::testing::Combine(::testing::Values(StoreKind::kHash, StoreKind::kFile),
                                            ::testing::Values(1, 2, 3, 4)),
                         [](const auto& info) {
                           std::string name =
                               std::get<0>(info.param) == StoreKind::kHash ? "hash_n" : "file_n";
                           name += std::to_string(std::get<1>(info.param));
                           return name;
                         });

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Form, all-reduce, destroy; form again under a new prefix in the same process; twice.
TEST(Gloo, ReformAfterDestroy) {
  SKIP_IF_NO_GLOO();
  auto store = MakeHashStore();
  for (int generation = 0; generation < 3; ++generation) {
    std::vector<std::thread> threads;
    for (int r = 0; r < 3; ++r) {
      threads.emplace_back([&, r] {
        auto g =
            MakeGlooGroup(store, "job/gen" + std::to_string(generation), r, 3, milliseconds(10000));
        ASSERT_TRUE(g.ok()) << g.status().ToString();
        int64_t v = r + generation;
        Status s =
            (*g)->AllReduce(&v, 1, ElemType::kI64, ReduceOp::kSum)->Wait(milliseconds(10000));
        ASSERT_TRUE(s.ok()) << s.ToString();
        EXPECT_EQ(v, 3 + 3 * generation);
      });
    }
    for (auto& t : threads) t.join();
  }
}

TEST(Gloo, SplitIntoSubGroups) {
  SKIP_IF_NO_GLOO();
  auto store = MakeHashStore();
  GlooBackend backend(store);
  RunRanks(backend, 4, [](int r, ProcessGroup& g) {
    const std::vector<int> mine = r % 2 ? std::vector<int>{3, 1} : std::vector<int>{2, 0};
    auto sub = g.Split(mine, r % 2 ? "odd" : "even");
    ASSERT_TRUE(sub.ok()) << sub.status().ToString();
    EXPECT_EQ((*sub)->name(), r % 2 ? "odd" : "even");
    EXPECT_EQ((*sub)->size(), 2);
    EXPECT_EQ((*sub)->rank(), r >= 2 ? 0 : 1);
    int32_t v = r;
    ASSERT_TRUE(
        (*sub)->AllReduce(&v, 1, ElemType::kI32, ReduceOp::kSum)->Wait(milliseconds(10000)).ok());
    EXPECT_EQ(v, r % 2 ? 4 : 2);
    int32_t w = 1;
    ASSERT_TRUE(g.AllReduce(&w, 1, ElemType::kI32, ReduceOp::kSum)->Wait(milliseconds(10000)).ok());
    EXPECT_EQ(w, 4);
  });
}

TEST(Gloo, SplitMembersMustAgree) {
  SKIP_IF_NO_GLOO();
  GlooBackend backend(MakeHashStore(), milliseconds(1000));
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    auto sub = g.Split({0, 1}, r == 0 ? "a" : "b");
    if (r == 1) {
      ASSERT_FALSE(sub.ok());
      EXPECT_EQ(sub.status().code(), StatusCode::kInvalidArgument);
      EXPECT_HAS(sub.status().message(), "every member must pass the same name and ranks");
    }
    // Rank 0 then waits for a peer that gave up: its rendezvous times out.
    if (r == 0) {
      ASSERT_FALSE(sub.ok());
      EXPECT_EQ(sub.status().code(), StatusCode::kDeadlineExceeded) << sub.status().ToString();
    }
  });
}

// A rank that never shows up at rendezvous: the others get DEADLINE_EXCEEDED naming the group.
TEST(Gloo, RankNeverJoinsTheGroup) {
  SKIP_IF_NO_GLOO();
  auto store = MakeHashStore();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto g = MakeGlooGroup(store, "lonely", r, 3, milliseconds(300));
      ASSERT_FALSE(g.ok());
      EXPECT_EQ(g.status().code(), StatusCode::kDeadlineExceeded) << g.status().ToString();
      EXPECT_HAS(g.status().message(), "lonely: forming gloo group");
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_LT(Seconds(t0), 3.0);
}

// A rank that never joins a collective: the others' Wait times out naming group and op, and
// the groups can be torn down without hanging.
TEST(Gloo, RankNeverJoinsTheCollective) {
  SKIP_IF_NO_GLOO();
  GlooBackend backend(MakeHashStore(), milliseconds(1000));
  const auto t0 = std::chrono::steady_clock::now();
  RunRanks(backend, 3, [](int r, ProcessGroup& g) {
    std::vector<float> buf(1000, 1.f);
    if (r == 2) {
      std::this_thread::sleep_for(milliseconds(300));
      return;  // destroys its group without joining
    }
    auto w = g.AllReduce(buf.data(), buf.size(), ElemType::kF32, ReduceOp::kSum);
    Status s = w->Wait(milliseconds(150));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_HAS(s.message(), "gloo-world: all_reduce timed out after 150 ms");
    // The op itself ends when the peer's sockets close or Gloo's own timeout fires.
    Status end = w->Wait(milliseconds(5000));
    EXPECT_FALSE(end.ok());
    EXPECT_TRUE(end.code() == StatusCode::kUnavailable ||
                end.code() == StatusCode::kDeadlineExceeded)
        << end.ToString();
    // The group is broken: later ops fail at once.
    Status later = g.Barrier()->Wait(milliseconds(5000));
    EXPECT_FALSE(later.ok());
    EXPECT_HAS(later.message(), "gloo-world: barrier failed");
  });
  EXPECT_LT(Seconds(t0), 4.0);
}

// Rank 2 joins late but within Gloo's timeout: waiting again after DEADLINE_EXCEEDED succeeds.
TEST(Gloo, LateRankCompletesTheOp) {
  SKIP_IF_NO_GLOO();
  GlooBackend backend(MakeHashStore(), milliseconds(5000));
  RunRanks(backend, 3, [](int r, ProcessGroup& g) {
    auto buf = testing::Filled(ElemType::kF32, r, 100);
    if (r == 2) std::this_thread::sleep_for(milliseconds(300));
    auto w = g.AllReduce(buf.data(), 100, ElemType::kF32, ReduceOp::kSum);
    if (r != 2) {
      Status s = w->Wait(milliseconds(50));
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    }
    Status s = w->Wait(milliseconds(5000));
    ASSERT_TRUE(s.ok()) << s.ToString();
    testing::ExpectAll(
        ElemType::kF32, buf.data(), 100,
        [](size_t i) { return testing::Expected(ElemType::kF32, ReduceOp::kSum, 3, i); },
        "late all_reduce");
  });
}

// Abort on one rank: its own waiter wakes at once, later ops fail, the peer's pending op fails
// soon (closed connections), and nothing waits for Gloo's 20 s timeout.
TEST(Gloo, AbortWakesWaitersAndPeers) {
  SKIP_IF_NO_GLOO();
  GlooBackend backend(MakeHashStore(), milliseconds(20000));
  const auto t0 = std::chrono::steady_clock::now();
  RunRanks(backend, 3, [](int r, ProcessGroup& g) {
    std::vector<float> buf(1000, 1.f);
    if (r == 2) {
      std::this_thread::sleep_for(milliseconds(300));
      Status s = g.Barrier()->Wait(milliseconds(10000));  // the others are in an all-reduce
      EXPECT_FALSE(s.ok());
      return;
    }
    auto w = g.AllReduce(buf.data(), buf.size(), ElemType::kF32, ReduceOp::kSum);
    if (r == 0) {
      std::thread aborter([&] {
        std::this_thread::sleep_for(milliseconds(100));
        g.Abort();
        g.Abort();
      });
      Status s = w->Wait(milliseconds(10000));
      aborter.join();
      EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
      EXPECT_HAS(s.message(), "gloo-world: all_reduce failed: group aborted by rank 0");
      Status later = g.Broadcast(buf.data(), 10, ElemType::kF32, 0)->Wait(milliseconds(100));
      EXPECT_EQ(later.code(), StatusCode::kCancelled);
    } else {
      Status s = w->Wait(milliseconds(10000));
      EXPECT_FALSE(s.ok());
      EXPECT_NE(s.code(), StatusCode::kDeadlineExceeded)
          << "peer should notice the abort: " << s.ToString();
    }
  });
  EXPECT_LT(Seconds(t0), 5.0);
}

TEST(Gloo, PointToPointTimeoutThenAbort) {
  SKIP_IF_NO_GLOO();
  GlooBackend backend(MakeHashStore(), milliseconds(20000));
  RunRanks(backend, 2, [](int r, ProcessGroup& g) {
    if (r != 0) {
      // Stay connected (but silent) while rank 0 times out; leaving closes the sockets.
      std::this_thread::sleep_for(milliseconds(300));
      return;
    }
    int32_t x = 0;
    auto w = g.Recv(&x, 1, ElemType::kI32, 1, 42);
    Status s = w->Wait(milliseconds(50));
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
    EXPECT_HAS(s.message(), "gloo-world: recv from rank 1 (tag 42) timed out after 50 ms");
    g.Abort();
    EXPECT_EQ(w->Wait(milliseconds(100)).code(), StatusCode::kCancelled);
  });
}

TEST(Gloo, InvalidArguments) {
  SKIP_IF_NO_GLOO();
  auto store = MakeHashStore();
  auto bad = MakeGlooGroup(store, "x", 2, 2, milliseconds(100));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  auto no_store = MakeGlooGroup(nullptr, "x", 0, 1, milliseconds(100));
  EXPECT_EQ(no_store.status().code(), StatusCode::kInvalidArgument);
  auto g = MakeGlooGroup(store, "single", 0, 1, milliseconds(100));
  ASSERT_TRUE(g.ok());
  float x = 0;
  Status s = (*g)->Broadcast(&x, 1, ElemType::kF32, 3)->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.message(), "single: broadcast: root 3");
  s = (*g)->Send(&x, 1, ElemType::kF32, 0, 1)->Wait(milliseconds(10));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
}

// The Store implementations themselves (the contract: tests/comm_test_util.h).
TEST(Store, HashStore) { testing::StoreContract(*MakeHashStore()); }

TEST(Store, FileStore) {
  strata::testing::ScratchDir dir;
  auto s = MakeFileStore(dir.path() + "/nested/store");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  testing::StoreContract(**s);
  // A second store object over the same directory (another process, say) sees the keys.
  auto t = MakeFileStore(dir.path() + "/nested/store");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*(*t)->Get("late", milliseconds(10)), "1");
}

TEST(Store, FileStoreBadDirectory) {
  auto s = MakeFileStore("/proc/version/cannot");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kIoError);
}

}  // namespace
}  // namespace strata::comm
