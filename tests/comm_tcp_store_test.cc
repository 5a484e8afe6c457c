// The TCP store (comm/tcp_store.h): the Store contract over TCP (one client shared by threads,
// many clients, large values, timeouts), namespacing and generation fencing, the shared
// secret, malformed frames on raw sockets, Stop with blocked waiters, connect retry, and Gloo
// groups of 2 and 4 thread-ranks formed through the server, destroyed and re-formed under a
// new generation in the same process (daemon-mode recovery).
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "comm/gloo.h"
#include "comm/tcp_store.h"
#include "tests/comm_test_util.h"
#include "tests/test_util.h"

namespace strata::comm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A server on a free loopback port, stopped when the test ends.
class Served {
 public:
  explicit Served(TcpStoreServerOptions options = {}) : server_(std::move(options)) {
    Status s = server_.Start("127.0.0.1:0");
    EXPECT_TRUE(s.ok()) << s.ToString();
    EXPECT_GT(server_.port(), 0);
  }
  TcpStoreServer& server() { return server_; }
  int port() const { return server_.port(); }
  std::string address() const { return "127.0.0.1:" + std::to_string(server_.port()); }

  std::shared_ptr<TcpStoreClient> Connect(const std::string& job = "job", int64_t generation = 0,
                                          const std::string& secret = "") {
    TcpStoreOptions o;
    o.job = job;
    o.generation = generation;
    o.secret = secret;
    auto c = ConnectTcpStoreClient("127.0.0.1", port(), o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? *c : nullptr;
  }

 private:
  TcpStoreServer server_;
};

TEST(TcpStore, StoreContract) {
  Served served;
  auto store = ConnectTcpStore("127.0.0.1", served.port());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  testing::StoreContract(**store);
}

TEST(TcpStore, StoreContractOverHostName) {
  Served served;
  TcpStoreOptions o;
  o.job = "by-name";
  auto store = ConnectTcpStore("localhost", served.port(), o);
  if (!store.ok()) GTEST_SKIP() << "localhost does not resolve here: " << store.status().ToString();
  testing::StoreContract(**store);
}

// Many threads park waits on one client; the keys are set in reverse order, so replies come
// back out of order and each must reach its own caller.
TEST(TcpStore, PipelinedWaitsOnOneClient) {
  Served served;
  auto c = served.Connect();
  constexpr int kThreads = 8;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      auto v = c->Get("k" + std::to_string(i), milliseconds(10000));
      ASSERT_TRUE(v.ok()) << v.status().ToString();
      EXPECT_EQ(*v, "value" + std::to_string(i));
      ++ok;
    });
  }
  std::this_thread::sleep_for(milliseconds(50));
  for (int i = kThreads - 1; i >= 0; --i) {
    const std::string n = std::to_string(i);
    ASSERT_TRUE(c->Set("k" + n, "value" + n).ok());
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kThreads);
}

TEST(TcpStore, ManyClientsFromThreads) {
  Served served;
  constexpr int kClients = 16;
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto c = served.Connect();
      ASSERT_NE(c, nullptr);
      for (int k = 0; k < 20; ++k) ASSERT_TRUE(c->Add("counter", 1).ok());
      ASSERT_TRUE(c->Set("rank/" + std::to_string(i), std::to_string(i * i)).ok());
      std::vector<std::string> all;
      for (int j = 0; j < kClients; ++j) all.push_back("rank/" + std::to_string(j));
      Status s = c->Wait(all, milliseconds(20000));
      ASSERT_TRUE(s.ok()) << s.ToString();
      const int peer = (i + 1) % kClients;
      EXPECT_EQ(*c->Get("rank/" + std::to_string(peer), milliseconds(10)),
                std::to_string(peer * peer));
    });
  }
  for (auto& t : threads) t.join();
  auto c = served.Connect();
  EXPECT_EQ(*c->Add("counter", 0), kClients * 20);
}

TEST(TcpStore, LargeValues) {
  Served served;
  auto c = served.Connect();
  std::string big(32 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 131) ^ (i >> 11));
  ASSERT_TRUE(c->Set("big", big).ok());
  auto other = served.Connect();
  auto v = other->Get("big", milliseconds(5000));
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_TRUE(*v == big);
  // Over the frame limit: refused on the client, which stays usable.
  Status s = c->Set("huge", std::string(kTcpStoreMaxFrameBytes, 'x'));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_HAS(s.message(), "exceeds the frame limit");
  EXPECT_TRUE(c->Set("small", "ok").ok());
  EXPECT_EQ(*c->Get("small", milliseconds(10)), "ok");
}

