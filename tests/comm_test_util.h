// Shared checks for the process-group backends whose ranks can be threads of one process
// (in-process, Gloo): a backend only says how to form a group; every collective, size and
// element type is then checked the same way, against values computed here independently
// (bf16/f16 rounding through model/dtype.h, not through comm's own conversions).
#pragma once

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

#include "comm/elementwise.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "model/dtype.h"

namespace strata::comm::testing {

using std::chrono::milliseconds;

// How a backend forms the groups of one test: NewWorld once, then Join from each rank thread.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual void NewWorld(int n) = 0;
  virtual Result<std::unique_ptr<ProcessGroup>> Join(int rank) = 0;
};

// Runs fn(rank, group) on n threads, one per rank, and joins them.
inline void RunRanks(Backend& backend, int n, const std::function<void(int, ProcessGroup&)>& fn) {
  backend.NewWorld(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      auto g = backend.Join(r);
      ASSERT_TRUE(g.ok()) << "rank " << r << ": " << g.status().ToString();
      ASSERT_EQ((*g)->rank(), r);
      ASSERT_EQ((*g)->size(), n);
      fn(r, **g);
    });
  }
  for (auto& t : threads) t.join();
}

inline const std::vector<ElemType>& AllTypes() {
  static const std::vector<ElemType> kTypes = {ElemType::kF32, ElemType::kF64, ElemType::kI32,
                                               ElemType::kI64, ElemType::kU8,  ElemType::kBF16,
                                               ElemType::kF16};
  return kTypes;
}

inline const char* TypeName(ElemType t) { return internal::ElemTypeName(t); }

inline const char* OpName(ReduceOp op) { return internal::ReduceOpName(op); }

// The value rank r contributes at index i: small integers, exact in every type (negative
// except for u8), so sums are exact and only kAvg rounds.
inline int64_t Val(ElemType t, int r, size_t i, int salt = 0) {
  const int64_t v = static_cast<int64_t>((i * 7 + static_cast<size_t>(r) * 13 + salt * 5) % 17);
  return t == ElemType::kU8 ? v : v - 8;
}

inline void Put(ElemType t, void* buf, size_t i, double v) {
  switch (t) {
    case ElemType::kF32:
      static_cast<float*>(buf)[i] = static_cast<float>(v);
      return;
    case ElemType::kF64:
      static_cast<double*>(buf)[i] = v;
      return;
    case ElemType::kI32:
      static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v);
      return;
    case ElemType::kI64:
      static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v);
      return;
    case ElemType::kU8:
      static_cast<uint8_t*>(buf)[i] = static_cast<uint8_t>(static_cast<int64_t>(v));
      return;
    case ElemType::kBF16:
      static_cast<uint16_t*>(buf)[i] = model::FloatToBf16(static_cast<float>(v)).bits;
      return;
    case ElemType::kF16:
      static_cast<uint16_t*>(buf)[i] = model::FloatToHalfBits(static_cast<float>(v));
      return;
  }
}

inline double Get(ElemType t, const void* buf, size_t i) {
  switch (t) {
    case ElemType::kF32:
      return static_cast<const float*>(buf)[i];
    case ElemType::kF64:
      return static_cast<const double*>(buf)[i];
    case ElemType::kI32:
      return static_cast<const int32_t*>(buf)[i];
    case ElemType::kI64:
      return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case ElemType::kU8:
      return static_cast<const uint8_t*>(buf)[i];
    case ElemType::kBF16:
      return model::ToFloat(model::bf16{static_cast<const uint16_t*>(buf)[i]});
    case ElemType::kF16:
      return model::HalfBitsToFloat(static_cast<const uint16_t*>(buf)[i]);
  }
  return 0;
}

// The reduction over n ranks of Val(t, r, i, salt), as the contract defines it.
inline double Expected(ElemType t, ReduceOp op, int n, size_t i, int salt = 0) {
  int64_t sum = 0, mx = INT64_MIN;
  for (int r = 0; r < n; ++r) {
    sum += Val(t, r, i, salt);
    mx = std::max(mx, Val(t, r, i, salt));
  }
  if (op == ReduceOp::kMax) return static_cast<double>(mx);
  if (t == ElemType::kU8) sum %= 256;
  if (op == ReduceOp::kSum) return static_cast<double>(sum);
  switch (t) {
    case ElemType::kF32:
      return static_cast<float>(sum) / static_cast<float>(n);
    case ElemType::kF64:
      return static_cast<double>(sum) / n;
    case ElemType::kBF16:
      return model::ToFloat(model::FloatToBf16(static_cast<float>(sum) / static_cast<float>(n)));
    case ElemType::kF16:
      return model::HalfBitsToFloat(
          model::FloatToHalfBits(static_cast<float>(sum) / static_cast<float>(n)));
    default:
      return static_cast<double>(sum / n);  // integers: truncating division
  }
}

