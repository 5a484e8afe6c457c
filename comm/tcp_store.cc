// The TCP store: a Boost.Asio server on one I/O thread and a blocking-socket client with one
// reader thread. The wire format and the fencing rules are in tcp_store.h.
//
// Server: all connection, waiter and timer state lives on the I/O thread (no locks). The key
// map and the per-job minimum generations are also touched by SetMinGeneration/DeletePrefix
// from other threads, so they sit behind mu_. A Get/Wait whose keys are missing is parked as a
// Waiter (with a timer); every Set/Add re-checks the parked waiters. Replies to one connection
// are queued and written in order; a connection that lets too many reply bytes pile up is not
// read from until they drain (back-pressure instead of unbounded memory).
//
// Client: requests are pipelined. A caller registers its request id, sends its frame under
// write_mu_, and sleeps on cv_ until the reader thread hands it the reply with that id, the
// connection breaks, or the reply is overdue.
#include "comm/tcp_store.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "comm/backend_util.h"
#include "comm/store_util.h"
#include "common/logging.h"

namespace strata::comm {

namespace {

using std::chrono::milliseconds;

// common/status.h has no helper for this code.
Status Unavailable(std::string m) { return Status(StatusCode::kUnavailable, std::move(m)); }

constexpr uint32_t kMagic = 0x31535453;  // "STS1" little-endian
// The most requests of one connection that may be waiting for their reply (parked waits
// included); more is a misbehaving client and closes the connection.
constexpr size_t kMaxInflight = 4096;
// Reply bytes queued on one connection above which the server stops reading from it.
constexpr size_t kMaxQueuedReplyBytes = size_t{256} << 20;
// Longest wait the server parks (it also keeps timer arithmetic far from overflow).
constexpr milliseconds kMaxWait = std::chrono::hours(24 * 365);

enum class Op : uint8_t {
  kHello = 1,
  kSet = 2,
  kGet = 3,
  kWait = 4,
  kAdd = 5,
  kCheck = 6,
  kDeletePrefix = 7,
};

const char* OpName(Op op) {
  switch (op) {
    case Op::kHello:
      return "hello";
    case Op::kSet:
      return "set";
    case Op::kGet:
      return "get";
    case Op::kWait:
      return "wait";
    case Op::kAdd:
      return "add";
    case Op::kCheck:
      return "check";
    case Op::kDeletePrefix:
      return "delete_prefix";
  }
  return "?";
}

// ---- encoding ----

class Encoder {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void U64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  // Strings longer than 4 GiB are cut in the length field, but such a frame is over the limit
  // and refused before it is sent, so nothing inconsistent reaches the wire.
  void Str(const std::string& s) {
    U32(static_cast<uint32_t>(s.size()));
    out_ += s;
  }
  void List(const std::vector<std::string>& v) {
    U32(static_cast<uint32_t>(v.size()));
    for (const auto& s : v) Str(s);
  }
  void Raw(const std::string& s) { out_ += s; }
  std::string Take() { return std::move(out_); }
  size_t size() const { return out_.size(); }

