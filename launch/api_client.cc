#include "launch/api_client.h"

#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "coordinator/http_client.h"
#include "proto/coordinator.pb.h"
#include "proto/job_spec.h"

namespace strata::launch {

const char kApiUsage[] =
    "  submit JOB.yaml [--client-key KEY]   send a job to the coordinator; prints its id\n"
    "  jobs [--state S] [--json]            the coordinator's jobs\n"
    "  status JOB_ID [--json]               state, layout, progress, last error, spec\n"
    "  logs JOB_ID [-f] [--offset N]        the job's log; -f follows it until the job ends\n"
    "  cancel JOB_ID                        cancel a job\n"
    "  workers [--json]                     registered workers: state, job, heartbeat lag\n"
    "        these take --coordinator HOST:PORT (env STRATA_COORDINATOR, default\n"
    "        127.0.0.1:8470) and --token-file FILE (env STRATA_TOKEN: the token itself)\n";

namespace {

using coordinator::HttpRequest;
using coordinator::HttpResponse;

constexpr char kDefaultCoordinator[] = "127.0.0.1:8470";
constexpr auto kCallTimeout = std::chrono::seconds(30);  // above the 10 s log long-poll

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "strata: %s\n", message.c_str());
  return code;
}

// Flags shared by every API command, and the rest of the arguments.
struct Common {
  coordinator::HostPort server;
  std::string token;
  std::vector<std::string> rest;
};

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return static_cast<bool>(in) || in.eof();
}

std::string Trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// Parses --coordinator and --token-file out of `args`. Returns 0 or an exit code (message
// printed).
int ParseCommon(const std::vector<std::string>& args, Common* c) {
  std::string address;
  std::string token_file;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--coordinator" || a == "--token-file") {
      if (i + 1 >= args.size()) return Fail(2, a + " needs a value");
      (a == "--coordinator" ? address : token_file) = args[++i];
    } else {
      c->rest.push_back(a);
    }
  }
  if (address.empty()) {
    const char* env = std::getenv("STRATA_COORDINATOR");
    address = env != nullptr && *env != '\0' ? env : kDefaultCoordinator;
  }
  auto hp = coordinator::ParseHostPort(address, "--coordinator");
  if (!hp.ok()) return Fail(2, hp.status().message());
  if (hp->port == 0) return Fail(2, "--coordinator: port 0 is not a server's port");
  c->server = *hp;
  if (!token_file.empty()) {
    std::string text;
    if (!ReadFile(token_file, &text)) return Fail(2, "--token-file " + token_file + ": unreadable");
    c->token = Trim(text);
    if (c->token.empty()) return Fail(2, "--token-file " + token_file + ": empty");
  } else if (const char* env = std::getenv("STRATA_TOKEN"); env != nullptr) {
    c->token = Trim(env);
  }
  return 0;
}

// Calls the API. On a transport failure or an HTTP error status prints the reason and returns
// the exit code in *code; otherwise returns the response.
std::optional<HttpResponse> Call(const Common& c, HttpRequest req, int* code) {
  if (!c.token.empty()) req.headers.emplace_back("Authorization", "Bearer " + c.token);
  auto res = coordinator::HttpCall(c.server, req, kCallTimeout);
  if (!res.ok()) {
    *code = Fail(1, fmt::format("{}; is strata-coordinator running there? (set --coordinator "
                                "HOST:PORT or STRATA_COORDINATOR)",
                                res.status().message()));
    return std::nullopt;
  }
  if (res->status >= 400) {
    proto::ApiError err;
    google::protobuf::util::JsonParseOptions o;
    o.ignore_unknown_fields = true;
    std::string message = Trim(res->body);
    if (google::protobuf::util::JsonStringToMessage(res->body, &err, o).ok() &&
        !err.error().empty()) {
      message = err.error();
    }
    if (res->status == 401) message += " (--token-file FILE or STRATA_TOKEN)";
    *code = Fail(res->status >= 500 ? 1 : 2, fmt::format("{} (HTTP {})", message, res->status));
    return std::nullopt;
  }
  return std::move(res).value();
}

template <typename M>
bool ParseReply(const HttpResponse& res, M* out) {
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = true;  // a newer coordinator may say more
  if (!google::protobuf::util::JsonStringToMessage(res.body, out, o).ok()) {
    std::fprintf(stderr, "strata: the coordinator's answer is not the expected JSON: %.200s\n",
                 res.body.c_str());
    return false;
  }
  return true;
}

// GETs `target`. Returns the exit code when the command is done — the call failed (its code),
// the raw JSON was printed (`json`: 0), or the reply did not parse (1) — and nothing when *out
// holds the parsed reply.
template <typename M>
std::optional<int> GetReply(const Common& c, const std::string& target, bool json, M* out) {
  HttpRequest req;
  req.target = target;
  int code = 0;
  auto res = Call(c, req, &code);
  if (!res) return code;
  if (json) {
    std::printf("%s\n", res->body.c_str());
    return 0;
  }
  if (!ParseReply(*res, out)) return 1;
  return std::nullopt;
}

