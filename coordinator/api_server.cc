#include "coordinator/api_server.h"

#include <fmt/format.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <spdlog/spdlog.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <exception>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "coordinator/beast.h"
#include "coordinator/http_client.h"
#include "coordinator/job_store.h"
#include "proto/coordinator.pb.h"
#include "proto/job_spec.h"

namespace strata::coordinator {

bool ConstantTimeEquals(const std::string& presented, const std::string& expected) {
  // Every byte of `expected` is visited whatever matches; the length difference is folded in
  // rather than returned early.
  unsigned diff = presented.size() == expected.size() ? 0u : 1u;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char p = i < presented.size() ? static_cast<unsigned char>(presented[i]) : 0;
    diff |= static_cast<unsigned>(p ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;

constexpr auto kPollInterval = std::chrono::milliseconds(100);
constexpr auto kLingerTime = std::chrono::seconds(2);
constexpr size_t kMaxLingerBytes = 16 << 20;
constexpr int kDefaultLogLimit = 1000;
constexpr int kMaxLogLimit = 10000;
constexpr size_t kMaxLogPageBytes = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Replies

struct Reply {
  http::status status = http::status::ok;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
};

std::string ToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) {
    return R"({"error":"internal: the reply could not be printed as JSON"})";
  }
  return out;
}

Reply Json(http::status status, const google::protobuf::Message& m) {
  return Reply{status, ToJson(m), "application/json", {}};
}

Reply Error(http::status status, const std::string& message) {
  proto::ApiError e;
  e.set_error(message);
  return Json(status, e);
}

http::status HttpStatusFor(StatusCode code) {
  switch (code) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
      return http::status::bad_request;
    case StatusCode::kNotFound:
      return http::status::not_found;
    case StatusCode::kAlreadyExists:
    case StatusCode::kFailedPrecondition:
      return http::status::conflict;
    case StatusCode::kResourceExhausted:
      return http::status::unprocessable_entity;
    case StatusCode::kUnimplemented:
      return http::status::not_implemented;
    case StatusCode::kUnavailable:
      return http::status::service_unavailable;
    case StatusCode::kDeadlineExceeded:
      return http::status::gateway_timeout;
    default:
      return http::status::internal_server_error;
  }
}

Reply ErrorFor(const Status& s) { return Error(HttpStatusFor(s.code()), s.message()); }

std::string Rfc3339(int64_t unix_ms) {
  if (unix_ms <= 0) return "";
  const time_t secs = static_cast<time_t>(unix_ms / 1000);
  struct tm tm;
  gmtime_r(&secs, &tm);
  return fmt::format("{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:03d}Z", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, unix_ms % 1000);
}

int32_t Clamp32(int64_t v) {
  return static_cast<int32_t>(std::clamp<int64_t>(v, INT32_MIN, INT32_MAX));
}

proto::ApiJob ToApiJob(const proto::JobRecord& r, int64_t log_entries, bool with_spec) {
  proto::ApiJob j;
  j.set_id(r.id());
  j.set_name(r.spec().name());
  j.set_state(JobStateName(r.state()));
  j.set_client_key(r.client_key());
  j.set_generation(Clamp32(r.generation()));
  *j.mutable_layout() = r.layout();
  j.set_step(Clamp32(r.step()));
  j.set_total_steps(r.spec().train().steps());
  j.set_loss(r.loss());
  j.set_tokens_per_second(r.tokens_per_second());
  j.set_restarts(r.restarts());
  j.set_last_error(r.last_error());
  j.set_created(Rfc3339(r.created_unix_ms()));
  j.set_updated(Rfc3339(r.updated_unix_ms()));
  j.set_started(Rfc3339(r.started_unix_ms()));
  j.set_finished(Rfc3339(r.finished_unix_ms()));
  j.set_log_entries(Clamp32(log_entries));
  if (with_spec) *j.mutable_spec() = r.spec();
  return j;
}

// ---------------------------------------------------------------------------------------------
// Request parsing

struct Target {
  std::string path;  // as sent (percent-encoded)
  std::map<std::string, std::string> query;
};

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding; '+' is a space in query strings. Malformed escapes are kept literally.
std::string Decode(std::string_view s, bool plus_is_space) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && HexValue(s[i + 1]) >= 0 && HexValue(s[i + 2]) >= 0) {
      out.push_back(static_cast<char>(HexValue(s[i + 1]) * 16 + HexValue(s[i + 2])));
      i += 2;
    } else if (s[i] == '+' && plus_is_space) {
      out.push_back(' ');
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

Target ParseTarget(std::string_view target) {
  Target t;
  const size_t q = target.find('?');
  t.path = std::string(target.substr(0, q));  // raw: segments are decoded after splitting
  if (q == std::string_view::npos) return t;
  std::string_view rest = target.substr(q + 1);
  while (!rest.empty()) {
    const size_t amp = rest.find('&');
    const std::string_view pair = rest.substr(0, amp);
    const size_t eq = pair.find('=');
    const std::string key = Decode(pair.substr(0, eq), true);
    const std::string value = eq == std::string_view::npos ? "" : Decode(pair.substr(eq + 1), true);
    if (!key.empty()) t.query[key] = value;
    if (amp == std::string_view::npos) break;
    rest = rest.substr(amp + 1);
  }
  return t;
}

std::vector<std::string> SplitPath(const std::string& path) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < path.size()) {
    while (i < path.size() && path[i] == '/') ++i;
    const size_t j = path.find('/', i);
    const std::string part = path.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (!part.empty()) parts.push_back(Decode(part, false));
    if (j == std::string::npos) break;
    i = j;
  }
  return parts;
}