 private:
  std::string out_;
};

uint32_t Le32(const unsigned char* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

// Reads fields off a payload; every method returns false (and stays false) once the payload is
// too short, so a truncated or garbage frame is detected without reading past its end.
class Decoder {
 public:
  explicit Decoder(const std::string& s) : p_(s.data()), n_(s.size()) {}
  bool U8(uint8_t* v) {
    if (n_ < 1) return false;
    *v = static_cast<uint8_t>(*p_);
    Skip(1);
    return true;
  }
  bool U32(uint32_t* v) {
    if (n_ < 4) return false;
    *v = Le32(reinterpret_cast<const unsigned char*>(p_));
    Skip(4);
    return true;
  }
  bool U64(uint64_t* v) {
    if (n_ < 8) return false;
    uint64_t x = 0;
    for (int i = 0; i < 8; ++i) x |= uint64_t{static_cast<unsigned char>(p_[i])} << (8 * i);
    *v = x;
    Skip(8);
    return true;
  }
  bool I64(int64_t* v) {
    uint64_t u = 0;
    if (!U64(&u)) return false;
    *v = static_cast<int64_t>(u);
    return true;
  }
  bool Str(std::string* s) {
    uint32_t len = 0;
    if (!U32(&len) || len > n_) return false;
    s->assign(p_, len);
    Skip(len);
    return true;
  }
  bool List(std::vector<std::string>* v) {
    uint32_t count = 0;
    if (!U32(&count) || count > n_ / 4) return false;  // each entry takes >= 4 bytes
    v->resize(count);
    for (auto& s : *v) {
      if (!Str(&s)) return false;
    }
    return true;
  }
  bool AtEnd() const { return n_ == 0; }
  std::string Rest() const { return std::string(p_, n_); }

 private:
  void Skip(size_t k) {
    p_ += k;
    n_ -= k;
  }
  const char* p_;
  size_t n_;
};

// A frame: the u32 length, then the payload.
std::string Frame(const std::string& payload) {
  Encoder e;
  e.U32(static_cast<uint32_t>(payload.size()));
  e.Raw(payload);
  return e.Take();
}

// ---- shared semantics (the same messages as MakeHashStore's) ----

bool ValidJob(const std::string& job) { return !job.empty() && job.find('/') == std::string::npos; }

milliseconds ClampWait(int64_t ms) {
  return std::clamp(milliseconds(ms), milliseconds(0), kMaxWait);
}

}  // namespace

std::string TcpStoreNamespace(const std::string& job, int64_t generation) {
  return job + "/" + std::to_string(generation) + "/";
}

// =====================================================================================
// Server
// =====================================================================================

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;

struct Conn {
  explicit Conn(tcp::socket s) : sock(std::move(s)) {}
  tcp::socket sock;
  std::string peer;
  bool hello = false;
  std::string job;
  int64_t generation = 0;
  std::string ns;  // TcpStoreNamespace(job, generation)
  std::array<unsigned char, 4> header{};
  std::string body;
  std::deque<std::string> out;  // reply frames not yet written
  size_t out_bytes = 0;
  size_t inflight = 0;  // requests read whose reply is not queued yet
  bool writing = false;
  bool read_paused = false;  // back-pressure: too many reply bytes queued
  bool closing = false;      // close once `out` is written (a rejected hello)
  bool closed = false;
};

// A Get or Wait parked until its keys are set, its timer fires, or its client goes stale.
struct Waiter {
  explicit Waiter(asio::io_context& io) : timer(io) {}
  std::shared_ptr<Conn> conn;
  uint64_t id = 0;
  bool is_get = false;
  std::vector<std::string> names;  // as the client named them (for messages)
  std::vector<std::string> keys;   // full server-side names
  milliseconds timeout{0};
  asio::steady_timer timer;
  bool done = false;
};

Status SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgument("tcp store: bind address '" + address + "' is not host:port");
  }
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (port->empty() || port->size() > 5 ||
      !std::all_of(port->begin(), port->end(), [](char ch) { return ch >= '0' && ch <= '9'; }) ||
      std::stoi(*port) > 65535) {
    return InvalidArgument("tcp store: bad port in bind address '" + address + "'");
  }
  return Status();
}

}  // namespace

class TcpStoreServer::Impl {
 public:
  explicit Impl(TcpStoreServerOptions options) : options_(std::move(options)) {}
  ~Impl() { Stop(); }

  Status Start(const std::string& bind_address) {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (started_ || stopped_) {
      return FailedPrecondition(std::string("tcp store: server already ") +
                                (stopped_ ? "stopped" : "started"));
    }
    std::string host, port;
    RETURN_IF_ERROR(SplitHostPort(bind_address, &host, &port));
    error_code ec;
    tcp::resolver resolver(io_);
    auto results =
        resolver.resolve(host, port, tcp::resolver::passive | tcp::resolver::numeric_service, ec);
    if (ec || results.empty()) {
      return InvalidArgument("tcp store: cannot resolve bind address '" + bind_address +
                             "': " + (ec ? ec.message() : "no address"));
    }
    const tcp::endpoint endpoint = results.begin()->endpoint();
    auto fail = [&](const char* what) {
      error_code ignored;
      acceptor_.close(ignored);
      return Unavailable("tcp store: cannot " + std::string(what) + " " + bind_address + ": " +
                         ec.message());
    };
    if (acceptor_.open(endpoint.protocol(), ec)) return fail("open a socket for");
    if (acceptor_.set_option(tcp::acceptor::reuse_address(true), ec)) return fail("configure");
    if (acceptor_.bind(endpoint, ec)) return fail("bind");
    if (acceptor_.listen(asio::socket_base::max_listen_connections, ec)) return fail("listen on");
    const tcp::endpoint local = acceptor_.local_endpoint(ec);
    if (ec) return fail("query");
    port_ = local.port();
    started_ = true;
    Accept();
    thread_ = std::thread([this] {
      // Handlers do not throw; a bad_alloc or a Boost bug still must not kill the process.
      try {
        io_.run();
      } catch (const std::exception& e) {
        spdlog::error("tcp store: I/O thread stopped: {}", e.what());
      }
    });
    return Status();
  }

