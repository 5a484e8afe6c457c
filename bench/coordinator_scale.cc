// Coordinator scale: N simulated workers heartbeating at 1 Hz and M API clients polling, against
// a real `strata-coordinator` process. Reports the coordinator's CPU use (utime + stime from
// /proc over the measured window, in cores) and the heartbeat round trip (send -> HeartbeatAck,
// which the control plane sends after it has processed the heartbeat), plus API latencies.
//
//   build/bin/coordinator_scale --workers 1000,10000 --clients 8 --seconds 20
//
// The simulated workers run in this process on one epoll thread (on a busy machine it may not
// keep up with 10,000/s: the heartbeats/s column says what was offered): each connects, registers
// (WorkerHello), then sends a Heartbeat{want_ack} every second, staggered evenly over the
// second. The API clients are threads that each GET /v1/jobs and /healthz once a second.
// Bar (issue 6): 10,000 workers on <= 1 core.
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/http_client.h"
#include "proto/control.pb.h"
#include "proto/frame.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using strata::Result;
using strata::Status;

struct Options {
  std::vector<int> workers = {1000, 10000};
  int clients = 8;
  double seconds = 20;
  std::string coordinator;  // path of strata-coordinator
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

// utime + stime of `pid` in seconds.
double CpuSeconds(pid_t pid) {
  std::ifstream f(fmt::format("/proc/{}/stat", pid));
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t rp = all.rfind(')');
  if (rp == std::string::npos) return -1;
  std::istringstream in(all.substr(rp + 2));
  std::string field;
  double ut = 0, st = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) ut = std::stod(field);
    if (i == 15) st = std::stod(field);
  }
  return (ut + st) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

struct Coordinator {
  pid_t pid = -1;
  std::string api, control;
  std::string dir;
};

