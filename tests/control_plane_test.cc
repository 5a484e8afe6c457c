// The control plane's wire handling, with raw sockets against an in-process control plane:
// garbage and truncated frames drop only that connection, a silent connection is dropped after
// hello_timeout, a wrong secret is refused with a reason, and the daemon keeps serving real
// workers throughout (registration and acknowledged heartbeats).
#include "coordinator/control_plane.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "comm/tcp_store.h"
#include "coordinator/job_store.h"
#include "proto/control.pb.h"
#include "proto/frame.h"
#include "tests/test_util.h"

namespace strata {
namespace {

using std::chrono::milliseconds;

class ControlPlaneWireTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = coordinator::JobStore::Open(dir_.path() + "/state");
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(*s);
    ASSERT_TRUE(rendezvous_.Start("127.0.0.1:0").ok());
    coordinator::ControlPlaneOptions o;
    o.secret = "s3cret";
    o.hello_timeout = milliseconds(300);
    o.checkpoint_root = dir_.path() + "/ckpt";
    auto c = coordinator::ControlPlane::Start(store_.get(), &rendezvous_, o);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    cp_ = std::move(*c);
    address_ = fmt::format("127.0.0.1:{}", cp_->port());
  }

  int Connect() {
    Result<int> fd = wire::Connect(address_, std::chrono::seconds(5));
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    return fd.ok() ? *fd : -1;
  }

  static void SendRaw(int fd, const std::string& bytes) {
    ASSERT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }

  // True when the coordinator closed `fd` within `within` (reads EOF or a reset).
  static bool ClosedByPeer(int fd, milliseconds within = milliseconds(3000)) {
    proto::ControlMessage m;
    const auto deadline = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < deadline) {
      Status s = wire::ReadFrame(fd, &m, milliseconds(100));
      if (s.code() == StatusCode::kDeadlineExceeded) continue;
      if (s.code() == StatusCode::kUnavailable) return true;
      if (!s.ok()) return false;  // a frame we did not expect is not a close
    }
    return false;
  }

  // Registers worker `id` with the right secret and checks a heartbeat is acknowledged.
  void RegisterAndBeat(const std::string& id) {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    proto::ControlMessage hello;
    hello.mutable_hello()->set_worker_id(id);
    hello.mutable_hello()->set_secret("s3cret");
    hello.mutable_hello()->set_device("cpu");
    ASSERT_TRUE(wire::WriteFrame(fd, hello).ok());
    proto::ControlMessage reply;
    ASSERT_TRUE(wire::ReadFrame(fd, &reply, milliseconds(5000)).ok());
    ASSERT_TRUE(reply.has_hello_reply());
    EXPECT_TRUE(reply.hello_reply().ok()) << reply.hello_reply().error();
    proto::ControlMessage hb;
    hb.mutable_heartbeat()->set_seq(42);
    hb.mutable_heartbeat()->set_want_ack(true);
    ASSERT_TRUE(wire::WriteFrame(fd, hb).ok());
    proto::ControlMessage ack;
    ASSERT_TRUE(wire::ReadFrame(fd, &ack, milliseconds(5000)).ok());
    ASSERT_TRUE(ack.has_heartbeat_ack());
    EXPECT_EQ(ack.heartbeat_ack().seq(), 42u);
    bool listed = false;
    for (const auto& w : cp_->List()) listed |= w.id == id && w.state == "idle";
    EXPECT_TRUE(listed) << id << " is not listed as an idle worker";
    ::close(fd);
  }

  static std::string Frame(const std::string& body) {
    const uint32_t n = static_cast<uint32_t>(body.size());
    std::string f = {static_cast<char>(n & 0xff), static_cast<char>((n >> 8) & 0xff),
                     static_cast<char>((n >> 16) & 0xff), static_cast<char>(n >> 24)};
    return f + body;
  }

  testing::ScratchDir dir_;
  std::unique_ptr<coordinator::JobStore> store_;
  comm::TcpStoreServer rendezvous_;
  std::unique_ptr<coordinator::ControlPlane> cp_;
  std::string address_;
};