  void Stop() {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (stopped_) return;
    stopped_ = true;
    if (!started_) return;
    // Closing everything leaves the I/O thread without work, so run() returns: every pending
    // handler then completes with an error and re-arms nothing.
    asio::post(io_, [this] { CloseAll(); });
    thread_.join();
  }

  int port() const { return port_.load(); }

  void SetMinGeneration(const std::string& job, int64_t generation) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      int64_t& min = min_gen_[job];
      if (generation <= min) return;
      min = generation;
    }
    asio::post(io_, [this] { FailStaleWaiters(); });
  }

  int64_t MinGeneration(const std::string& job) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = min_gen_.find(job);
    return it == min_gen_.end() ? 0 : it->second;
  }

  size_t DeletePrefix(const std::string& prefix) {
    std::lock_guard<std::mutex> lock(mu_);
    return DeletePrefixLocked(prefix);
  }

 private:
  size_t DeletePrefixLocked(const std::string& prefix) {
    size_t n = 0;
    auto it = kv_.lower_bound(prefix);
    while (it != kv_.end() && it->first.compare(0, prefix.size(), prefix) == 0) {
      it = kv_.erase(it);
      ++n;
    }
    return n;
  }

  // ---- everything below runs on the I/O thread ----

  void Accept() {
    acceptor_.async_accept([this](const error_code& ec, tcp::socket sock) {
      if (!acceptor_.is_open()) return;
      if (ec) {
        if (ec == asio::error::operation_aborted) return;
        // E.g. out of file descriptors: try again shortly rather than spin.
        spdlog::warn("tcp store: accept failed: {}", ec.message());
        accept_retry_.expires_after(milliseconds(50));
        accept_retry_.async_wait([this](const error_code& e) {
          if (!e && acceptor_.is_open()) Accept();
        });
        return;
      }
      auto c = std::make_shared<Conn>(std::move(sock));
      error_code ignored;
      c->sock.set_option(tcp::no_delay(true), ignored);
      const tcp::endpoint ep = c->sock.remote_endpoint(ignored);
      c->peer = ep.address().to_string() + ":" + std::to_string(ep.port());
      conns_.insert(c);
      ReadFrame(c);
      Accept();
    });
  }

  void ReadFrame(const std::shared_ptr<Conn>& c) {
    asio::async_read(c->sock, asio::buffer(c->header), [this, c](const error_code& ec, size_t) {
      if (c->closed) return;
      if (ec) {
        // A clean close between frames is a client going away, not worth a warning.
        Drop(c, ec == asio::error::eof ? "" : "read failed: " + ec.message());
        return;
      }
      const uint32_t n = Le32(c->header.data());
      if (n == 0 || n > kTcpStoreMaxFrameBytes) {
        Drop(c, "bad frame length " + std::to_string(n));
        return;
      }
      c->body.resize(n);
      asio::async_read(c->sock, asio::buffer(c->body), [this, c](const error_code& ec, size_t) {
        if (c->closed) return;
        if (ec) {
          Drop(c, "truncated frame: " + ec.message());
          return;
        }
        if (!Handle(c)) return;
        if (c->out_bytes > kMaxQueuedReplyBytes) {
          c->read_paused = true;  // StartWrite resumes reading once the replies drain
          return;
        }
        ReadFrame(c);
      });
    });
  }

  // Handles the request in c->body; false when the connection is not to be read any more.
  bool Handle(const std::shared_ptr<Conn>& c) {
    Decoder d(c->body);
    uint8_t raw_op = 0;
    uint64_t id = 0;
    if (!d.U8(&raw_op) || !d.U64(&id)) return Drop(c, "malformed request header");
    const Op op = static_cast<Op>(raw_op);
    if (!c->hello) {
      if (op != Op::kHello) return Drop(c, "the first request is not a hello");
      return Hello(c, id, d);
    }
    if (++c->inflight > kMaxInflight) return Drop(c, "too many requests in flight");
    switch (op) {
      case Op::kSet: {
        std::string key, value;
        if (!d.Str(&key) || !d.Str(&value) || !d.AtEnd()) return Drop(c, "malformed set");
        if (!Fenced(c, id)) {
          {
            std::lock_guard<std::mutex> lock(mu_);
            kv_[c->ns + key] = std::move(value);
          }
          Reply(c, id, Status());
          WakeWaiters();
        }
        return true;
      }
      case Op::kGet: {
        std::string key;
        int64_t timeout_ms = 0;
        if (!d.Str(&key) || !d.I64(&timeout_ms) || !d.AtEnd()) return Drop(c, "malformed get");
        if (!Fenced(c, id)) Park(c, id, /*is_get=*/true, {key}, timeout_ms);
        return true;
      }
      case Op::kWait: {
        std::vector<std::string> keys;
        int64_t timeout_ms = 0;
        if (!d.List(&keys) || !d.I64(&timeout_ms) || !d.AtEnd()) return Drop(c, "malformed wait");
        if (!Fenced(c, id)) Park(c, id, /*is_get=*/false, std::move(keys), timeout_ms);
        return true;
      }
      case Op::kAdd: {
        std::string key;
        int64_t delta = 0;
        if (!d.Str(&key) || !d.I64(&delta) || !d.AtEnd()) return Drop(c, "malformed add");
        if (!Fenced(c, id)) {
          Result<int64_t> v = AddLocked(c->ns + key, key, delta);
          if (v.ok()) {
            Encoder e;
            e.I64(*v);
            Reply(c, id, Status(), e.Take());
            WakeWaiters();
          } else {
            Reply(c, id, v.status());
          }
        }
        return true;
      }
      case Op::kCheck: {
        std::vector<std::string> keys;
        if (!d.List(&keys) || !d.AtEnd()) return Drop(c, "malformed check");
        if (!Fenced(c, id)) {
          bool all = true;
          {
            std::lock_guard<std::mutex> lock(mu_);
            for (const auto& k : keys) all = all && kv_.count(c->ns + k) > 0;
          }
          Encoder e;
          e.U8(all ? 1 : 0);
          Reply(c, id, Status(), e.Take());
        }
        return true;
      }
      case Op::kDeletePrefix: {
        std::string prefix;
        if (!d.Str(&prefix) || !d.AtEnd()) return Drop(c, "malformed delete_prefix");
        if (!Fenced(c, id)) {
          Encoder e;
          e.I64(static_cast<int64_t>(DeletePrefix(c->ns + prefix)));
          Reply(c, id, Status(), e.Take());
        }
        return true;
      }
      case Op::kHello:
        return Drop(c, "a second hello");
    }
    return Drop(c, "unknown op " + std::to_string(raw_op));
  }

  bool Hello(const std::shared_ptr<Conn>& c, uint64_t id, Decoder& d) {
    uint32_t magic = 0;
    std::string secret, job;
    int64_t generation = 0;
    if (!d.U32(&magic) || magic != kMagic || !d.Str(&secret) || !d.Str(&job) ||
        !d.I64(&generation) || !d.AtEnd()) {
      return Drop(c, "malformed hello");
    }
    Status s;
    if (!SecretMatches(secret)) {
      s = InvalidArgument("wrong secret");
    } else if (!ValidJob(job) || generation < 0) {
      s = InvalidArgument("bad job '" + job + "' or generation " + std::to_string(generation) +
                          " (a job name is non-empty without '/', a generation >= 0)");
    } else {
      c->job = job;
      c->generation = generation;
      s = StaleStatus(*c);
    }
    if (!s.ok()) {
      spdlog::warn("tcp store: rejecting {} (job '{}' generation {}): {}", c->peer, job, generation,
                   s.message());
      c->closing = true;  // the reply goes out, then the connection closes
      Reply(c, id, s);
      return false;
    }
    c->hello = true;
    c->ns = TcpStoreNamespace(job, generation);
    Reply(c, id, Status());
    return true;
  }

  bool SecretMatches(const std::string& given) const {
    const std::string& want = options_.secret;
    if (want.empty()) return true;
    // Constant time in the contents (the length is no secret worth hiding).
    unsigned char diff = given.size() == want.size() ? 0 : 1;
    for (size_t i = 0; i < want.size(); ++i) {
      diff |= static_cast<unsigned char>(want[i] ^ (i < given.size() ? given[i] : 0));
    }
    return diff == 0;
  }

  Status StaleStatus(const Conn& c) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = min_gen_.find(c.job);
    if (it == min_gen_.end() || c.generation >= it->second) return Status();
    return FailedPrecondition("stale generation " + std::to_string(c.generation) + " < " +
                              std::to_string(it->second) + " of job '" + c.job + "'");
  }

  // Replies with the fencing error and returns true when c's generation is stale.
  bool Fenced(const std::shared_ptr<Conn>& c, uint64_t id) {
    Status s = StaleStatus(*c);
    if (s.ok()) return false;
    Reply(c, id, s.WithContext("tcp store"));
    return true;
  }

  Result<int64_t> AddLocked(const std::string& full, const std::string& key, int64_t delta) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = kv_.find(full);
    int64_t v = 0;
    if (it != kv_.end()) {
      ASSIGN_OR_RETURN(v, ParseStoreCounter(key, it->second));
    }
    int64_t sum = 0;
    if (__builtin_add_overflow(v, delta, &sum)) {
      return OutOfRange("store: Add on key '" + key + "' overflows int64");
    }
    kv_[full] = std::to_string(sum);
    return sum;
  }

  void Park(const std::shared_ptr<Conn>& c, uint64_t id, bool is_get,
            std::vector<std::string> names, int64_t timeout_ms) {
    auto w = std::make_shared<Waiter>(io_);
    w->conn = c;
    w->id = id;
    w->is_get = is_get;
    for (const auto& k : names) w->keys.push_back(c->ns + k);
    w->names = std::move(names);
    w->timeout = ClampWait(timeout_ms);
    if (TryComplete(w)) return;
    if (w->timeout.count() == 0) {
      TimeOut(w);
      return;
    }
    waiters_.push_back(w);
    w->timer.expires_after(w->timeout);
    w->timer.async_wait([this, w](const error_code&) {
      if (!w->done) TimeOut(w);
    });
  }

  // Replies and retires w if all its keys are set.
  bool TryComplete(const std::shared_ptr<Waiter>& w) {
    Encoder e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& k : w->keys) {
        if (!kv_.count(k)) return false;
      }
      if (w->is_get) e.Str(kv_[w->keys[0]]);
    }
    Finish(w, Status(), e.Take());
    return true;
  }

  void TimeOut(const std::shared_ptr<Waiter>& w) {
    std::vector<std::string> missing;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < w->keys.size(); ++i) {
        if (!kv_.count(w->keys[i])) missing.push_back(w->names[i]);
      }
    }
    Finish(w, StoreKeyTimeout(missing, w->timeout));
  }

  void Finish(const std::shared_ptr<Waiter>& w, const Status& s, const std::string& fields = "") {
    if (w->done) return;
    w->done = true;
    w->timer.cancel();
    waiters_.remove(w);
    Reply(w->conn, w->id, s, fields);
  }

  void WakeWaiters() {
    if (waiters_.empty()) return;
    const std::vector<std::shared_ptr<Waiter>> all(waiters_.begin(), waiters_.end());
    for (const auto& w : all) {
      if (!w->done) TryComplete(w);
    }
  }

  void FailStaleWaiters() {
    const std::vector<std::shared_ptr<Waiter>> all(waiters_.begin(), waiters_.end());
    for (const auto& w : all) {
      if (w->done) continue;
      Status s = StaleStatus(*w->conn);
      if (!s.ok()) Finish(w, s.WithContext("tcp store"));
    }
  }

  void Reply(const std::shared_ptr<Conn>& c, uint64_t id, const Status& s,
             const std::string& fields = "") {
    if (c->inflight > 0) --c->inflight;
    if (c->closed) return;
    Encoder e;
    e.U64(id);
    e.U8(static_cast<uint8_t>(s.code()));
    e.Str(s.ok() ? std::string() : s.message());
    if (s.ok()) e.Raw(fields);
    std::string frame = Frame(e.Take());
    c->out_bytes += frame.size();
    c->out.push_back(std::move(frame));
    StartWrite(c);
  }

  void StartWrite(const std::shared_ptr<Conn>& c) {
    if (c->writing || c->out.empty() || c->closed) return;
    c->writing = true;
    asio::async_write(c->sock, asio::buffer(c->out.front()),
                      [this, c](const error_code& ec, size_t) {
                        c->writing = false;
                        if (c->closed) return;
                        if (ec) {
                          Drop(c, "write failed: " + ec.message());
                          return;
                        }
                        c->out_bytes -= c->out.front().size();
                        c->out.pop_front();
                        if (c->out.empty() && c->closing) {
                          Drop(c, "");
                          return;
                        }
                        if (c->read_paused && c->out_bytes <= kMaxQueuedReplyBytes / 2) {
                          c->read_paused = false;
                          ReadFrame(c);
                        }
                        StartWrite(c);
                      });
  }

  // Closes c and retires its parked waits. Returns false (for Handle's "stop reading").
  bool Drop(const std::shared_ptr<Conn>& c, const std::string& reason) {
    if (c->closed) return false;
    if (!reason.empty()) spdlog::warn("tcp store: closing connection from {}: {}", c->peer, reason);
    c->closed = true;
    error_code ignored;
    c->sock.shutdown(tcp::socket::shutdown_both, ignored);
    c->sock.close(ignored);
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      if ((*it)->conn == c) {
        (*it)->done = true;
        (*it)->timer.cancel();
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
    conns_.erase(c);
    return false;
  }

  void CloseAll() {
    error_code ignored;
    acceptor_.close(ignored);
    accept_retry_.cancel();
    const std::vector<std::shared_ptr<Conn>> all(conns_.begin(), conns_.end());
    for (const auto& c : all) Drop(c, "");
  }

  const TcpStoreServerOptions options_;
  asio::io_context io_;  // first member: destroyed last, after every socket and timer
  tcp::acceptor acceptor_{io_};
  asio::steady_timer accept_retry_{io_};
  std::thread thread_;
  std::atomic<int> port_{0};

  std::mutex state_mu_;   // serialises Start and Stop
  bool started_ = false;  // GUARDED_BY(state_mu_)
  bool stopped_ = false;  // GUARDED_BY(state_mu_)

  mutable std::mutex mu_;
  std::map<std::string, std::string> kv_;   // GUARDED_BY(mu_)
  std::map<std::string, int64_t> min_gen_;  // GUARDED_BY(mu_)

  // I/O thread only.
  std::set<std::shared_ptr<Conn>> conns_;
  std::list<std::shared_ptr<Waiter>> waiters_;
};