// Parses a non-negative integer query parameter; `fallback` when absent.
Result<int64_t> QueryInt(const Target& t, const std::string& key, int64_t fallback, int64_t max) {
  auto it = t.query.find(key);
  if (it == t.query.end() || it->second.empty()) return fallback;
  const std::string& v = it->second;
  if (v.size() > 12 || v.find_first_not_of("0123456789") != std::string::npos) {
    return InvalidArgument(
        fmt::format("{}: '{}' is not a non-negative integer; e.g. {}={}", key, v, key, fallback));
  }
  const int64_t n = std::stoll(v);
  if (n > max) {
    return InvalidArgument(fmt::format("{}: {} is above the maximum {}", key, n, max));
  }
  return n;
}

Result<bool> QueryBool(const Target& t, const std::string& key) {
  auto it = t.query.find(key);
  if (it == t.query.end()) return false;
  const std::string& v = it->second;
  if (v.empty() || v == "1" || v == "true") return true;
  if (v == "0" || v == "false") return false;
  return InvalidArgument(
      fmt::format("{}: '{}' is not a boolean; use {}=1 or {}=0", key, v, key, key));
}

// The deepest nesting of JSON/YAML flow collections ('{', '[') outside double-quoted strings.
int FlowDepth(const std::string& body) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      max_depth = std::max(max_depth, ++depth);
    } else if ((c == '}' || c == ']') && depth > 0) {
      --depth;
    }
  }
  return max_depth;
}

// The widest indentation of a YAML line (block nesting needs one more column per level).
size_t MaxIndent(const std::string& body) {
  size_t max_indent = 0, col = 0;
  bool at_start = true;
  for (char c : body) {
    if (c == '\n') {
      at_start = true;
      col = 0;
    } else if (at_start && (c == ' ' || c == '\t')) {
      ++col;
      max_indent = std::max(max_indent, col);
    } else {
      at_start = false;
    }
  }
  return max_indent;
}

