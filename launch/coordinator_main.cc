// strata-coordinator: the coordinator daemon (architecture mode 3).
//
//   strata-coordinator --data-dir DIR [--listen 127.0.0.1:8470] [--token-file FILE]
//
// Keeps its state in DIR (jobs in DIR/jobs, RocksDB; every acknowledged change is synced, so a
// crash or kill -9 loses nothing the API confirmed) and serves the HTTP/JSON API
// (coordinator/api_server.h). Prints "strata-coordinator: listening on HOST:PORT" once it
// accepts connections. SIGTERM or SIGINT: stop serving, close the store, exit 0.
//
// Exit codes: 0 clean shutdown, 1 runtime failure (cannot open the store, cannot bind), 2 bad
// input (flags, token file, a non-loopback --listen without a token).
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "comm/tcp_store.h"
#include "common/logging.h"
#include "coordinator/api_server.h"
#include "coordinator/control_plane.h"
#include "coordinator/job_store.h"
#include "coordinator/planner.h"
#include "coordinator/worker_directory.h"

namespace {

constexpr const char* kUsage =
    "usage: strata-coordinator --data-dir DIR [--listen HOST:PORT] [--token-file FILE]\n"
    "                          [--threads N] [--log-level LEVEL] [--control-listen HOST:PORT]\n"
    "  --data-dir    where the coordinator keeps its state (created when missing)\n"
    "  --listen      address of the HTTP API (default 127.0.0.1:8470; port 0: any free port).\n"
    "                A non-loopback address requires --token-file.\n"
    "  --token-file  file holding the API token (at least 16 characters); clients send\n"
    "                'Authorization: Bearer <token>' (strata: --token-file or STRATA_TOKEN)\n"
    "  --threads     API threads (default 4)\n"
    "  --control-listen  where workers connect (default: the API's host, any free port;\n"
    "                printed at start). The API token doubles as the control-plane secret.\n";

int Usage(const std::string& error) {
  std::fprintf(stderr, "strata-coordinator: %s\n\n%s", error.c_str(), kUsage);
  return 2;
}

// Reads the token: the file's text without surrounding whitespace. Empty string + *error on
// failure.
std::string ReadToken(const std::string& path, std::string* error) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    *error = "--token-file " + path + ": " + std::strerror(errno);
    return "";
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) {
    *error = "--token-file " + path + ": cannot read it";
    return "";
  }
  std::string t = ss.str();
  const size_t b = t.find_first_not_of(" \t\r\n");
  const size_t e = t.find_last_not_of(" \t\r\n");
  t = b == std::string::npos ? "" : t.substr(b, e - b + 1);
  if (t.size() < 16 || t.find_first_of(" \t\r\n") != std::string::npos) {
    *error = "--token-file " + path + ": the token must be one word of at least 16 characters (" +
             std::to_string(t.size()) + " found); e.g. openssl rand -hex 32 > " + path;
    return "";
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    spdlog::warn("--token-file {}: readable by group or others; chmod 600 it", path);
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  // One descriptor per worker connection: take the hard limit (thousands of workers).
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string data_dir, token_file, level = "info", control_listen;
  strata::coordinator::ApiServerOptions options;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    if (a != "--data-dir" && a != "--listen" && a != "--token-file" && a != "--threads" &&
        a != "--log-level" && a != "--control-listen") {
      return Usage("unknown flag '" + a + "'");
    }
    if (i + 1 >= args.size()) return Usage(a + " needs a value");
    const std::string& v = args[++i];
    if (a == "--data-dir") {
      data_dir = v;
    } else if (a == "--listen") {
      options.listen = v;
    } else if (a == "--token-file") {
      token_file = v;
    } else if (a == "--log-level") {
      level = v;
    } else if (a == "--control-listen") {
      control_listen = v;
    } else {
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 1 || n > 256) {
        return Usage("--threads: '" + v + "' is not an integer in [1, 256]");
      }
      options.threads = static_cast<int>(n);
    }
  }
  if (data_dir.empty()) return Usage("--data-dir is required");
  strata::InitLogging(level.c_str());
  if (!token_file.empty()) {
    std::string error;
    options.token = ReadToken(token_file, &error);
    if (options.token.empty()) return Usage(error);
  }

  // Signals are taken by sigwait below; block them before any thread (RocksDB's, the API's)
  // starts so that none of those threads receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto store = strata::coordinator::JobStore::Open(data_dir + "/jobs");
  if (!store.ok()) {
    std::fprintf(stderr, "strata-coordinator: %s\n", store.status().message().c_str());
    return 1;
  }
  const size_t jobs = (*store)->List().size();
  // The rendezvous store the workers' Gloo groups form through, and the control plane.
  strata::comm::TcpStoreServer rendezvous;
  const std::string host = options.listen.substr(0, options.listen.rfind(':'));
  strata::Status rs = rendezvous.Start(host + ":0");
  if (!rs.ok()) {
    std::fprintf(stderr, "strata-coordinator: rendezvous store: %s\n", rs.message().c_str());
    return 1;
  }
  strata::coordinator::ControlPlaneOptions cpo;
  cpo.listen = control_listen.empty() ? host + ":0" : control_listen;
  cpo.checkpoint_root = data_dir + "/checkpoints";
  cpo.store_host = host;
  cpo.secret = options.token;
  auto control = strata::coordinator::ControlPlane::Start(store->get(), &rendezvous, cpo);
  if (!control.ok()) {
    std::fprintf(stderr, "strata-coordinator: control plane: %s\n",
                 control.status().message().c_str());
    return control.status().code() == strata::StatusCode::kInvalidArgument ? 2 : 1;
  }
  strata::coordinator::ApiHooks hooks;
  hooks.workers = control->get();
  hooks.plan = [](const strata::proto::JobSpec& spec, int workers,
                  std::string device) -> strata::Result<std::string> {
    ASSIGN_OR_RETURN(strata::coordinator::DeviceProfile profile,
                     strata::coordinator::DeviceProfileByName(device.empty() ? "cpu" : device));
    ASSIGN_OR_RETURN(strata::coordinator::PlanRequest req,
                     strata::coordinator::PlanRequestFromJob(spec, workers, profile));
    ASSIGN_OR_RETURN(strata::coordinator::PlanResult plan, strata::coordinator::MakePlan(req));
    return plan.ToJson();
  };
  auto server = strata::coordinator::ApiServer::Start(store->get(), hooks, options);
  if (!server.ok()) {
    std::fprintf(stderr, "strata-coordinator: %s\n", server.status().message().c_str());
    return server.status().code() == strata::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf(
      "strata-coordinator: listening on %s (data dir %s, %zu jobs); workers connect to "
      "%s:%d\n",
      (*server)->address().c_str(), data_dir.c_str(), jobs, host.c_str(), (*control)->port());
  std::fflush(stdout);

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  spdlog::info("{}: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Stop();
  server->reset();
  (*control)->Stop();
  rendezvous.Stop();
  store->reset();
  spdlog::info("stopped");
  return 0;
}