inline std::vector<uint8_t> Filled(ElemType t, int r, size_t count, int salt = 0) {
  std::vector<uint8_t> buf(count * ElemSize(t) + 1);  // +1: never a zero-size allocation
  for (size_t i = 0; i < count; ++i) Put(t, buf.data(), i, static_cast<double>(Val(t, r, i, salt)));
  return buf;
}

// Compares out[i] with want(i) for i < count; reports the first few mismatches.
inline void ExpectAll(ElemType t, const void* out, size_t count,
                      const std::function<double(size_t)>& want, const std::string& what) {
  int bad = 0;
  for (size_t i = 0; i < count && bad < 3; ++i) {
    const double got = Get(t, out, i);
    const double exp = want(i);
    if (got != exp) {
      ADD_FAILURE() << what << ": element " << i << " is " << got << ", expected " << exp;
      ++bad;
    }
  }
}

constexpr milliseconds kWait{20000};

inline void CheckAllReduce(int r, ProcessGroup& g, ElemType t, ReduceOp op, size_t count) {
  const std::string what = "rank " + std::to_string(r) + " all_reduce " + TypeName(t) + " " +
                           OpName(op) + " x" + std::to_string(count) +
                           " n=" + std::to_string(g.size());
  auto buf = Filled(t, r, count);
  ASSERT_TRUE(g.AllReduce(buf.data(), count, t, op)->Wait(kWait).ok()) << what;
  ExpectAll(
      t, buf.data(), count, [&](size_t i) { return Expected(t, op, g.size(), i); }, what);
}

inline void CheckReduceScatter(int r, ProcessGroup& g, ElemType t, ReduceOp op, size_t count) {
  const int n = g.size();
  const std::string what = "rank " + std::to_string(r) + " reduce_scatter " + TypeName(t) + " " +
                           OpName(op) + " x" + std::to_string(count) + " n=" + std::to_string(n);
  auto in = Filled(t, r, count * n);
  std::vector<uint8_t> out(count * ElemSize(t) + 1, 0xAB);
  Status s = g.ReduceScatter(in.data(), out.data(), count, t, op)->Wait(kWait);
  ASSERT_TRUE(s.ok()) << what << ": " << s.ToString();
  ExpectAll(
      t, out.data(), count, [&](size_t i) { return Expected(t, op, n, r * count + i); }, what);
}

// In place: the output is this rank's block of the input.
inline void CheckReduceScatterInPlace(int r, ProcessGroup& g, ElemType t, size_t count) {
  const int n = g.size();
  const size_t es = ElemSize(t);
  auto buf = Filled(t, r, count * n);
  uint8_t* out = buf.data() + r * count * es;
  Status s = g.ReduceScatter(buf.data(), out, count, t, ReduceOp::kSum)->Wait(kWait);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectAll(
      t, out, count, [&](size_t i) { return Expected(t, ReduceOp::kSum, n, r * count + i); },
      "rank " + std::to_string(r) + " in-place reduce_scatter " + TypeName(t));
}

inline void CheckAllGather(int r, ProcessGroup& g, ElemType t, size_t count, bool in_place) {
  const int n = g.size();
  const size_t es = ElemSize(t);
  const std::string what = "rank " + std::to_string(r) + " all_gather " + TypeName(t) + " x" +
                           std::to_string(count) + (in_place ? " in place" : "") +
                           " n=" + std::to_string(n);
  auto mine = Filled(t, r, count, 1);
  std::vector<uint8_t> out(count * es * n + 1, 0xCD);
  const void* in = mine.data();
  if (in_place) {
    std::memcpy(out.data() + r * count * es, mine.data(), count * es);
    in = out.data() + r * count * es;
  }
  Status s = g.AllGather(in, out.data(), count, t)->Wait(kWait);
  ASSERT_TRUE(s.ok()) << what << ": " << s.ToString();
  ExpectAll(
      t, out.data(), count * n,
      [&](size_t i) {
        return static_cast<double>(Val(t, static_cast<int>(i / count), i % count, 1));
      },
      what);
}