TEST(TcpStore, Timeouts) {
  Served served;
  auto c = served.Connect();
  auto t0 = Clock::now();
  auto zero = c->Get("missing", milliseconds(0));
  EXPECT_EQ(zero.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_HAS(zero.status().message(), "store: key 'missing' not set after 0 ms");
  t0 = Clock::now();
  Status w = c->Wait({"x", "y"}, milliseconds(200));
  const double took = Seconds(t0);
  EXPECT_EQ(w.code(), StatusCode::kDeadlineExceeded);
  EXPECT_HAS(w.message(), "store: keys 'x', 'y' not set after 200 ms");
  EXPECT_GE(took, 0.19);
  EXPECT_LT(took, 2.0);
  // "Forever" is fine too, and ends when the key comes.
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(50));
    ASSERT_TRUE(served.Connect()->Set("x", "1").ok());
  });
  EXPECT_EQ(*c->Get("x", milliseconds::max()), "1");
  setter.join();
  // Present keys need no wait, even with a zero timeout.
  EXPECT_TRUE(c->Wait({"x"}, milliseconds(0)).ok());
  // A key missing past its timeout is named, a present one is not.
  w = c->Wait({"x", "z"}, milliseconds(20));
  EXPECT_HAS(w.message(), "store: key 'z' not set after 20 ms");
}

TEST(TcpStore, CheckAndDeletePrefix) {
  Served served;
  auto c = served.Connect("job", 3);
  ASSERT_TRUE(c->Set("g/a", "1").ok());
  ASSERT_TRUE(c->Set("g/b", "2").ok());
  ASSERT_TRUE(c->Set("h/a", "3").ok());
  EXPECT_TRUE(*c->Check({"g/a", "g/b"}));
  EXPECT_FALSE(*c->Check({"g/a", "g/c"}));
  EXPECT_TRUE(*c->Check({}));
  EXPECT_EQ(*c->DeletePrefix("g/"), 2);
  EXPECT_FALSE(*c->Check({"g/a"}));
  EXPECT_TRUE(*c->Check({"h/a"}));
  // The server names keys by namespace: dropping a generation drops its keys only.
  auto next = served.Connect("job", 4);
  ASSERT_TRUE(next->Set("h/a", "4").ok());
  EXPECT_EQ(served.server().DeletePrefix(TcpStoreNamespace("job", 3)), 1u);
  EXPECT_FALSE(*c->Check({"h/a"}));
  EXPECT_EQ(*next->Get("h/a", milliseconds(10)), "4");
}

TEST(TcpStore, KeysAreNamespacedByJobAndGeneration) {
  Served served;
  EXPECT_EQ(TcpStoreNamespace("job", 7), "job/7/");
  auto a = served.Connect("job", 1);
  auto b = served.Connect("job", 2);
  auto other = served.Connect("other", 1);
  ASSERT_TRUE(a->Set("k", "gen1").ok());
  ASSERT_TRUE(b->Set("k", "gen2").ok());
  EXPECT_EQ(*a->Get("k", milliseconds(10)), "gen1");
  EXPECT_EQ(*b->Get("k", milliseconds(10)), "gen2");
  EXPECT_EQ(other->Get("k", milliseconds(10)).status().code(), StatusCode::kDeadlineExceeded);
  // A client cannot climb out of its namespace.
  EXPECT_EQ(b->Get("../1/k", milliseconds(10)).status().code(), StatusCode::kDeadlineExceeded);
}