// Starts strata-coordinator on loopback ports and reads its "listening on" line.
Result<Coordinator> StartCoordinator(const std::string& binary) {
  Coordinator c;
  c.dir = fmt::format("/tmp/strata-coordinator-scale-{}", getpid());
  std::filesystem::remove_all(c.dir);
  std::filesystem::create_directories(c.dir);
  const std::string out = c.dir + "/stdout";
  std::vector<std::string> args = {binary,        "--data-dir",  c.dir + "/data",
                                   "--listen",    "127.0.0.1:0", "--control-listen",
                                   "127.0.0.1:0", "--log-level", "warn"};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  if (posix_spawn(&c.pid, binary.c_str(), &fa, nullptr, argv.data(), environ) != 0) {
    return Status(strata::StatusCode::kUnavailable, "cannot start " + binary);
  }
  posix_spawn_file_actions_destroy(&fa);
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  while (Clock::now() < deadline) {
    std::ifstream f(out);
    std::string line;
    while (std::getline(f, line)) {
      const size_t a = line.find("listening on ");
      const size_t w = line.find("workers connect to ");
      if (a != std::string::npos && w != std::string::npos) {
        c.api = line.substr(a + 13, line.find(' ', a + 13) - (a + 13));
        c.control = line.substr(w + 19);
        while (!c.control.empty() && !std::isdigit(static_cast<unsigned char>(c.control.back()))) {
          c.control.pop_back();
        }
        return c;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(c.pid, SIGKILL);
  return Status(strata::StatusCode::kDeadlineExceeded, "coordinator did not print its ports");
}

void StopCoordinator(const Coordinator& c) {
  kill(c.pid, SIGTERM);
  int st = 0;
  waitpid(c.pid, &st, 0);
  std::filesystem::remove_all(c.dir);
}

struct SimWorker {
  int fd = -1;
  std::string in;                       // bytes read, not yet a whole frame
  uint64_t seq = 0;                     // heartbeats sent
  Clock::time_point next;               // next heartbeat
  std::vector<Clock::time_point> sent;  // send time per seq (index seq - 1)
};

int ConnectTo(const std::string& host_port) {
  Result<int> fd = strata::wire::Connect(host_port, std::chrono::seconds(10));
  if (!fd.ok()) return -1;
  const int one = 1;
  setsockopt(*fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return *fd;
}

bool SendAll(int fd, const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t w = ::send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (w <= 0) return false;
    off += static_cast<size_t>(w);
  }
  return true;
}

struct RunResult {
  int workers = 0, registered = 0;
  double cpu_cores = 0;  // coordinator CPU seconds per wall second over the window
  double window_s = 0;   // the measured window
  double coordinator_rss_mb = 0;
  int64_t heartbeats = 0, acks = 0;
  std::vector<double> rtt_ms;
  std::vector<double> api_ms;
  int64_t api_errors = 0;
};

double RssMb(pid_t pid) {
  std::ifstream f(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

RunResult Run(const Options& o, int n) {
  RunResult res;
  res.workers = n;
  Result<Coordinator> co = StartCoordinator(o.coordinator);
  if (!co.ok()) {
    std::fprintf(stderr, "%s\n", co.status().ToString().c_str());
    return res;
  }
  std::vector<SimWorker> ws(static_cast<size_t>(n));
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  // Register every worker (blocking hello/reply), then switch its socket to non-blocking.
  for (int i = 0; i < n; ++i) {
    SimWorker& w = ws[static_cast<size_t>(i)];
    w.fd = ConnectTo(co->control);
    if (w.fd < 0) break;
    strata::proto::ControlMessage hello;
    hello.mutable_hello()->set_worker_id(fmt::format("sim{}", i));
    hello.mutable_hello()->set_host("127.0.0.1");
    hello.mutable_hello()->set_device("cpu");
    if (!strata::wire::WriteFrame(w.fd, hello).ok()) break;
    strata::proto::ControlMessage reply;
    if (!strata::wire::ReadFrame(w.fd, &reply, std::chrono::seconds(10)).ok() ||
        !reply.hello_reply().ok()) {
      break;
    }
    ++res.registered;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = static_cast<uint32_t>(i);
    epoll_ctl(ep, EPOLL_CTL_ADD, w.fd, &ev);
  }
  std::fprintf(stderr, "  %d of %d simulated workers registered\n", res.registered, n);

  // API pollers.
  std::atomic<bool> stop{false};
  std::mutex api_mu;
  std::vector<std::thread> clients;
  Result<strata::coordinator::HostPort> api =
      strata::coordinator::ParseHostPort(co->api, "coordinator API");
  for (int c = 0; c < o.clients && api.ok(); ++c) {
    clients.emplace_back([&, c] {
      auto next = Clock::now() + std::chrono::milliseconds(1000 * c / std::max(1, o.clients));
      while (!stop.load()) {
        std::this_thread::sleep_until(next);
        next += std::chrono::seconds(1);
        for (const char* target : {"/v1/jobs", "/healthz"}) {
          strata::coordinator::HttpRequest rq;
          rq.target = target;
          const auto t0 = Clock::now();
          auto r = strata::coordinator::HttpCall(*api, rq, std::chrono::seconds(10));
          const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
          std::lock_guard<std::mutex> lock(api_mu);
          if (r.ok() && r->status == 200) {
            res.api_ms.push_back(ms);
          } else {
            ++res.api_errors;
          }
        }
      }
    });
  }

  // Heartbeats for `seconds` (the first 2 s are warm-up, not measured).
  const auto start = Clock::now();
  for (int i = 0; i < res.registered; ++i) {
    ws[static_cast<size_t>(i)].next =
        start + std::chrono::microseconds(static_cast<int64_t>(1e6 * i / res.registered));
  }
  const auto warm_end = start + std::chrono::seconds(2);
  const auto end = warm_end + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(o.seconds));
  double cpu0 = -1;
  uint64_t first_measured_seq = 0;
  std::vector<epoll_event> events(1024);
  size_t cursor = 0;  // workers are due in index order within each second
  std::vector<int> order(static_cast<size_t>(res.registered));
  for (int i = 0; i < res.registered; ++i) order[static_cast<size_t>(i)] = i;
  while (Clock::now() < end) {
    auto now = Clock::now();
    if (cpu0 < 0 && now >= warm_end) {
      cpu0 = CpuSeconds(co->pid);
      first_measured_seq = 1;  // marker: measuring from here on
    }
    // Send every heartbeat that is due.
    for (size_t k = 0; k < order.size(); ++k) {
      SimWorker& w = ws[static_cast<size_t>(order[cursor])];
      if (w.next > now) break;
      strata::proto::ControlMessage hb;
      hb.mutable_heartbeat()->set_seq(++w.seq);
      hb.mutable_heartbeat()->set_want_ack(true);
      Result<std::string> f = strata::wire::EncodeFrame(hb);
      w.sent.push_back(now);
      if (f.ok() && SendAll(w.fd, *f) && cpu0 >= 0) ++res.heartbeats;
      w.next += std::chrono::seconds(1);
      cursor = (cursor + 1) % order.size();
    }
    const auto next_due = order.empty() ? end : ws[static_cast<size_t>(order[cursor])].next;
    const int wait_ms = static_cast<int>(std::clamp<int64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(next_due - Clock::now()).count(), 0,
        10));
    const int ne = epoll_wait(ep, events.data(), static_cast<int>(events.size()), wait_ms);
    const auto got = Clock::now();
    for (int e = 0; e < ne; ++e) {
      SimWorker& w = ws[events[static_cast<size_t>(e)].data.u32];
      char buf[4096];
      const ssize_t r = ::recv(w.fd, buf, sizeof(buf), MSG_DONTWAIT);
      if (r <= 0) continue;
      w.in.append(buf, static_cast<size_t>(r));
      while (w.in.size() >= 4) {
        const auto* u = reinterpret_cast<const unsigned char*>(w.in.data());
        const uint32_t len =
            u[0] | (u[1] << 8) | (u[2] << 16) | (static_cast<uint32_t>(u[3]) << 24);
        if (w.in.size() < 4 + len) break;
        strata::proto::ControlMessage m;
        if (m.ParseFromArray(w.in.data() + 4, static_cast<int>(len)) && m.has_heartbeat_ack()) {
          const uint64_t s = m.heartbeat_ack().seq();
          if (s >= 1 && s <= w.sent.size() && w.sent[s - 1] >= warm_end) {
            ++res.acks;
            res.rtt_ms.push_back(
                std::chrono::duration<double, std::milli>(got - w.sent[s - 1]).count());
          }
        }
        w.in.erase(0, 4 + len);
      }
    }
  }
  (void)first_measured_seq;
  const double wall = std::chrono::duration<double>(Clock::now() - warm_end).count();
  res.cpu_cores = (CpuSeconds(co->pid) - cpu0) / wall;
  res.window_s = wall;
  res.coordinator_rss_mb = RssMb(co->pid);
  stop.store(true);
  for (std::thread& t : clients) t.join();
  for (SimWorker& w : ws) {
    if (w.fd >= 0) ::close(w.fd);
  }
  ::close(ep);
  StopCoordinator(*co);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  o.coordinator = (std::filesystem::path(argv[0]).parent_path() / "strata-coordinator").string();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--workers") {
      o.workers.clear();
      std::stringstream ss(next());
      std::string item;
      while (std::getline(ss, item, ',')) o.workers.push_back(std::stoi(item));
    } else if (a == "--clients") {
      o.clients = std::stoi(next());
    } else if (a == "--seconds") {
      o.seconds = std::stod(next());
    } else if (a == "--coordinator") {
      o.coordinator = next();
    } else {
      std::fprintf(stderr,
                   "usage: coordinator_scale [--workers N,N] [--clients M] [--seconds S] "
                   "[--coordinator PATH]\n");
      return 2;
    }
  }
  // Each simulated worker is one descriptor here and one in the coordinator.
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  std::printf(
      "| workers | registered | clients | coordinator CPU (cores) | RSS MB | heartbeats/s | "
      "acks | RTT p50 ms | RTT p99 ms | RTT max ms | API p50 ms | API p99 ms | API "
      "errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  int rc = 0;
  for (int n : o.workers) {
    std::fprintf(stderr, "N = %d ...\n", n);
    const RunResult r = Run(o, n);
    if (r.registered < n) rc = 1;
    std::printf(
        "| %d | %d | %d | %.3f | %.0f | %.0f | %lld | %.2f | %.2f | %.2f | %.2f | %.2f | "
        "%lld |\n",
        r.workers, r.registered, o.clients, r.cpu_cores, r.coordinator_rss_mb,
        r.window_s > 0 ? static_cast<double>(r.heartbeats) / r.window_s : 0.0,
        static_cast<long long>(r.acks), Percentile(r.rtt_ms, 0.5), Percentile(r.rtt_ms, 0.99),
        r.rtt_ms.empty() ? 0.0 : *std::max_element(r.rtt_ms.begin(), r.rtt_ms.end()),
        Percentile(r.api_ms, 0.5), Percentile(r.api_ms, 0.99),
        static_cast<long long>(r.api_errors));
    std::fflush(stdout);
  }
  return rc;
}