TcpStoreServer::TcpStoreServer(TcpStoreServerOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
TcpStoreServer::~TcpStoreServer() { Stop(); }
Status TcpStoreServer::Start(const std::string& bind_address) { return impl_->Start(bind_address); }
int TcpStoreServer::port() const { return impl_->port(); }
void TcpStoreServer::SetMinGeneration(const std::string& job, int64_t generation) {
  impl_->SetMinGeneration(job, generation);
}
int64_t TcpStoreServer::MinGeneration(const std::string& job) const {
  return impl_->MinGeneration(job);
}
size_t TcpStoreServer::DeletePrefix(const std::string& prefix) {
  return impl_->DeletePrefix(prefix);
}
void TcpStoreServer::Stop() { impl_->Stop(); }

// =====================================================================================
// Client
// =====================================================================================

namespace {

using Clock = std::chrono::steady_clock;

std::string Errno(int err) { return std::strerror(err); }

// Sends all of `data`; false with *err on failure (SO_SNDTIMEO bounds a stuck peer).
bool SendAll(int fd, const std::string& data, std::string* err) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      *err = errno == EAGAIN || errno == EWOULDBLOCK ? "send timed out" : Errno(errno);
      return false;
    }
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Receives exactly n bytes; with a deadline, waits for data no longer than that.
bool RecvAll(int fd, char* buf, size_t n, std::optional<Clock::time_point> deadline,
             std::string* err) {
  size_t got = 0;
  while (got < n) {
    if (deadline) {
      const auto left = std::chrono::duration_cast<milliseconds>(*deadline - Clock::now()).count();
      pollfd p{fd, POLLIN, 0};
      const int r =
          left > 0 ? ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1 << 30))) : 0;
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        *err = Errno(errno);
        return false;
      }
      if (r == 0) {
        *err = "timed out waiting for the server";
        return false;
      }
    }
    const ssize_t k = ::recv(fd, buf + got, n - got, 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      *err = Errno(errno);
      return false;
    }
    if (k == 0) {
      *err = "closed by the server";
      return false;
    }
    got += static_cast<size_t>(k);
  }
  return true;
}