std::string Trimmed(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

// "invalid value 5 for type TYPE_STRING" -> "expected a string, got 5"
std::string ExplainInvalidValue(const std::string& rest) {
  const std::string head = "invalid value ", mid = " for type TYPE_";
  const size_t at = rest.rfind(mid);
  if (rest.rfind(head, 0) != 0 || at == std::string::npos) return rest;
  const std::string value = rest.substr(head.size(), at - head.size());
  const std::string type = rest.substr(at + mid.size());
  std::string want = "a value of type " + type;
  if (type == "STRING") want = "a string";
  if (type == "BOOL") want = "true or false";
  if (type == "DOUBLE" || type == "FLOAT") want = "a number";
  if (type == "INT32" || type == "UINT32") want = "a 32-bit integer";
  if (type == "INT64" || type == "UINT64") want = "an integer";
  if (type == "MESSAGE") want = "an object {...}";
  return fmt::format("expected {}, got {}", want, value);
}

// Protobuf's JSON errors with our field-path-first shape:
// "(model) layerz: Cannot find field." -> "model.layerz: Cannot find field."
std::string ProtobufJsonMessage(const std::string& raw) {
  std::string m = Trimmed(raw.substr(0, raw.find('\n')));  // drop the "^" marker lines
  if (!m.empty() && m[0] == '(') {
    const size_t close = m.find(')');
    if (close != std::string::npos) {
      std::string path = m.substr(1, close - 1);
      std::string rest = Trimmed(m.substr(close + 1));
      if (!rest.empty() && rest[0] != ':') {
        const size_t colon = rest.find(':');
        if (colon != std::string::npos) {
          path += (path.empty() ? "" : ".") + rest.substr(0, colon);
          rest = rest.substr(colon);
        }
      }
      if (!rest.empty() && rest[0] == ':') rest = Trimmed(rest.substr(1));
      return fmt::format("{}: {}", path.empty() ? "body" : path, ExplainInvalidValue(rest));
    }
  }
  if (!m.empty() && m[0] == ':') m = Trimmed(m.substr(1));
  return "body: malformed JSON: " + m;
}

bool IsJsonBody(const Request& req, const std::string& body) {
  const std::string ct = std::string(req[http::field::content_type]);
  if (ct.find("json") != std::string::npos) return true;
  if (ct.find("yaml") != std::string::npos) return false;
  const std::string t = Trimmed(body.substr(0, 64));
  return !t.empty() && t[0] == '{';
}

// Paths in a spec are resolved by workers, which may run anywhere: only absolute ones mean the
// same thing there as at submission.
Status CheckAbsolutePaths(const proto::JobSpec& spec) {
  const struct {
    const char* field;
    const std::string& value;
  } paths[] = {{"data.train", spec.data().train()},
               {"data.val", spec.data().val()},
               {"model.init_from", spec.model().init_from()},
               {"checkpoint.dir", spec.checkpoint().dir()}};
  for (const auto& [field, value] : paths) {
    if (!value.empty() && value[0] != '/') {
      return InvalidArgument(fmt::format(
          "{}: '{}' is a relative path, which workers cannot resolve; give an absolute path "
          "(strata submit resolves paths against the job file's directory)",
          field, value));
    }
  }
  return Status::Ok();
}

struct ParsedSpec {
  proto::JobSpec spec;
  std::string client_key;  // from a {"client_key", "spec"} JSON body
};

Result<ParsedSpec> ParseSpecBody(const Request& req, int max_depth) {
  const std::string& body = req.body();
  if (Trimmed(body).empty()) {
    return InvalidArgument("body: empty; send a job spec as YAML or JSON (see proto/job.proto)");
  }
  if (FlowDepth(body) > max_depth) {
    return InvalidArgument(fmt::format(
        "body: nested deeper than {} levels; a job spec needs 3, check the brackets", max_depth));
  }
  ParsedSpec out;
  if (IsJsonBody(req, body)) {
    google::protobuf::util::JsonParseOptions lenient;
    lenient.ignore_unknown_fields = true;
    proto::SubmitJobRequest wrapper;
    const bool is_wrapper =
        google::protobuf::util::JsonStringToMessage(body, &wrapper, lenient).ok() &&
        wrapper.has_spec();
    google::protobuf::util::JsonParseOptions strict;
    if (is_wrapper) {
      wrapper.Clear();
      auto st = google::protobuf::util::JsonStringToMessage(body, &wrapper, strict);
      if (!st.ok()) return InvalidArgument(ProtobufJsonMessage(std::string(st.message())));
      out.spec = wrapper.spec();
      out.client_key = wrapper.client_key();
    } else {
      auto st = google::protobuf::util::JsonStringToMessage(body, &out.spec, strict);
      if (!st.ok()) {
        // JSON is YAML: the YAML reader's messages name the dotted field and suggest the fix
        // ("did you mean 'layers'?"); use them unless it could not read the text at all.
        auto yaml = spec::ParseYaml(body, "body");
        if (!yaml.ok() && yaml.status().message().find("malformed YAML") == std::string::npos) {
          return yaml.status();
        }
        return InvalidArgument(ProtobufJsonMessage(std::string(st.message())));
      }
    }
  } else {
    if (MaxIndent(body) > static_cast<size_t>(4 * max_depth)) {
      return InvalidArgument(
          fmt::format("body: a line is indented more than {} columns; a job spec nests 2 levels",
                      4 * max_depth));
    }
    ASSIGN_OR_RETURN(out.spec, spec::ParseYaml(body, "body"));
  }
  RETURN_IF_ERROR(CheckAbsolutePaths(out.spec));
  spec::ApplyDefaults(&out.spec);
  RETURN_IF_ERROR(spec::Validate(out.spec));
  return out;
}

std::string PromLabel(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A long poll waiting for log entries past `offset`.
struct LogPoll {
  std::string id;
  int64_t offset = 0;
  int64_t limit = kDefaultLogLimit;
  std::chrono::steady_clock::time_point deadline;
};

struct Handled {
  Reply reply;
  std::optional<LogPoll> poll;  // set: answer later (the reply is unused)
};

// ---------------------------------------------------------------------------------------------
// The server

struct Core {
  JobStore* store = nullptr;
  ApiHooks hooks;
  ApiServerOptions options;
  std::string bound;
  int port = 0;

  std::atomic<int> connections{0};
  std::atomic<bool> stopped{false};
  // Declared after `connections`: sessions destroyed with the io_context still count down.
  // Stop destroys the io_context (after the acceptor and timer that use it) so that open
  // connections and waiting long polls are closed, not left hanging.
  std::unique_ptr<net::io_context> ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;
  std::optional<net::steady_timer> accept_retry;
  std::vector<std::thread> threads;

  explicit Core(int threads_hint)
      : ioc(std::make_unique<net::io_context>(threads_hint)),
        acceptor(std::in_place, *ioc),
        accept_retry(std::in_place, *ioc) {}
  ~Core() {
    accept_retry.reset();
    acceptor.reset();
    work.reset();
    ioc.reset();
  }

  void Accept();
  void RunThread();

  Handled Handle(const Request& req);
  Reply Route(const Request& req, const Target& t, std::optional<LogPoll>* poll);
  Reply SubmitJob(const Request& req);
  Reply ListJobs(const Target& t);
  Reply GetJob(const std::string& id);
  Reply GetLogs(const std::string& id, const Target& t, std::optional<LogPoll>* poll);
  Reply LogsPage(const std::string& id, int64_t offset, int64_t limit);
  Reply CancelJob(const std::string& id);
  Reply ListWorkers();
  Reply Plan(const Request& req, const Target& t);
  Reply Metrics();
  bool PollReady(const LogPoll& p) const;
  Reply FinishPoll(const LogPoll& p) { return LogsPage(p.id, p.offset, p.limit); }
};

// One connection: reads requests one after another (keep-alive), answers each, and closes on
// any error. All its handlers run on its strand.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, Core* server)
      : stream_(std::move(socket)), server_(server), timer_(stream_.get_executor()) {
    server_->connections.fetch_add(1);
  }
  ~Session() { server_->connections.fetch_sub(1); }

  void Start() {
    net::dispatch(stream_.get_executor(),
                  beast::bind_front_handler(&Session::ReadHeader, shared_from_this()));
  }

 private:
  const ApiServerOptions& opts() const { return server_->options; }

  void ReadHeader() {
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(opts().max_header_bytes));
    parser_->body_limit(opts().max_body_bytes);
    stream_.expires_after(opts().io_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::OnHeader, shared_from_this()));
  }

  void OnHeader(beast::error_code ec, size_t) {
    if (ec) return OnReadError(ec);
    // curl and others wait for "100 Continue" before sending a larger body.
    if (beast::iequals(parser_->get()[http::field::expect], "100-continue")) {
      continue_.emplace(http::status::continue_, parser_->get().version());
      http::async_write(stream_, *continue_,
                        beast::bind_front_handler(&Session::OnContinueSent, shared_from_this()));
      return;
    }
    ReadBody();
  }

  void OnContinueSent(beast::error_code ec, size_t) {
    continue_.reset();
    if (ec) return Close();
    ReadBody();
  }

  void ReadBody() {
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&Session::OnRead, shared_from_this()));
  }

  void OnReadError(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec.category() == boost::system::system_category() ||
        ec.category() == net::error::get_misc_category() ||
        ec.category() == net::error::get_netdb_category()) {
      return Close();  // the peer went away or stalled: nobody to answer
    }
    if (ec == http::error::body_limit) {
      return SendFinal(Error(http::status::payload_too_large,
                             fmt::format("body: larger than {} bytes; job specs are small, send "
                                         "only the spec",
                                         opts().max_body_bytes)));
    }
    if (ec == http::error::header_limit) {
      return SendFinal(Error(http::status::request_header_fields_too_large,
                             fmt::format("headers: larger than {} bytes in all; send fewer or "
                                         "shorter headers",
                                         opts().max_header_bytes)));
    }
    SendFinal(
        Error(http::status::bad_request,
              fmt::format("request: malformed HTTP ({}); send an HTTP/1.1 request", ec.message())));
  }

  void OnRead(beast::error_code ec, size_t) {
    if (ec) return OnReadError(ec);
    request_ = parser_->release();
    Handled h = server_->Handle(request_);
    if (h.poll) {
      poll_ = std::move(h.poll);
      return WaitPoll();
    }
    Send(std::move(h.reply), !request_.keep_alive());
  }

  void WaitPoll() {
    timer_.expires_after(kPollInterval);
    timer_.async_wait(beast::bind_front_handler(&Session::OnPollTimer, shared_from_this()));
  }

  void OnPollTimer(beast::error_code ec) {
    if (ec) return;  // cancelled: the server is stopping
    if (!server_->PollReady(*poll_) && std::chrono::steady_clock::now() < poll_->deadline) {
      return WaitPoll();
    }
    Reply r = server_->FinishPoll(*poll_);
    poll_.reset();
    Send(std::move(r), !request_.keep_alive());
  }

  void Send(Reply reply, bool close) {
    response_.emplace(reply.status, request_.version() ? request_.version() : 11);
    response_->set(http::field::server, "strata-coordinator");
    response_->set(http::field::content_type, reply.content_type);
    response_->set(http::field::cache_control, "no-store");
    for (const auto& [name, value] : reply.headers) response_->set(name, value);
    response_->body() = std::move(reply.body);
    response_->keep_alive(!close);
    response_->prepare_payload();
    stream_.expires_after(opts().io_timeout);
    http::async_write(stream_, *response_,
                      beast::bind_front_handler(&Session::OnWrite, shared_from_this(), close));
  }

  void OnWrite(bool close, beast::error_code ec, size_t) {
    response_.reset();
    if (ec) return Close();
    if (close) return Close();
    ReadHeader();
  }

  // Answers a request that could not be read whole, then drains what the client still sends
  // (bounded) before closing: closing with unread data would reset the connection and the
  // client might never see the answer.
  void SendFinal(Reply reply) {
    response_.emplace(reply.status, 11);
    response_->set(http::field::server, "strata-coordinator");
    response_->set(http::field::content_type, reply.content_type);
    response_->body() = std::move(reply.body);
    response_->keep_alive(false);
    response_->prepare_payload();
    stream_.expires_after(opts().io_timeout);
    http::async_write(stream_, *response_,
                      beast::bind_front_handler(&Session::OnFinalWritten, shared_from_this()));
  }

  void OnFinalWritten(beast::error_code ec, size_t) {
    response_.reset();
    if (ec) return Close();
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    drain_.resize(16 << 10);
    stream_.expires_after(kLingerTime);
    Drain();
  }

  void Drain() {
    stream_.async_read_some(net::buffer(drain_),
                            beast::bind_front_handler(&Session::OnDrained, shared_from_this()));
  }

  void OnDrained(beast::error_code ec, size_t n) {
    drained_ += n;
    if (ec || drained_ > kMaxLingerBytes) return Close();
    Drain();
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  Core* server_;
  net::steady_timer timer_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<http::response<http::empty_body>> continue_;
  Request request_;
  std::optional<http::response<http::string_body>> response_;
  std::optional<LogPoll> poll_;
  std::vector<char> drain_;
  size_t drained_ = 0;
};