TEST(TcpStore, StaleGenerationIsFenced) {
  Served served;
  auto old_client = served.Connect("job", 1);
  ASSERT_TRUE(old_client->Set("k", "v").ok());
  // A stale worker parked in a wait is woken by the fence, not left blocking.
  std::thread parked([&] {
    const auto t0 = Clock::now();
    Status s = old_client->Wait({"never"}, milliseconds(20000));
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
    EXPECT_HAS(s.message(), "stale generation 1 < 2");
    EXPECT_LT(Seconds(t0), 5.0);
  });
  std::this_thread::sleep_for(milliseconds(100));
  served.server().SetMinGeneration("job", 2);
  parked.join();
  EXPECT_EQ(served.server().MinGeneration("job"), 2);

  Status s = old_client->Set("k", "stale write");
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_HAS(s.message(), "tcp store: stale generation 1 < 2 of job 'job'");
  EXPECT_EQ(old_client->Get("k", milliseconds(10)).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(old_client->Add("n", 1).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(old_client->Check({"k"}).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(old_client->DeletePrefix("").status().code(), StatusCode::kFailedPrecondition);

  // A new connection from the old generation is refused at hello.
  TcpStoreOptions o;
  o.job = "job";
  o.generation = 1;
  auto late = ConnectTcpStore("127.0.0.1", served.port(), o);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_HAS(late.status().message(), served.address() + ": stale generation 1 < 2 of job 'job'");

  // The current and newer generations work, and so do other jobs.
  auto current = served.Connect("job", 2);
  ASSERT_NE(current, nullptr);
  EXPECT_TRUE(current->Set("k", "v2").ok());
  EXPECT_EQ(*current->Get("k", milliseconds(10)), "v2");
  EXPECT_TRUE(served.Connect("job", 5)->Set("k", "v5").ok());
  EXPECT_TRUE(served.Connect("other", 1)->Set("k", "v").ok());
  // The minimum never goes down.
  served.server().SetMinGeneration("job", 1);
  EXPECT_EQ(served.server().MinGeneration("job"), 2);
  EXPECT_EQ(old_client->Set("k", "x").code(), StatusCode::kFailedPrecondition);
}

TEST(TcpStore, SecretIsRequired) {
  TcpStoreServerOptions so;
  so.secret = "s3cret";
  Served served(so);
  TcpStoreOptions o;
  o.secret = "wrong";
  auto wrong = ConnectTcpStore("127.0.0.1", served.port(), o);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(wrong.status().message(), served.address() + ": wrong secret");
  o.secret = "";
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", served.port(), o).status().code(),
            StatusCode::kInvalidArgument);
  o.secret = "s3cret-longer";
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", served.port(), o).status().code(),
            StatusCode::kInvalidArgument);
  auto right = served.Connect("job", 0, "s3cret");
  ASSERT_NE(right, nullptr);
  EXPECT_TRUE(right->Set("k", "v").ok());
}

TEST(TcpStore, BadOptions) {
  TcpStoreOptions o;
  o.job = "a/b";
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", 1, o).status().code(), StatusCode::kInvalidArgument);
  o.job = "";
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", 1, o).status().code(), StatusCode::kInvalidArgument);
  o.job = "j";
  o.generation = -1;
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", 1, o).status().code(), StatusCode::kInvalidArgument);
  o.generation = 0;
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", 0, o).status().code(), StatusCode::kInvalidArgument);
}

TEST(TcpStore, ServerStartErrors) {
  TcpStoreServer bad;
  EXPECT_EQ(bad.Start("no-port").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.Start("127.0.0.1:99999").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.port(), 0);
  Served served;
  TcpStoreServer clash;
  Status s = clash.Start(served.address());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_EQ(served.server().Start("127.0.0.1:0").code(), StatusCode::kFailedPrecondition);
  TcpStoreServer never_started;
  never_started.Stop();
  never_started.Stop();
}

TEST(TcpStore, ConnectRetriesUntilTheServerIsUp) {
  int port = 0;
  {
    Served probe;  // a port that was free a moment ago
    port = probe.port();
  }
  TcpStoreOptions o;
  o.retry = false;
  auto t0 = Clock::now();
  auto refused = ConnectTcpStore("127.0.0.1", port, o);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable);
  EXPECT_HAS(refused.status().message(), "tcp store 127.0.0.1:" + std::to_string(port));
  EXPECT_LT(Seconds(t0), 1.0);

  o.retry = true;
  o.connect_timeout = milliseconds(300);
  t0 = Clock::now();
  EXPECT_EQ(ConnectTcpStore("127.0.0.1", port, o).status().code(), StatusCode::kUnavailable);
  EXPECT_GE(Seconds(t0), 0.25);
  EXPECT_LT(Seconds(t0), 3.0);

  o.connect_timeout = milliseconds(10000);
  TcpStoreServer server;
  std::thread starter([&] {
    std::this_thread::sleep_for(milliseconds(300));
    Status s = server.Start("127.0.0.1:" + std::to_string(port));
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
  auto c = ConnectTcpStore("127.0.0.1", port, o);
  starter.join();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE((*c)->Set("k", "v").ok());
}

// ---- malformed input on raw sockets ----

int RawConnect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

void SendRaw(int fd, const std::string& bytes) {
  EXPECT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(bytes.size()));
}

std::string Le(uint64_t v, int bytes) {
  std::string s;
  for (int i = 0; i < bytes; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return s;
}
std::string Str(const std::string& s) { return Le(s.size(), 4) + s; }
std::string Frame(const std::string& payload) { return Le(payload.size(), 4) + payload; }
std::string Hello(const std::string& secret = "") {
  return Frame(Le(1, 1) + Le(0, 8) + Le(0x31535453, 4) + Str(secret) + Str("job") + Le(0, 8));
}
std::string SetFrame(const std::string& key, const std::string& value) {
  return Frame(Le(2, 1) + Le(1, 8) + Str(key) + Str(value));
}

// True if the server closes fd within `within` (any reply bytes before that are discarded).
bool ClosedByServer(int fd, milliseconds within = milliseconds(3000)) {
  const auto deadline = Clock::now() + within;
  char buf[4096];
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return true;
  }
  return false;
}

TEST(TcpStore, MalformedFramesDropOnlyThatConnection) {
  Served served;
  auto bystander = served.Connect();
  ASSERT_TRUE(bystander->Set("before", "1").ok());
  // A client parked in a wait throughout: it must survive every bad connection.
  std::thread waiter([&] {
    auto v = bystander->Get("after", milliseconds(20000));
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(*v, "2");
  });

  const std::vector<std::pair<std::string, std::string>> cases = {
      {"garbage payload", Frame("\xff\x01garbage that parses as nothing")},
      {"oversized length", Le(0xffffffffu, 4) + "abc"},
      {"length just over the limit", Le(kTcpStoreMaxFrameBytes + 1, 4)},
      {"zero length", Le(0, 4)},
      {"request before hello", SetFrame("k", "v")},
      {"hello with a bad magic",
       Frame(Le(1, 1) + Le(0, 8) + Le(0x12345678, 4) + Str("") + Str("job") + Le(0, 8))},
      {"hello with a string running past the frame",
       Frame(Le(1, 1) + Le(0, 8) + Le(0x31535453, 4) + Le(1000, 4))},
      {"valid hello then garbage", Hello() + Frame("\x09\x00")},
      {"valid hello then a second hello", Hello() + Hello()},
      {"valid hello then a wait with a huge key count",
       Hello() + Frame(Le(4, 1) + Le(1, 8) + Le(0x7fffffff, 4) + Le(0, 8))},
  };
  for (const auto& [what, bytes] : cases) {
    const int fd = RawConnect(served.port());
    SendRaw(fd, bytes);
    EXPECT_TRUE(ClosedByServer(fd)) << what;
    ::close(fd);
  }
  // Truncated frames: the peer goes away mid-frame, or stays, silent, mid-frame.
  int fd = RawConnect(served.port());
  SendRaw(fd, Hello() + Le(100, 4) + "only ten b");
  ::close(fd);
  const int silent = RawConnect(served.port());
  SendRaw(silent, Hello() + Le(100, 4) + "only ten b");

  // A well-formed raw session works (and the reply has the documented shape).
  fd = RawConnect(served.port());
  SendRaw(fd, Hello() + SetFrame("raw", "x"));
  std::string replies;
  char buf[256];
  while (replies.size() < 2 * (4 + 13)) {
    pollfd p{fd, POLLIN, 0};
    ASSERT_GT(::poll(&p, 1, 3000), 0);
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0);
    replies.append(buf, static_cast<size_t>(n));
  }
  EXPECT_EQ(replies, Frame(Le(0, 8) + Le(0, 1) + Str("")) + Frame(Le(1, 8) + Le(0, 1) + Str("")));
  ::close(fd);

  auto fresh = served.Connect();
  EXPECT_EQ(*fresh->Get("raw", milliseconds(1000)), "x");
  ASSERT_TRUE(fresh->Set("after", "2").ok());
  waiter.join();
  EXPECT_EQ(*bystander->Get("before", milliseconds(10)), "1");
  ::close(silent);
}