inline void CheckBroadcast(int r, ProcessGroup& g, ElemType t, size_t count, int root) {
  const std::string what = "rank " + std::to_string(r) + " broadcast " + TypeName(t) + " x" +
                           std::to_string(count) + " root " + std::to_string(root);
  auto buf = Filled(t, r, count, 2);
  Status s = g.Broadcast(buf.data(), count, t, root)->Wait(kWait);
  ASSERT_TRUE(s.ok()) << what << ": " << s.ToString();
  ExpectAll(
      t, buf.data(), count, [&](size_t i) { return static_cast<double>(Val(t, root, i, 2)); },
      what);
}

// Ring exchange: every rank sends to r+1 and receives from r-1, twice on the same tag (they
// must match in issue order) and once on another tag, posted in the opposite order.
inline void CheckSendRecvRing(int r, ProcessGroup& g, size_t count) {
  const int n = g.size();
  if (n == 1) return;
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  const ElemType t = ElemType::kI32;
  auto a = Filled(t, r, count, 3), b = Filled(t, r, count, 4), c = Filled(t, r, count, 5);
  std::vector<uint8_t> ra(a.size()), rb(b.size()), rc(c.size());
  std::vector<std::unique_ptr<Work>> works;
  works.push_back(g.Recv(rc.data(), count, t, left, 9));
  works.push_back(g.Send(a.data(), count, t, right, 7));
  works.push_back(g.Send(b.data(), count, t, right, 7));
  works.push_back(g.Recv(ra.data(), count, t, left, 7));
  works.push_back(g.Recv(rb.data(), count, t, left, 7));
  works.push_back(g.Send(c.data(), count, t, right, 9));
  for (auto& w : works) {
    Status s = w->Wait(kWait);
    ASSERT_TRUE(s.ok()) << "rank " << r << ": " << s.ToString();
  }
  const std::string what = "rank " + std::to_string(r) + " recv x" + std::to_string(count);
  ExpectAll(
      t, ra.data(), count, [&](size_t i) { return double(Val(t, left, i, 3)); }, what + " a");
  ExpectAll(
      t, rb.data(), count, [&](size_t i) { return double(Val(t, left, i, 4)); }, what + " b");
  ExpectAll(
      t, rc.data(), count, [&](size_t i) { return double(Val(t, left, i, 5)); }, what + " c");
}

// Nobody leaves the barrier before everybody has arrived.
inline void CheckBarrier(int r, ProcessGroup& g, std::atomic<int>* arrived) {
  for (int round = 1; round <= 3; ++round) {
    arrived->fetch_add(1);
    if (r == 0) std::this_thread::sleep_for(milliseconds(20));  // rank 0 is late every round
    Status s = g.Barrier()->Wait(kWait);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_GE(arrived->load(), round * g.size())
        << "rank " << r << " left barrier " << round << " early";
    // Keep rounds apart so a fast rank cannot add next round's arrival too early.
    ASSERT_TRUE(g.Barrier()->Wait(kWait).ok());
  }
}

}  // namespace strata::comm::testing

namespace strata::comm::testing {

// The collective suites, run by every thread-rank backend for group sizes 1..4.
inline void AllReduceSuite(Backend& b, int n) {
  RunRanks(b, n, [](int r, ProcessGroup& g) {
    for (ElemType t : AllTypes()) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
        for (size_t count : {size_t{0}, size_t{1}, size_t{1001}})
          CheckAllReduce(r, g, t, op, count);
      }
    }
    CheckAllReduce(r, g, ElemType::kF32, ReduceOp::kSum, size_t{1} << 20);   // 4 MB
    CheckAllReduce(r, g, ElemType::kBF16, ReduceOp::kAvg, size_t{1} << 20);  // 2 MB
  });
}

inline void ReduceScatterSuite(Backend& b, int n) {
  RunRanks(b, n, [](int r, ProcessGroup& g) {
    for (ElemType t : AllTypes()) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
        for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
          CheckReduceScatter(r, g, t, op, count);
        }
      }
    }
    CheckReduceScatter(r, g, ElemType::kF32, ReduceOp::kAvg, size_t{1} << 19);  // 2 MB blocks
    for (ElemType t : {ElemType::kI32, ElemType::kBF16}) CheckReduceScatterInPlace(r, g, t, 1001);
  });
}