void Core::Accept() {
  acceptor->async_accept(net::make_strand(*ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted || stopped.load()) return;
    if (ec) {
      // E.g. out of file descriptors: wait a little instead of spinning.
      spdlog::warn("api: accept failed: {}", ec.message());
      accept_retry->expires_after(std::chrono::milliseconds(100));
      accept_retry->async_wait([this](beast::error_code e) {
        if (!e) Accept();
      });
      return;
    }
    if (connections.load() >= options.max_connections) {
      spdlog::warn("api: {} connections open (the limit); closing a new one",
                   options.max_connections);
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      std::make_shared<Session>(std::move(socket), this)->Start();
    }
    Accept();
  });
}

void Core::RunThread() {
  // A throwing handler loses its connection, never the daemon.
  for (;;) {
    try {
      ioc->run();
      return;
    } catch (const std::exception& e) {
      spdlog::error("api: a connection handler failed: {}", e.what());
    } catch (...) {
      spdlog::error("api: a connection handler failed with an unknown exception");
    }
  }
}

Handled Core::Handle(const Request& req) {
  Handled h;
  const auto start = std::chrono::steady_clock::now();
  const Target t = ParseTarget(std::string_view(req.target().data(), req.target().size()));
  bool unauthorized = false;
  try {
    if (!options.token.empty()) {
      const std::string auth = std::string(req[http::field::authorization]);
      const std::string prefix = "Bearer ";
      const bool ok = auth.size() > prefix.size() && beast::iequals(auth.substr(0, 7), prefix) &&
                      ConstantTimeEquals(Trimmed(auth.substr(prefix.size())), options.token);
      if (!ok) {
        unauthorized = true;
        h.reply = Error(http::status::unauthorized,
                        auth.empty() ? "authorization: missing; send 'Authorization: Bearer "
                                       "<token>' with the coordinator's token"
                                     : "authorization: wrong token; send 'Authorization: Bearer "
                                       "<token>' with the coordinator's token");
        h.reply.headers.emplace_back("WWW-Authenticate", "Bearer");
      }
    }
    if (!unauthorized) h.reply = Route(req, t, &h.poll);
  } catch (const std::exception& e) {
    spdlog::error("api: {} {} failed: {}", std::string(req.method_string()), t.path, e.what());
    h.reply = Error(http::status::internal_server_error,
                    fmt::format("internal error: {}; the coordinator is still running", e.what()));
  }
  spdlog::debug(
      "api: {} {} -> {} ({:.1f} ms)", std::string(req.method_string()), t.path,
      h.poll ? 0 : static_cast<int>(h.reply.status),
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  return h;
}

Reply Core::Route(const Request& req, const Target& t, std::optional<LogPoll>* poll) {
  const std::vector<std::string> p = SplitPath(t.path);
  const http::verb m = req.method();
  // 405 naming the allowed methods.
  auto not_allowed = [&](const char* allowed) {
    Reply r = Error(http::status::method_not_allowed,
                    fmt::format("method: {} is not supported on {}; use {}",
                                std::string(req.method_string()), t.path, allowed));
    r.headers.emplace_back("Allow", allowed);
    return r;
  };
  const bool get = m == http::verb::get, post = m == http::verb::post;
  if (p.size() == 1 && p[0] == "healthz") {
    if (!get) return not_allowed("GET");
    return Reply{http::status::ok, R"({"status":"ok"})", "application/json", {}};
  }
  if (p.size() == 1 && p[0] == "metrics") {
    if (!get) return not_allowed("GET");
    return Metrics();
  }
  if (p.size() >= 2 && p[0] == "v1") {
    if (p[1] == "jobs" && p.size() == 2) {
      if (post) return SubmitJob(req);
      if (!get) return not_allowed("GET, POST");
      return ListJobs(t);
    }
    if (p[1] == "jobs" && p.size() == 3) {
      if (!get) return not_allowed("GET");
      return GetJob(p[2]);
    }
    if (p[1] == "jobs" && p.size() == 4 && p[3] == "logs") {
      if (!get) return not_allowed("GET");
      return GetLogs(p[2], t, poll);
    }
    if (p[1] == "jobs" && p.size() == 4 && p[3] == "cancel") {
      if (!post) return not_allowed("POST");
      return CancelJob(p[2]);
    }
    if (p[1] == "workers" && p.size() == 2) {
      if (!get) return not_allowed("GET");
      return ListWorkers();
    }
    if (p[1] == "plan" && p.size() == 2) {
      if (!post) return not_allowed("POST");
      return Plan(req, t);
    }
  }
  return Error(http::status::not_found,
               fmt::format("path: no endpoint {} {}; use /v1/jobs, /v1/jobs/ID, /v1/jobs/ID/logs, "
                           "/v1/jobs/ID/cancel, /v1/workers, /v1/plan, /healthz or /metrics",
                           std::string(req.method_string()), t.path.substr(0, 200)));
}

Reply Core::SubmitJob(const Request& req) {
  auto parsed = ParseSpecBody(req, options.max_json_depth);
  if (!parsed.ok()) return ErrorFor(parsed.status());
  std::string key = std::string(req["Client-Key"]);
  if (key.empty()) key = std::string(req["Idempotency-Key"]);
  if (!parsed->client_key.empty()) {
    if (!key.empty() && key != parsed->client_key) {
      return Error(http::status::bad_request,
                   "client_key: the header and the body name different keys; send one");
    }
    key = parsed->client_key;
  }
  auto r = store->Submit(parsed->spec, key);
  if (!r.ok()) return ErrorFor(r.status());
  proto::SubmitJobResponse out;
  out.set_id(r->job.id());
  out.set_state(JobStateName(r->job.state()));
  out.set_created(r->created);
  if (r->created) {
    spdlog::info("api: submitted {} '{}'", r->job.id(), r->job.spec().name());
  }
  return Json(r->created ? http::status::created : http::status::ok, out);
}

Reply Core::ListJobs(const Target& t) {
  std::optional<proto::JobState> filter;
  if (auto it = t.query.find("state"); it != t.query.end() && !it->second.empty()) {
    filter = ParseJobState(it->second);
    if (!filter) {
      return Error(http::status::bad_request,
                   fmt::format("state: '{}' is not a job state; use PENDING, PLANNING, RUNNING, "
                               "RECOVERING, SUCCEEDED, FAILED or CANCELLED",
                               it->second.substr(0, 64)));
    }
  }
  proto::ApiJobList list;
  for (const proto::JobRecord& r : store->List()) {
    if (filter && r.state() != *filter) continue;
    auto count = store->LogCount(r.id());
    *list.add_jobs() = ToApiJob(r, count.ok() ? *count : 0, /*with_spec=*/false);
  }
  return Json(http::status::ok, list);
}

Reply Core::GetJob(const std::string& id) {
  auto r = store->Get(id);
  if (!r.ok()) return ErrorFor(r.status());
  auto count = store->LogCount(id);
  return Json(http::status::ok, ToApiJob(*r, count.ok() ? *count : 0, /*with_spec=*/true));
}

Reply Core::GetLogs(const std::string& id, const Target& t, std::optional<LogPoll>* poll) {
  auto offset = QueryInt(t, "offset", 0, int64_t{1} << 40);
  if (!offset.ok()) return ErrorFor(offset.status());
  auto limit = QueryInt(t, "limit", kDefaultLogLimit, kMaxLogLimit);
  if (!limit.ok()) return ErrorFor(limit.status());
  auto follow = QueryBool(t, "follow");
  if (!follow.ok()) return ErrorFor(follow.status());
  auto rec = store->Get(id);
  if (!rec.ok()) return ErrorFor(rec.status());
  auto count = store->LogCount(id);
  if (!count.ok()) return ErrorFor(count.status());
  if (*follow && *offset >= *count && !IsTerminal(rec->state())) {
    *poll = LogPoll{id, *offset, std::max<int64_t>(*limit, 1),
                    std::chrono::steady_clock::now() + options.log_poll_timeout};
    return Reply{};
  }
  return LogsPage(id, *offset, std::max<int64_t>(*limit, 1));
}

bool Core::PollReady(const LogPoll& p) const {
  auto rec = store->Get(p.id);
  auto count = store->LogCount(p.id);
  return !rec.ok() || !count.ok() || *count > p.offset || IsTerminal(rec->state());
}

Reply Core::LogsPage(const std::string& id, int64_t offset, int64_t limit) {
  // The state is read before the page: a job that was terminal then has all its transition
  // lines in the page's total, so "done" never hides the last line.
  auto rec = store->Get(id);
  if (!rec.ok()) return ErrorFor(rec.status());
  auto page = store->ReadLogs(id, offset, static_cast<int>(limit), kMaxLogPageBytes);
  if (!page.ok()) return ErrorFor(page.status());
  proto::ApiLogs out;
  out.set_id(id);
  out.set_state(JobStateName(rec->state()));
  out.set_offset(Clamp32(offset));
  out.set_next_offset(Clamp32(page->next_offset));
  out.set_done(IsTerminal(rec->state()) && page->next_offset >= page->total);
  for (const proto::JobLogEntry& e : page->entries) {
    proto::ApiLogEntry* a = out.add_entries();
    a->set_seq(Clamp32(e.seq()));
    a->set_time(Rfc3339(e.unix_ms()));
    a->set_text(e.text());
  }
  return Json(http::status::ok, out);
}

Reply Core::CancelJob(const std::string& id) {
  TransitionUpdate u;
  u.reason = "cancelled via the API";
  auto r = store->Transition(id, proto::JOB_STATE_CANCELLED, u);
  if (!r.ok()) return ErrorFor(r.status());
  spdlog::info("api: cancelled {}", id);
  auto count = store->LogCount(id);
  return Json(http::status::ok, ToApiJob(*r, count.ok() ? *count : 0, /*with_spec=*/false));
}

Reply Core::ListWorkers() {
  proto::ApiWorkerList list;
  if (hooks.workers != nullptr) {
    for (const WorkerInfo& w : hooks.workers->List()) {
      proto::ApiWorker* a = list.add_workers();
      a->set_id(w.id);
      a->set_host(w.host);
      a->set_device(w.device);
      a->set_memory_bytes(static_cast<double>(w.memory_bytes));
      a->set_state(w.state);
      a->set_job_id(w.job_id);
      a->set_heartbeat_lag_seconds(w.heartbeat_lag_seconds);
    }
  }
  return Json(http::status::ok, list);
}

Reply Core::Plan(const Request& req, const Target& t) {
  if (!hooks.plan) {
    return Error(http::status::not_implemented,
                 "plan: this coordinator has no planner; run a build that includes it");
  }
  auto parsed = ParseSpecBody(req, options.max_json_depth);
  if (!parsed.ok()) return ErrorFor(parsed.status());
  const proto::JobSpec& spec = parsed->spec;
  auto workers = QueryInt(t, "workers", spec.resources().workers(), 1 << 20);
  if (!workers.ok()) return ErrorFor(workers.status());
  if (*workers < 1) {
    return Error(http::status::bad_request,
                 "workers: must be at least 1; pass ?workers=N or set resources.workers");
  }
  std::string device = spec.resources().device();
  if (auto it = t.query.find("device"); it != t.query.end() && !it->second.empty()) {
    device = it->second;
  }
  auto plan = hooks.plan(spec, static_cast<int>(*workers), device);
  if (!plan.ok()) return ErrorFor(plan.status());
  google::protobuf::Struct probe;
  const std::string trimmed = Trimmed(*plan);
  if (!trimmed.empty() && trimmed[0] == '{' &&
      google::protobuf::util::JsonStringToMessage(trimmed, &probe).ok()) {
    return Reply{http::status::ok, *plan, "application/json", {}};
  }
  google::protobuf::Struct wrapped;
  (*wrapped.mutable_fields())["plan"].set_string_value(*plan);
  return Json(http::status::ok, wrapped);
}

Reply Core::Metrics() {
  std::map<proto::JobState, int> by_state;
  int64_t steps = 0, restarts = 0;
  double tokens_per_second = 0;
  for (const proto::JobRecord& r : store->List()) {
    ++by_state[r.state()];
    steps += r.step();
    restarts += r.restarts();
    if (r.state() == proto::JOB_STATE_RUNNING) tokens_per_second += r.tokens_per_second();
  }
  std::vector<WorkerInfo> workers;
  if (hooks.workers != nullptr) workers = hooks.workers->List();
  std::string out;
  out += "# HELP strata_jobs Jobs by state.\n# TYPE strata_jobs gauge\n";
  for (int s = proto::JOB_STATE_PENDING; s <= proto::JOB_STATE_CANCELLED; ++s) {
    const auto state = static_cast<proto::JobState>(s);
    out += fmt::format("strata_jobs{{state=\"{}\"}} {}\n", Lower(JobStateName(state)),
                       by_state[state]);
  }
  out += fmt::format(
      "# HELP strata_workers Workers known to the control plane.\n# TYPE strata_workers gauge\n"
      "strata_workers {}\n",
      workers.size());
  out += fmt::format(
      "# HELP strata_steps_total Optimizer steps reported, summed over all jobs.\n"
      "# TYPE strata_steps_total counter\nstrata_steps_total {}\n",
      steps);
  out += fmt::format(
      "# HELP strata_tokens_per_second Training throughput of the running jobs, summed.\n"
      "# TYPE strata_tokens_per_second gauge\nstrata_tokens_per_second {}\n",
      tokens_per_second);
  out += fmt::format(
      "# HELP strata_recoveries_total Recoveries (entries into RECOVERING), summed over all "
      "jobs.\n# TYPE strata_recoveries_total counter\nstrata_recoveries_total {}\n",
      restarts);
  out +=
      "# HELP strata_heartbeat_lag_seconds Seconds since each worker's last heartbeat.\n"
      "# TYPE strata_heartbeat_lag_seconds gauge\n";
  for (const WorkerInfo& w : workers) {
    out += fmt::format("strata_heartbeat_lag_seconds{{worker=\"{}\"}} {}\n", PromLabel(w.id),
                       w.heartbeat_lag_seconds);
  }
  return Reply{http::status::ok, std::move(out), "text/plain; version=0.0.4; charset=utf-8", {}};
}

}  // namespace