// Reads one reply frame; its payload in *payload.
bool RecvFrame(int fd, std::string* payload, std::optional<Clock::time_point> deadline,
               std::string* err) {
  std::array<char, 4> header{};
  if (!RecvAll(fd, header.data(), 4, deadline, err)) return false;
  const uint32_t n = Le32(reinterpret_cast<const unsigned char*>(header.data()));
  // A reply carries at most a value that fit in a request frame, plus a small header.
  if (n < 13 || n > kTcpStoreMaxFrameBytes + 1024) {
    *err = "bad reply frame length " + std::to_string(n);
    return false;
  }
  payload->resize(n);
  return RecvAll(fd, payload->data(), n, deadline, err);
}

// Splits a reply into id, status and the op's fields.
bool ParseReply(const std::string& payload, uint64_t* id, Status* status, std::string* fields) {
  Decoder d(payload);
  uint8_t code = 0;
  std::string message;
  if (!d.U64(id) || !d.U8(&code) || !d.Str(&message)) return false;
  if (code > static_cast<uint8_t>(StatusCode::kResourceExhausted)) return false;
  *status = code == 0 ? Status() : Status(static_cast<StatusCode>(code), std::move(message));
  *fields = d.Rest();
  return true;
}

std::string FormatAddress(const std::string& host, int port) {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

// One connection attempt to every address of host:port, each bounded by the deadline. The
// socket is returned blocking, with TCP_NODELAY and a send timeout.
int TryConnect(const std::string& host, int port, Clock::time_point deadline,
               milliseconds send_timeout, std::string* err) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* list = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &list);
  if (rc != 0) {
    *err = std::string("cannot resolve host: ") + ::gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = list; a != nullptr && fd < 0; a = a->ai_next) {
    const int s =
        ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (s < 0) {
      *err = Errno(errno);
      continue;
    }
    int r = ::connect(s, a->ai_addr, a->ai_addrlen);
    if (r != 0 && errno == EINPROGRESS) {
      pollfd p{s, POLLOUT, 0};
      while (true) {
        const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
        r = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
        if (!(r < 0 && errno == EINTR)) break;
      }
      if (r == 0) {
        *err = "connect timed out";
        ::close(s);
        continue;
      }
      int so_error = 0;
      socklen_t len = sizeof(so_error);
      if (r < 0 || ::getsockopt(s, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0) so_error = errno;
      r = so_error == 0 ? 0 : -1;
      errno = so_error;
    }
    if (r != 0) {
      *err = Errno(errno);
      ::close(s);
      continue;
    }
    fd = s;
  }
  ::freeaddrinfo(list);
  if (fd < 0) return -1;
  const int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  const int64_t ms = std::clamp<int64_t>(send_timeout.count(), 1, int64_t{1} << 30);
  timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>((ms % 1000) * 1000)};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