std::string ResolveAgainst(const std::filesystem::path& dir, const std::string& p) {
  if (p.empty() || p.front() == '/') return p;
  return (dir / p).lexically_normal().string();
}

std::string JobPath(const std::string& id) {
  // Ids are [A-Za-z0-9-]; anything else cannot name a job and is refused by the server.
  std::string out;
  for (char ch : id) {
    const bool plain = std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_';
    out += plain ? std::string(1, ch)
                 : fmt::format("%{:02X}", static_cast<unsigned>(static_cast<unsigned char>(ch)));
  }
  return "/v1/jobs/" + out;
}

std::string Progress(const proto::ApiJob& j) {
  return fmt::format("{}/{}", j.step(), j.total_steps());
}

}  // namespace

int SubmitCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  std::string job, client_key;
  for (size_t i = 0; i < c.rest.size(); ++i) {
    const std::string& a = c.rest[i];
    if (a == "--client-key") {
      if (i + 1 >= c.rest.size()) return Fail(2, "--client-key needs a value");
      client_key = c.rest[++i];
    } else if (!a.empty() && a[0] == '-') {
      return Fail(2, "unknown flag '" + a + "' for submit");
    } else if (job.empty()) {
      job = a;
    } else {
      return Fail(2, "submit takes one JOB.yaml, got also '" + a + "'");
    }
  }
  if (job.empty()) return Fail(2, "submit needs a JOB.yaml");
  std::string text;
  if (!ReadFile(job, &text)) return Fail(2, job + ": cannot read the job file");
  auto spec = spec::ParseYaml(text, job);
  if (!spec.ok()) return Fail(2, spec.status().message());
  // Paths mean what they mean here, next to the job file: send them absolute.
  std::error_code ec;
  std::filesystem::path dir = std::filesystem::path(job).parent_path();
  dir = std::filesystem::absolute(dir.empty() ? "." : dir, ec);
  if (ec) return Fail(1, job + ": cannot resolve its directory: " + ec.message());
  proto::DataSpec* d = spec->mutable_data();
  d->set_train(ResolveAgainst(dir, d->train()));
  d->set_val(ResolveAgainst(dir, d->val()));
  spec->mutable_model()->set_init_from(ResolveAgainst(dir, spec->model().init_from()));
  spec->mutable_checkpoint()->set_dir(ResolveAgainst(dir, spec->checkpoint().dir()));
  if (spec->name().empty()) spec->set_name(std::filesystem::path(job).stem().string());

  HttpRequest req;
  req.method = "POST";
  req.target = "/v1/jobs";
  req.content_type = "application/json";
  google::protobuf::util::JsonPrintOptions po;
  po.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(*spec, &req.body, po).ok()) {
    return Fail(1, job + ": cannot encode the spec as JSON");
  }
  if (!client_key.empty()) req.headers.emplace_back("Client-Key", client_key);
  int code = 0;
  auto res = Call(c, req, &code);
  if (!res) return code;
  proto::SubmitJobResponse out;
  if (!ParseReply(*res, &out)) return 1;
  if (!out.created()) {
    std::fprintf(stderr, "strata: client key '%s' already names %s (%s); not submitted again\n",
                 client_key.c_str(), out.id().c_str(), out.state().c_str());
  }
  std::printf("%s\n", out.id().c_str());
  return 0;
}

int JobsCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  bool json = false;
  std::string state;
  for (size_t i = 0; i < c.rest.size(); ++i) {
    if (c.rest[i] == "--json") {
      json = true;
    } else if (c.rest[i] == "--state" && i + 1 < c.rest.size()) {
      state = c.rest[++i];
    } else {
      return Fail(2, "jobs: unexpected argument '" + c.rest[i] + "'");
    }
  }
  proto::ApiJobList list;
  const std::string target = state.empty() ? "/v1/jobs" : "/v1/jobs?state=" + state;
  if (std::optional<int> done = GetReply(c, target, json, &list)) return *done;
  std::printf("%-12s %-20s %-11s %13s %9s %10s %8s  %s\n", "ID", "NAME", "STATE", "STEP", "LOSS",
              "TOK/S", "RESTARTS", "CREATED");
  for (const proto::ApiJob& j : list.jobs()) {
    std::printf("%-12s %-20.20s %-11s %13s %9.4f %10.0f %8d  %s\n", j.id().c_str(),
                j.name().c_str(), j.state().c_str(), Progress(j).c_str(), j.loss(),
                j.tokens_per_second(), j.restarts(), j.created().c_str());
  }
  return 0;
}

int WorkersCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  bool json = false;
  for (const std::string& a : c.rest) {
    if (a != "--json") return Fail(2, "workers: unexpected argument '" + a + "'");
    json = true;
  }
  proto::ApiWorkerList list;
  if (std::optional<int> done = GetReply(c, "/v1/workers", json, &list)) return *done;
  std::printf("%-24s %-16s %-6s %-11s %-12s %s\n", "ID", "HOST", "DEVICE", "STATE", "JOB",
              "HEARTBEAT LAG");
  for (const proto::ApiWorker& w : list.workers()) {
    std::printf("%-24.24s %-16.16s %-6s %-11s %-12s %.2f s\n", w.id().c_str(), w.host().c_str(),
                w.device().c_str(), w.state().c_str(),
                w.job_id().empty() ? "-" : w.job_id().c_str(), w.heartbeat_lag_seconds());
  }
  return 0;
}

int StatusCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  bool json = false;
  std::string id;
  for (const std::string& a : c.rest) {
    if (a == "--json") {
      json = true;
    } else if (id.empty() && !a.empty() && a[0] != '-') {
      id = a;
    } else {
      return Fail(2, "status: unexpected argument '" + a + "'");
    }
  }
  if (id.empty()) return Fail(2, "status needs a JOB_ID (see strata jobs)");
  proto::ApiJob j;
  if (std::optional<int> done = GetReply(c, JobPath(id), json, &j)) return *done;
  std::printf("id:         %s\nname:       %s\nstate:      %s\n", j.id().c_str(), j.name().c_str(),
              j.state().c_str());
  std::printf("generation: %d\nlayout:     dp=%d tp=%d pp=%d%s\n", j.generation(), j.layout().dp(),
              j.layout().tp(), j.layout().pp(), j.layout().zero1() ? " zero1" : "");
  std::printf("step:       %s\nloss:       %.4f\ntokens/s:   %.0f\nrestarts:   %d\n",
              Progress(j).c_str(), j.loss(), j.tokens_per_second(), j.restarts());
  if (!j.last_error().empty()) std::printf("last error: %s\n", j.last_error().c_str());
  if (!j.client_key().empty()) std::printf("client key: %s\n", j.client_key().c_str());
  std::printf("created:    %s\n", j.created().c_str());
  if (!j.started().empty()) std::printf("started:    %s\n", j.started().c_str());
  if (!j.finished().empty()) std::printf("finished:   %s\n", j.finished().c_str());
  std::string yaml = spec::ToYaml(j.spec());
  std::string indented = "  ";
  for (size_t i = 0; i < yaml.size(); ++i) {
    indented += yaml[i];
    if (yaml[i] == '\n' && i + 1 < yaml.size()) indented += "  ";
  }
  std::printf("spec:\n%s\n", indented.c_str());
  return 0;
}

int LogsCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  bool follow = false;
  long long offset = 0;
  std::string id;
  for (size_t i = 0; i < c.rest.size(); ++i) {
    const std::string& a = c.rest[i];
    if (a == "-f" || a == "--follow") {
      follow = true;
    } else if (a == "--offset") {
      char* end = nullptr;
      if (i + 1 >= c.rest.size()) return Fail(2, "--offset needs a value");
      const std::string& v = c.rest[++i];
      offset = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || offset < 0) {
        return Fail(2, "--offset: '" + v + "' is not a non-negative integer");
      }
    } else if (id.empty() && !a.empty() && a[0] != '-') {
      id = a;
    } else {
      return Fail(2, "logs: unexpected argument '" + a + "'");
    }
  }
  if (id.empty()) return Fail(2, "logs needs a JOB_ID (see strata jobs)");
  // Pages until the end; with -f, long polls (the server waits up to 10 s for a new line) until
  // the job has ended and every line is printed.
  for (;;) {
    HttpRequest req;
    req.target = fmt::format("{}/logs?offset={}{}", JobPath(id), offset, follow ? "&follow=1" : "");
    int code = 0;
    auto res = Call(c, req, &code);
    if (!res) return code;
    proto::ApiLogs page;
    if (!ParseReply(*res, &page)) return 1;
    for (const proto::ApiLogEntry& e : page.entries()) {
      std::printf("%s  %s\n", e.time().c_str(), e.text().c_str());
    }
    std::fflush(stdout);
    offset = page.next_offset();
    if (page.done() || (!follow && page.entries_size() == 0)) return 0;
  }
}

int CancelCommand(const std::vector<std::string>& args) {
  Common c;
  if (int code = ParseCommon(args, &c)) return code;
  if (c.rest.size() != 1 || c.rest[0].empty() || c.rest[0][0] == '-') {
    return Fail(2, "cancel takes exactly one JOB_ID (see strata jobs)");
  }
  HttpRequest req;
  req.method = "POST";
  req.target = JobPath(c.rest[0]) + "/cancel";
  int code = 0;
  auto res = Call(c, req, &code);
  if (!res) return code;
  proto::ApiJob j;
  if (!ParseReply(*res, &j)) return 1;
  std::printf("%s %s\n", j.id().c_str(), j.state().c_str());
  return 0;
}

}  // namespace strata::launch