struct ApiServer::Impl : Core {
  using Core::Core;
};

// ---------------------------------------------------------------------------------------------

ApiServer::ApiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ApiServer::~ApiServer() { Stop(); }

Result<std::unique_ptr<ApiServer>> ApiServer::Start(JobStore* store, ApiHooks hooks,
                                                    ApiServerOptions options) {
  if (store == nullptr) return InvalidArgument("ApiServer::Start: no job store");
  if (options.threads < 1 || options.max_connections < 1 || options.max_body_bytes < 1 ||
      options.max_header_bytes < 256 || options.max_json_depth < 4) {
    return InvalidArgument(
        "ApiServer options: threads, max_connections and max_body_bytes must be positive, "
        "max_header_bytes >= 256, max_json_depth >= 4");
  }
  ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(options.listen, "--listen"));
  if (hp.host == "localhost") hp.host = "127.0.0.1";
  beast::error_code ec;
  const net::ip::address address = net::ip::make_address(hp.host, ec);
  if (ec) {
    return InvalidArgument(fmt::format(
        "--listen: '{}' is not an IP address; use e.g. 127.0.0.1:8470 (or 0.0.0.0:8470 with "
        "--token-file)",
        hp.host));
  }
  if (!address.is_loopback() && options.token.empty()) {
    return InvalidArgument(fmt::format(
        "--listen: {} is not a loopback address and no token is configured; anyone who can "
        "reach it could submit and cancel jobs. Pass --token-file FILE (clients send "
        "'Authorization: Bearer <token>') or listen on 127.0.0.1",
        hp.ToString()));
  }

  auto impl = std::make_unique<Impl>(options.threads);
  impl->store = store;
  impl->hooks = std::move(hooks);
  impl->options = std::move(options);
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(hp.port));
  auto fail = [&](const char* what) {
    return Status(StatusCode::kUnavailable,
                  fmt::format("--listen: cannot {} {}: {}{}", what, hp.ToString(), ec.message(),
                              ec == net::error::address_in_use
                                  ? "; is another coordinator running? choose another port"
                                  : ""));
  };
  impl->acceptor->open(endpoint.protocol(), ec);
  if (ec) return fail("open a socket for");
  // A restarted coordinator must be able to bind while old connections sit in TIME_WAIT.
  impl->acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (ec) return fail("set SO_REUSEADDR on");
  impl->acceptor->bind(endpoint, ec);
  if (ec) return fail("bind");
  impl->acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) return fail("listen on");
  const tcp::endpoint local = impl->acceptor->local_endpoint(ec);
  if (ec) return fail("read the bound address of");
  impl->port = local.port();
  impl->bound = HostPort{local.address().to_string(), impl->port}.ToString();

  impl->work.emplace(net::make_work_guard(*impl->ioc));
  impl->Accept();
  Impl* raw = impl.get();
  for (int i = 0; i < raw->options.threads; ++i) {
    raw->threads.emplace_back([raw] { raw->RunThread(); });
  }
  spdlog::info("api: listening on {}{}", raw->bound,
               raw->options.token.empty() ? " (no token: loopback only)" : " (token required)");
  return std::unique_ptr<ApiServer>(new ApiServer(std::move(impl)));
}

std::string ApiServer::address() const { return impl_->bound; }
int ApiServer::port() const { return impl_->port; }

void ApiServer::Stop() {
  if (!impl_ || impl_->stopped.exchange(true)) return;
  impl_->work.reset();
  impl_->ioc->stop();
  for (std::thread& t : impl_->threads) t.join();
  impl_->threads.clear();
  // No thread runs the io_context now: destroying it destroys the pending handlers, and with
  // them the sessions, which closes their sockets.
  impl_->accept_retry.reset();
  impl_->acceptor.reset();
  impl_->ioc.reset();
}

}  // namespace strata::coordinator