class TcpStoreClientImpl final : public TcpStoreClient {
 public:
  TcpStoreClientImpl(int fd, std::string address, TcpStoreOptions options)
      : fd_(fd), address_(std::move(address)), options_(std::move(options)) {
    reader_ = std::thread([this] { ReadLoop(); });
  }

  ~TcpStoreClientImpl() override {
    ::shutdown(fd_, SHUT_RDWR);  // wakes the reader
    reader_.join();
    ::close(fd_);
  }

  Status Set(const std::string& key, const std::string& value) override {
    Encoder e;
    e.Str(key);
    e.Str(value);
    return Call(Op::kSet, e.Take(), milliseconds(0)).status();
  }

  Result<std::string> Get(const std::string& key, milliseconds timeout) override {
    Encoder e;
    e.Str(key);
    e.I64(timeout.count());
    ASSIGN_OR_RETURN(std::string fields, Call(Op::kGet, e.Take(), timeout));
    Decoder d(fields);
    std::string value;
    if (!d.Str(&value) || !d.AtEnd()) return Malformed(Op::kGet);
    return value;
  }

  Status Wait(const std::vector<std::string>& keys, milliseconds timeout) override {
    Encoder e;
    e.List(keys);
    e.I64(timeout.count());
    return Call(Op::kWait, e.Take(), timeout).status();
  }