inline void AllGatherSuite(Backend& b, int n) {
  RunRanks(b, n, [](int r, ProcessGroup& g) {
    for (ElemType t : AllTypes()) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{1001}}) {
        CheckAllGather(r, g, t, count, false);
        CheckAllGather(r, g, t, count, true);
      }
    }
    CheckAllGather(r, g, ElemType::kF32, size_t{1} << 19, false);  // 2 MB per rank
  });
}

inline void BroadcastSuite(Backend& b, int n) {
  RunRanks(b, n, [](int r, ProcessGroup& g) {
    for (int root = 0; root < g.size(); ++root) {
      for (ElemType t : {ElemType::kF32, ElemType::kBF16, ElemType::kU8, ElemType::kI64}) {
        for (size_t count : {size_t{0}, size_t{1}, size_t{1001}})
          CheckBroadcast(r, g, t, count, root);
      }
    }
    CheckBroadcast(r, g, ElemType::kF32, size_t{1} << 20, g.size() - 1);
  });
}

inline void SendRecvSuite(Backend& b, int n) {
  RunRanks(b, n, [](int r, ProcessGroup& g) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{1001}, size_t{1} << 20}) {
      CheckSendRecvRing(r, g, count);
    }
  });
}

inline void BarrierSuite(Backend& b, int n) {
  std::atomic<int> arrived{0};
  RunRanks(b, n, [&](int r, ProcessGroup& g) { CheckBarrier(r, g, &arrived); });
}

// Many ops in flight at once, waited for in reverse order.
inline void CheckManyInFlight(int r, ProcessGroup& g) {
  constexpr int kOps = 8;
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<std::unique_ptr<Work>> works;
  for (int k = 0; k < kOps; ++k) {
    bufs.push_back(Filled(ElemType::kF32, r, 1000 + k, k));
    works.push_back(g.AllReduce(bufs.back().data(), 1000 + k, ElemType::kF32, ReduceOp::kSum));
  }
  for (int k = kOps - 1; k >= 0; --k) {
    Status s = works[k]->Wait(kWait);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectAll(
        ElemType::kF32, bufs[k].data(), 1000 + k,
        [&](size_t i) { return Expected(ElemType::kF32, ReduceOp::kSum, g.size(), i, k); },
        "in-flight op " + std::to_string(k));
  }
}

inline void ManyInFlightSuite(Backend& b, int n) { RunRanks(b, n, CheckManyInFlight); }

// The Store contract every implementation (hash, file, TCP) must meet: values are bytes, Get and
// Wait time out naming the missing keys, a Set from another thread ends a Wait (on the same
// client), Add is atomic across threads and refuses non-integers.
inline void StoreContract(Store& s) {
  ASSERT_TRUE(s.Set("a/b c", std::string("v\0x", 3)).ok());
  auto v = s.Get("a/b c", std::chrono::milliseconds(100));
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, std::string("v\0x", 3));
  auto missing = s.Get("nope", std::chrono::milliseconds(30));
  EXPECT_EQ(missing.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(missing.status().message().find("store: key 'nope' not set after 30 ms"),
            std::string::npos)
      << missing.status().message();
  Status w = s.Wait({"a/b c", "k1", "k2"}, std::chrono::milliseconds(30));
  EXPECT_EQ(w.code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(w.message().find("'k1', 'k2'"), std::string::npos) << w.message();
  // Another thread's Set on the same client is not held up by this thread's Wait.
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_TRUE(s.Set("late", "1").ok());
  });
  EXPECT_TRUE(s.Wait({"late"}, std::chrono::milliseconds(5000)).ok());
  setter.join();
  std::vector<std::thread> adders;
  for (int i = 0; i < 4; ++i) {
    adders.emplace_back([&] {
      for (int k = 0; k < 25; ++k) ASSERT_TRUE(s.Add("counter", 1).ok());
    });
  }
  for (auto& t : adders) t.join();
  auto total = s.Add("counter", 0);
  ASSERT_TRUE(total.ok());
  EXPECT_EQ(*total, 100);
  EXPECT_EQ(*s.Get("counter", std::chrono::milliseconds(10)), "100");
  EXPECT_EQ(s.Add("a/b c", 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*s.Add("neg", -5), -5);
}

}  // namespace strata::comm::testing