TEST_F(ControlPlaneWireTest, GarbageAndBadFramesDropOnlyThatConnection) {
  proto::ControlMessage heartbeat;
  heartbeat.mutable_heartbeat()->set_seq(1);
  std::string hb_bytes;
  ASSERT_TRUE(heartbeat.SerializeToString(&hb_bytes));
  const struct {
    const char* what;
    std::string bytes;
  } cases[] = {
      {"HTTP request", "GET / HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"zero length", std::string(4, '\0')},
      {"length over the 16 MiB cap", std::string("\xff\xff\xff\x7f", 4)},
      {"bytes that do not parse", Frame("\xff\x01garbage that parses as nothing")},
      {"first frame is not a hello", Frame(hb_bytes)},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    SendRaw(fd, c.bytes);
    EXPECT_TRUE(ClosedByPeer(fd)) << "the connection must be dropped";
    ::close(fd);
  }
  RegisterAndBeat("after-garbage");
}

TEST_F(ControlPlaneWireTest, TruncatedFramesAndSilenceAreDropped) {
  // The peer goes away mid-frame.
  {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    SendRaw(fd, Frame(std::string(100, 'x')).substr(0, 50));
    ::close(fd);
  }
  // The peer stays, silent, mid-frame: dropped after hello_timeout (300 ms here).
  {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    SendRaw(fd, std::string("\x10\x00", 2));
    EXPECT_TRUE(ClosedByPeer(fd, milliseconds(3000)));
    ::close(fd);
  }
  // Connects and says nothing.
  {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    EXPECT_TRUE(ClosedByPeer(fd, milliseconds(3000)));
    ::close(fd);
  }
  RegisterAndBeat("after-truncation");
}

TEST_F(ControlPlaneWireTest, WrongSecretIsRefusedWithAReason) {
  const int fd = Connect();
  ASSERT_GE(fd, 0);
  proto::ControlMessage hello;
  hello.mutable_hello()->set_worker_id("intruder");
  hello.mutable_hello()->set_secret("guess");
  ASSERT_TRUE(wire::WriteFrame(fd, hello).ok());
  proto::ControlMessage reply;
  ASSERT_TRUE(wire::ReadFrame(fd, &reply, milliseconds(5000)).ok());
  ASSERT_TRUE(reply.has_hello_reply());
  EXPECT_FALSE(reply.hello_reply().ok());
  EXPECT_NE(reply.hello_reply().error().find("secret"), std::string::npos)
      << reply.hello_reply().error();
  EXPECT_TRUE(ClosedByPeer(fd));
  ::close(fd);
  for (const auto& w : cp_->List()) EXPECT_NE(w.id, "intruder");
  RegisterAndBeat("honest");
}

TEST_F(ControlPlaneWireTest, ManyConnectionsAreServedByOneThread) {
  // 300 registered workers at once (the scale benchmark goes to 10,000), all acknowledged.
  std::vector<int> fds;
  for (int i = 0; i < 300; ++i) {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    proto::ControlMessage hello;
    hello.mutable_hello()->set_worker_id(fmt::format("w{}", i));
    hello.mutable_hello()->set_secret("s3cret");
    ASSERT_TRUE(wire::WriteFrame(fd, hello).ok());
    fds.push_back(fd);
  }
  for (int fd : fds) {
    proto::ControlMessage reply;
    ASSERT_TRUE(wire::ReadFrame(fd, &reply, milliseconds(5000)).ok());
    EXPECT_TRUE(reply.hello_reply().ok());
    proto::ControlMessage hb;
    hb.mutable_heartbeat()->set_seq(7);
    hb.mutable_heartbeat()->set_want_ack(true);
    ASSERT_TRUE(wire::WriteFrame(fd, hb).ok());
  }
  for (int fd : fds) {
    proto::ControlMessage ack;
    ASSERT_TRUE(wire::ReadFrame(fd, &ack, milliseconds(5000)).ok());
    EXPECT_EQ(ack.heartbeat_ack().seq(), 7u);
  }
  EXPECT_EQ(cp_->List().size(), 300u);
  for (int fd : fds) ::close(fd);
  // Closed connections mark their workers lost; the scheduler then forgets them.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!cp_->List().empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(50));
  }
  EXPECT_TRUE(cp_->List().empty());
}

TEST_F(ControlPlaneWireTest, JobsRunOnlyOnWorkersOfTheirDevice) {
  // A CPU worker is registered; a job asking for resources.device: cuda stays PENDING (no CUDA
  // worker), while a CPU job is assigned to it.
  const int fd = Connect();
  ASSERT_GE(fd, 0);
  proto::ControlMessage hello;
  hello.mutable_hello()->set_worker_id("cpu0");
  hello.mutable_hello()->set_secret("s3cret");
  hello.mutable_hello()->set_device("cpu");
  ASSERT_TRUE(wire::WriteFrame(fd, hello).ok());
  proto::ControlMessage reply;
  ASSERT_TRUE(wire::ReadFrame(fd, &reply, milliseconds(5000)).ok());
  ASSERT_TRUE(reply.hello_reply().ok());
  const std::string text = testing::WriteText(dir_.path() + "/in.txt", 4000);
  auto spec = [&](const char* device) {
    return testing::SpecFromYaml(
        fmt::format("model: {{layers: 1, heads: 1, d_model: 16, seq_len: 8}}\n"
                    "data: {{train: {}}}\n"
                    "train: {{steps: 2, global_batch: 2, micro_batch: 2}}\n"
                    "resources: {{device: {}, workers: 1}}\n",
                    text, device));
  };
  auto gpu = store_->Submit(spec("cuda"), "");
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  std::this_thread::sleep_for(milliseconds(500));  // five scheduler ticks
  auto rec = store_->Get(gpu->job.id());
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->state(), proto::JOB_STATE_PENDING) << "a CPU worker must not take a CUDA job";
  ASSERT_TRUE(store_->Transition(gpu->job.id(), proto::JOB_STATE_CANCELLED).ok());
  auto cpu = store_->Submit(spec("cpu"), "");
  ASSERT_TRUE(cpu.ok());
  // The CPU job's assignment arrives on the worker's connection.
  bool assigned = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!assigned && std::chrono::steady_clock::now() < deadline) {
    proto::ControlMessage m;
    Status s = wire::ReadFrame(fd, &m, milliseconds(200));
    if (s.ok() && m.has_assign()) assigned = m.assign().job_id() == cpu->job.id();
  }
  EXPECT_TRUE(assigned);
  ::close(fd);
}

}  // namespace
}  // namespace strata