  Result<int64_t> Add(const std::string& key, int64_t delta) override {
    Encoder e;
    e.Str(key);
    e.I64(delta);
    ASSIGN_OR_RETURN(std::string fields, Call(Op::kAdd, e.Take(), milliseconds(0)));
    Decoder d(fields);
    int64_t v = 0;
    if (!d.I64(&v) || !d.AtEnd()) return Malformed(Op::kAdd);
    return v;
  }

  Result<bool> Check(const std::vector<std::string>& keys) override {
    Encoder e;
    e.List(keys);
    ASSIGN_OR_RETURN(std::string fields, Call(Op::kCheck, e.Take(), milliseconds(0)));
    Decoder d(fields);
    uint8_t all = 0;
    if (!d.U8(&all) || !d.AtEnd()) return Malformed(Op::kCheck);
    return all != 0;
  }

  Result<int64_t> DeletePrefix(const std::string& prefix) override {
    Encoder e;
    e.Str(prefix);
    ASSIGN_OR_RETURN(std::string fields, Call(Op::kDeletePrefix, e.Take(), milliseconds(0)));
    Decoder d(fields);
    int64_t n = 0;
    if (!d.I64(&n) || !d.AtEnd()) return Malformed(Op::kDeletePrefix);
    return n;
  }

 private:
  struct Pending {
    bool done = false;
    Status status;
    std::string fields;
  };

  Status Malformed(Op op) {
    return Unavailable("tcp store " + address_ + ": malformed reply to " + OpName(op));
  }

