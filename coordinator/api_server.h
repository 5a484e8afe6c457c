// ApiServer: the coordinator's HTTP/JSON API (Boost.Beast inside; no Boost types here).
//
// Endpoints (every body is JSON; errors are {"error": "<field>: what is wrong; how to fix it"}):
//   POST /v1/jobs                 submit a job spec. Body: a JobSpec as JSON (Content-Type
//                                 application/json, or a body starting with '{') or YAML (any
//                                 other body, or Content-Type application/yaml). JSON may also
//                                 be {"client_key": K, "spec": {...}}; header Client-Key: K does
//                                 the same for either format. Defaults are applied and the spec
//                                 validated (not its data files: workers may see other paths;
//                                 data, checkpoint and init_from paths must be absolute).
//                                 201 {"id", "state", "created": true}; 200 with created=false
//                                 when the client key names an existing job with the same spec;
//                                 409 when it names one with a different spec.
//   GET  /v1/jobs[?state=S]       {"jobs": [...]} in submission order (no specs).
//   GET  /v1/jobs/{id}            state, layout, generation, step, loss, tokens/s, restarts,
//                                 last error, timestamps and the spec (proto::ApiJob).
//   GET  /v1/jobs/{id}/logs?offset=N[&limit=M][&follow=1]
//                                 entries [offset, next_offset) (proto::ApiLogs). follow=1 is a
//                                 long poll: with nothing new and the job not finished, the
//                                 answer waits up to `log_poll_timeout` (10 s) for a new entry,
//                                 then returns what there is (maybe nothing). A follower repeats
//                                 with offset=next_offset until "done" is true.
//   POST /v1/jobs/{id}/cancel     -> CANCELLED; 409 when the job already ended.
//   GET  /v1/workers              {"workers": [...]} from the WorkerDirectory.
//   POST /v1/plan[?workers=N&device=D]
//                                 body: a job spec as for submit; calls the planner hook with
//                                 N (default resources.workers) and D (default
//                                 resources.device). The hook's text is returned as is when it
//                                 is a JSON object, else as {"plan": "<text>"}. 501 without hook.
//   GET  /healthz                 {"status": "ok"}
//   GET  /metrics                 Prometheus text: strata_jobs{state}, strata_workers,
//                                 strata_steps_total, strata_tokens_per_second,
//                                 strata_recoveries_total, strata_heartbeat_lag_seconds{worker}.
//
// Security: binds 127.0.0.1 by default; a non-loopback address is refused unless a token is
// set. With a token every request (also /healthz, /metrics) needs "Authorization: Bearer
// <token>", compared in constant time; 401 otherwise.
// Limits: header 16 KiB (431), body 1 MiB (413), JSON nesting 32, 30 s to receive a request,
// `max_connections` at once (more are closed at accept). Bad input never ends the daemon:
// every handler runs behind a catch, a broken connection only ends itself.
//
// Threads: `threads` threads run the I/O and the handlers; a handler blocks its thread for a
// synced RocksDB write (submit, cancel) or for the planner hook, never for a long poll (those
// wait on timers).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "coordinator/worker_directory.h"

namespace strata::proto {
class JobSpec;
}  // namespace strata::proto

namespace strata::coordinator {

class JobStore;

// The planner hook: a defaulted, validated spec, the number of workers and the device kind ->
// the plan (a JSON object or human-readable text). Its error codes map to HTTP: INVALID_ARGUMENT
// 400, NOT_FOUND 404, FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 422, UNIMPLEMENTED 501,
// others 500.
using PlanFn =
    std::function<Result<std::string>(const proto::JobSpec& spec, int workers, std::string device)>;

struct ApiServerOptions {
  std::string listen = "127.0.0.1:8470";  // HOST:PORT; port 0 picks a free port
  std::string token;                      // empty: no authentication (loopback only)
  int threads = 4;
  size_t max_body_bytes = 1 << 20;
  size_t max_header_bytes = 16 << 10;
  int max_json_depth = 32;
  int max_connections = 256;
  std::chrono::milliseconds log_poll_timeout = std::chrono::seconds(10);
  std::chrono::milliseconds io_timeout = std::chrono::seconds(30);
};

struct ApiHooks {
  // Not owned; must outlive the server. Null: no workers.
  WorkerDirectory* workers = nullptr;
  PlanFn plan;  // empty: POST /v1/plan answers 501
};

class ApiServer {
 public:
  // Binds, listens and starts serving on background threads. `store` is not owned and must
  // outlive the server. INVALID_ARGUMENT for a bad listen address, for a non-loopback address
  // without a token, or for bad limits; UNAVAILABLE when the address cannot be bound (in use).
  static Result<std::unique_ptr<ApiServer>> Start(JobStore* store, ApiHooks hooks,
                                                  ApiServerOptions options);
  // Stops (see Stop).
  ~ApiServer();
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // The bound address, e.g. "127.0.0.1:41237" (the real port when the option said 0).
  std::string address() const;
  int port() const;

  // Stops accepting, drops open connections (in-flight answers may be lost; every write the
  // store acknowledged is durable) and joins the threads. Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit ApiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Constant-time equality of a presented secret and the expected one: the time depends only on
// the expected secret's length.
bool ConstantTimeEquals(const std::string& presented, const std::string& expected);

}  // namespace strata::coordinator