TEST(TcpStore, WrongSecretOnARawSocketIsAnsweredThenClosed) {
  TcpStoreServerOptions so;
  so.secret = "s3cret";
  Served served(so);
  const int fd = RawConnect(served.port());
  SendRaw(fd, Hello("nope") + SetFrame("k", "v"));
  EXPECT_TRUE(ClosedByServer(fd));
  ::close(fd);
  auto c = served.Connect("job", 0, "s3cret");
  EXPECT_EQ(c->Get("k", milliseconds(10)).status().code(), StatusCode::kDeadlineExceeded);
}

TEST(TcpStore, StopWakesBlockedWaiters) {
  auto served = std::make_unique<Served>();
  const std::string address = served->address();
  auto shared = served->Connect();
  std::vector<std::shared_ptr<TcpStoreClient>> own;
  for (int i = 0; i < 3; ++i) own.push_back(served->Connect());
  std::atomic<int> woken{0};
  std::vector<std::thread> threads;
  const auto check = [&](Status s) {
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_HAS(s.message(), "tcp store " + address + ": connection lost");
    ++woken;
  };
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] { check(own[i]->Wait({"never"}, milliseconds(60000))); });
    threads.emplace_back([&] { check(shared->Get("never", milliseconds(60000)).status()); });
  }
  std::this_thread::sleep_for(milliseconds(200));
  const auto t0 = Clock::now();
  served->server().Stop();
  for (auto& t : threads) t.join();
  EXPECT_LT(Seconds(t0), 2.0);
  EXPECT_EQ(woken.load(), 6);
  // Later calls fail at once, naming the server.
  Status s = shared->Set("k", "v");
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_HAS(s.message(), address);
  served.reset();  // Stop again from the destructor: a no-op
}

