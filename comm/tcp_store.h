// TcpStore: the rendezvous Store (store.h) served over TCP, for processes on many hosts. The
// coordinator hosts a TcpStoreServer in daemon mode; every worker connects with
// ConnectTcpStore and forms its Gloo groups (and later NCCL ids) through it, like PyTorch's
// TCPStore.
//
// Namespacing and generation fencing. A client connects as (job, generation) and every key it
// names lives, on the server, under TcpStoreNamespace(job, generation) = "<job>/<generation>/".
// Workers of different generations therefore never see each other's keys, even when they use
// the same group prefix. The server also keeps a minimum generation per job
// (SetMinGeneration): a hello or request from an older generation is rejected with
// FAILED_PRECONDITION ("stale generation N < M"), and its pending Get/Wait calls end with that
// error at once, so a stale worker can never write into, or block on, a newer rendezvous.
// Keys are never deleted by clients' Store calls; the coordinator drops a finished
// generation's keys with DeletePrefix(TcpStoreNamespace(job, old_generation)).
//
// Wire format (all integers little-endian). Every message is one frame: a u32 length N,
// 1 <= N <= kTcpStoreMaxFrameBytes, then N payload bytes. str = u32 length + bytes;
// list = u32 count + str...; i64 = two's complement.
//   request: u8 op, u64 request id, fields      reply: u64 request id, u8 status code, str
//                                                      message, fields (only when OK)
//   op 1 hello   u32 magic "STS1", str secret, str job, i64 generation  -> (nothing)
//   op 2 set     str key, str value                                      -> (nothing)
//   op 3 get     str key, i64 timeout_ms                                 -> str value
//   op 4 wait    list keys, i64 timeout_ms                               -> (nothing)
//   op 5 add     str key, i64 delta                                      -> i64 new value
//   op 6 check   list keys                                               -> u8 all set
//   op 7 delete_prefix  str prefix (inside the namespace)                -> i64 keys deleted
// The first frame must be a hello; a wrong secret or a stale generation gets its error reply
// and the connection is closed. A frame that is empty, too long, truncated or does not parse
// closes that connection only. Requests on one connection may be pipelined (replies carry the
// request id and can come back out of order), so one client can be shared by many threads
// without a Wait on one thread holding up a Set on another.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/store.h"

namespace strata::comm {

inline constexpr uint32_t kTcpStoreMaxFrameBytes = 64u << 20;

// "<job>/<generation>/": the server-side prefix of the keys a (job, generation) client names.
std::string TcpStoreNamespace(const std::string& job, int64_t generation);

struct TcpStoreServerOptions {
  // When not empty, a client's hello must carry the same secret (compared in constant time).
  std::string secret;
};

// Serves any number of clients concurrently from one Boost.Asio I/O thread (every request is
// short: blocking Get/Wait calls are parked on the server, not run on a thread). Keys live in
// memory: a restarted server starts empty. Thread-safe; all methods may be called from any
// thread while the server runs.
class TcpStoreServer {
 public:
  explicit TcpStoreServer(TcpStoreServerOptions options = {});
  ~TcpStoreServer();  // Stop()
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  // Binds "host:port" ("127.0.0.1:0" picks a free port, "[::1]:0" for IPv6) and starts serving.
  // INVALID_ARGUMENT for a malformed address, UNAVAILABLE if it cannot be bound,
  // FAILED_PRECONDITION when called twice or after Stop.
  [[nodiscard]] Status Start(const std::string& bind_address);
  // The bound port; 0 before Start.
  int port() const;

  // Fences out every generation of `job` older than `generation`: their later hellos and
  // requests fail with FAILED_PRECONDITION and their pending Get/Wait calls end with it.
  // Never lowers the minimum. May be called before Start.
  void SetMinGeneration(const std::string& job, int64_t generation);
  // The current minimum generation of `job` (0 if never set).
  int64_t MinGeneration(const std::string& job) const;
  // Deletes every stored key (full server-side name) starting with `prefix`; returns how many.
  // Pending waits are not woken: a deleted key counts as not set.
  size_t DeletePrefix(const std::string& prefix);

  // Closes the listener and every connection (clients' pending calls fail with UNAVAILABLE)
  // and joins the I/O thread. Idempotent.
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct TcpStoreOptions {
  std::string secret;
  // The job name (no '/') and generation (>= 0) this client speaks for; see the file comment.
  std::string job = "default";
  int64_t generation = 0;
  // How long to keep trying to connect; with `retry`, refused connections (server not up yet)
  // are retried with backoff until then, otherwise the first failure is returned.
  std::chrono::milliseconds connect_timeout{10000};
  bool retry = true;
  // How long a reply may take beyond the request's own wait (Get/Wait timeout) before the
  // server is declared unresponsive (UNAVAILABLE); also bounds a send that cannot progress.
  std::chrono::milliseconds request_timeout{30000};
};

// The Store interface plus the two operations that only the TCP store has.
class TcpStoreClient : public Store {
 public:
  // Whether every key is set, without waiting.
  [[nodiscard]] virtual Result<bool> Check(const std::vector<std::string>& keys) = 0;
  // Deletes this client's keys (inside its namespace) that start with `prefix`; returns how
  // many were deleted.
  [[nodiscard]] virtual Result<int64_t> DeletePrefix(const std::string& prefix) = 0;
};

// Connects to a TcpStoreServer over one TCP connection and says hello. The Store is
// thread-safe: sends are serialised by a mutex, replies are matched to callers by request id.
// Store semantics match MakeHashStore's (same DEADLINE_EXCEEDED messages naming the missing
// keys). Once the connection is lost every call returns UNAVAILABLE naming the server
// ("tcp store host:port: connection lost ..."); there is no reconnection, since a restarted
// server has lost the keys. Errors from connecting: INVALID_ARGUMENT (bad job/generation, or
// the server rejected the secret), FAILED_PRECONDITION (stale generation), UNAVAILABLE (cannot
// connect within connect_timeout, or the server closed the connection).
Result<std::shared_ptr<TcpStoreClient>> ConnectTcpStoreClient(const std::string& host, int port,
                                                              const TcpStoreOptions& options = {});
Result<std::shared_ptr<Store>> ConnectTcpStore(const std::string& host, int port,
                                               const TcpStoreOptions& options = {});

}  // namespace strata::comm