  // Sends one request and waits for its reply: the op's fields, or the server's error, or
  // UNAVAILABLE when the connection is lost or the reply is `wait + request_timeout` late.
  Result<std::string> Call(Op op, const std::string& fields, milliseconds wait) {
    Pending pending;
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_.ok()) return broken_;
      id = ++next_id_;
    }
    Encoder e;
    e.U8(static_cast<uint8_t>(op));
    e.U64(id);
    e.Raw(fields);
    if (e.size() > kTcpStoreMaxFrameBytes) {
      return InvalidArgument("tcp store " + address_ + ": " + OpName(op) + " request of " +
                             std::to_string(e.size()) + " bytes exceeds the frame limit of " +
                             std::to_string(kTcpStoreMaxFrameBytes) + " bytes");
    }
    const std::string frame = Frame(e.Take());
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_[id] = &pending;
    }
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      std::string err;
      if (!SendAll(fd_, frame, &err)) Break("send failed: " + err);
    }
    std::unique_lock<std::mutex> lock(mu_);
    const milliseconds budget =
        std::min(wait, kMaxWait) + std::min(options_.request_timeout, kMaxWait);
    cv_.wait_until(lock, internal::DeadlineAfter(budget),
                   [&] { return pending.done || !broken_.ok(); });
    pending_.erase(id);
    if (pending.done) {
      if (!pending.status.ok()) return pending.status;
      return std::move(pending.fields);
    }
    if (!broken_.ok()) return broken_;
    // A reply that comes later finds no pending entry and is dropped.
    return Unavailable("tcp store " + address_ + ": no reply to " + OpName(op) + " within " +
                       std::to_string(budget.count()) + " ms");
  }

  // Marks the connection lost: every waiting and later call returns UNAVAILABLE.
  void Break(const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_.ok()) {
        broken_ = Unavailable("tcp store " + address_ + ": connection lost (" + reason + ")");
      }
      cv_.notify_all();
    }
    ::shutdown(fd_, SHUT_RDWR);
  }

  void ReadLoop() {
    std::string err;
    std::string payload;
    while (RecvFrame(fd_, &payload, std::nullopt, &err)) {
      uint64_t id = 0;
      Status status;
      std::string fields;
      if (!ParseReply(payload, &id, &status, &fields)) {
        err = "malformed reply";
        break;
      }
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(id);
      if (it == pending_.end()) continue;  // its caller gave up
      it->second->status = std::move(status);
      it->second->fields = std::move(fields);
      it->second->done = true;
      cv_.notify_all();
    }
    Break(err);
  }

  const int fd_;
  const std::string address_;
  const TcpStoreOptions options_;
  std::mutex write_mu_;  // one frame at a time on the socket
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Pending*> pending_;  // GUARDED_BY(mu_)
  uint64_t next_id_ = 0;                  // GUARDED_BY(mu_)
  Status broken_;                         // GUARDED_BY(mu_)
  std::thread reader_;
};

}  // namespace

Result<std::shared_ptr<TcpStoreClient>> ConnectTcpStoreClient(const std::string& host, int port,
                                                              const TcpStoreOptions& options) {
  if (!ValidJob(options.job) || options.generation < 0) {
    return InvalidArgument("tcp store: bad job '" + options.job + "' or generation " +
                           std::to_string(options.generation) +
                           " (a job name is non-empty without '/', a generation >= 0)");
  }
  if (port <= 0 || port > 65535) {
    return InvalidArgument("tcp store: bad port " + std::to_string(port));
  }
  const std::string address = FormatAddress(host, port);
  const auto deadline = internal::DeadlineAfter(options.connect_timeout);
  milliseconds backoff(10);
  std::string err;
  int fd = -1;
  while (true) {
    fd = TryConnect(host, port, deadline, options.request_timeout, &err);
    if (fd >= 0) break;
    const auto now = Clock::now();
    if (!options.retry || now >= deadline) {
      return Unavailable("tcp store " + address + ": cannot connect: " + err);
    }
    std::this_thread::sleep_for(
        std::min<Clock::duration>(backoff, std::chrono::ceil<milliseconds>(deadline - now)));
    backoff = std::min(backoff * 2, milliseconds(500));
  }

  // Hello, synchronously: the reader thread starts only on an accepted connection.
  Encoder e;
  e.U8(static_cast<uint8_t>(Op::kHello));
  e.U64(0);
  e.U32(kMagic);
  e.Str(options.secret);
  e.Str(options.job);
  e.I64(options.generation);
  std::string payload;
  uint64_t id = 0;
  Status status;
  std::string fields;
  const auto hello_deadline = internal::DeadlineAfter(std::min(options.request_timeout, kMaxWait));
  if (!SendAll(fd, Frame(e.Take()), &err) || !RecvFrame(fd, &payload, hello_deadline, &err) ||
      !ParseReply(payload, &id, &status, &fields) || id != 0) {
    ::close(fd);
    if (err.empty()) err = "malformed reply";
    return Unavailable("tcp store " + address + ": hello failed: " + err);
  }
  if (!status.ok()) {
    ::close(fd);
    return status.WithContext("tcp store " + address);
  }
  return std::shared_ptr<TcpStoreClient>(
      std::make_shared<TcpStoreClientImpl>(fd, address, options));
}

Result<std::shared_ptr<Store>> ConnectTcpStore(const std::string& host, int port,
                                               const TcpStoreOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<TcpStoreClient> client,
                   ConnectTcpStoreClient(host, port, options));
  return std::shared_ptr<Store>(std::move(client));
}

}  // namespace strata::comm