// ---- Gloo groups formed through the TCP store ----

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

class GlooOverTcpStore : public ::testing::TestWithParam<int> {};

// Generation 1 with a client per rank, generation 2 with one client shared by every rank,
// generation 3 with a client per rank again; every generation uses the same group prefix,
// which the per-generation namespace keeps apart. Between generations the groups are
// destroyed, the server fences the old generation and drops its keys.
TEST_P(GlooOverTcpStore, AllReduceThenReformUnderANewGeneration) {
  if (!GlooUnusableReason().empty()) GTEST_SKIP() << GlooUnusableReason();
  const int n = GetParam();
  TcpStoreServerOptions so;
  so.secret = "job-secret";
  Served served(so);
  std::shared_ptr<Store> previous;  // one client of the previous generation
  for (int64_t gen = 1; gen <= 3; ++gen) {
    served.server().SetMinGeneration("job", gen);
    if (previous) {
      EXPECT_EQ(previous->Set("world/x", "stale").code(), StatusCode::kFailedPrecondition);
      EXPECT_GT(served.server().DeletePrefix(TcpStoreNamespace("job", gen - 1)), 0u);
    }
    TcpStoreOptions o;
    o.secret = "job-secret";
    o.job = "job";
    o.generation = gen;
    std::shared_ptr<Store> shared;
    if (gen == 2) {
      auto s = ConnectTcpStore("127.0.0.1", served.port(), o);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      shared = *s;
    }
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        std::shared_ptr<Store> store = shared;
        if (!store) {
          auto s = ConnectTcpStore("127.0.0.1", served.port(), o);
          ASSERT_TRUE(s.ok()) << s.status().ToString();
          store = *s;
        }
        auto g = MakeGlooGroup(store, "world", r, n, milliseconds(20000));
        ASSERT_TRUE(g.ok()) << "generation " << gen << " rank " << r << ": "
                            << g.status().ToString();
        std::vector<int64_t> v(1000);
        for (size_t i = 0; i < v.size(); ++i) v[i] = r * 1000 + static_cast<int64_t>(i) + gen;
        Status s = (*g)->AllReduce(v.data(), v.size(), ElemType::kI64, ReduceOp::kSum)
                       ->Wait(milliseconds(20000));
        ASSERT_TRUE(s.ok()) << s.ToString();
        for (size_t i = 0; i < v.size(); ++i) {
          const int64_t want = 1000 * n * (n - 1) / 2 + n * (static_cast<int64_t>(i) + gen);
          ASSERT_EQ(v[i], want) << "generation " << gen << " rank " << r << " index " << i;
        }
        s = (*g)->Barrier()->Wait(milliseconds(20000));
        ASSERT_TRUE(s.ok()) << s.ToString();
        if (r == 0 && !shared) previous = store;
      });  // the group is destroyed here, with its thread
    }
    for (auto& t : threads) t.join();
    if (shared) previous = shared;
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, GlooOverTcpStore, ::testing::Values(2, 4),
                         [](const auto& info) { return std::to_string(info.param) + "_ranks"; });

}  // namespace
}  // namespace strata::comm
