// Tests for the coordinator's job store (state machine, idempotent submission, persistence) and
// its HTTP API over a real socket (submit YAML/JSON, list, status, cancel, logs with long poll,
// bad input, tokens), plus the strata-coordinator process surviving kill -9.
#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/api_server.h"
#include "coordinator/http_client.h"
#include "coordinator/job_store.h"
#include "proto/coordinator.pb.h"
#include "proto/job_spec.h"
#include "tests/test_util.h"

namespace strata::coordinator {
namespace {

using std::chrono::milliseconds;
using ::strata::testing::ScratchDir;

constexpr char kYaml[] =
    "name: yaml-job\n"
    "model: {layers: 2, heads: 2, d_model: 32, seq_len: 16}\n"
    "data: {train: /data/input.txt}\n"
    "train: {steps: 7, global_batch: 4, micro_batch: 2}\n";
constexpr char kJson[] =
    R"({"name": "json-job", "model": {"layers": 2, "heads": 2, "d_model": 32, "seq_len": 16},)"
    R"( "data": {"train": "/data/input.txt"}, "train": {"steps": 9}})";

proto::JobSpec Spec(const std::string& name) {
  auto s = spec::ParseYaml(kYaml, "test");
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  proto::JobSpec spec = s.ok() ? *s : proto::JobSpec();
  spec.set_name(name);
  spec::ApplyDefaults(&spec);
  EXPECT_TRUE(spec::Validate(spec).ok());
  return spec;
}

std::unique_ptr<JobStore> OpenStore(const std::string& dir) {
  auto s = JobStore::Open(dir);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

std::vector<std::string> LogTexts(const JobStore& store, const std::string& id) {
  std::vector<std::string> out;
  auto page = store.ReadLogs(id, 0, 1000);
  EXPECT_TRUE(page.ok()) << page.status().ToString();
  if (page.ok()) {
    for (const auto& e : page->entries) out.push_back(e.text());
  }
  return out;
}

proto::JobLayout Layout(int dp, int tp, int pp) {
  proto::JobLayout l;
  l.set_dp(dp);
  l.set_tp(tp);
  l.set_pp(pp);
  return l;
}

// ---------------------------------------------------------------------------------------------
// JobStore

TEST(JobStoreTest, LegalLifecycleBumpsGenerationCountsRestartsAndLogs) {
  ScratchDir dir;
  auto store = OpenStore(dir.path() + "/jobs");
  ASSERT_NE(store, nullptr);
  auto sub = store->Submit(Spec("a"), "");
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  EXPECT_TRUE(sub->created);
  const std::string id = sub->job.id();
  EXPECT_EQ(id, "job-000001");
  EXPECT_EQ(sub->job.state(), proto::JOB_STATE_PENDING);
  EXPECT_GT(sub->job.created_unix_ms(), 0);

  auto r = store->Transition(id, proto::JOB_STATE_PLANNING);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->generation(), 1);
  TransitionUpdate run;
  run.layout = Layout(2, 1, 2);
  r = store->Transition(id, proto::JOB_STATE_RUNNING, run);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->layout().dp(), 2);
  EXPECT_GT(r->started_unix_ms(), 0);
  ASSERT_TRUE(store->ReportProgress(id, 1, {5, 2.5, 1000}).ok());
  TransitionUpdate lost;
  lost.error = "worker w3 missed 3 heartbeats";
  r = store->Transition(id, proto::JOB_STATE_RECOVERING, lost);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->generation(), 2);
  EXPECT_EQ(r->restarts(), 1);
  EXPECT_EQ(r->last_error(), "worker w3 missed 3 heartbeats");
  EXPECT_EQ(r->step(), 5);
  run.layout = Layout(1, 1, 2);
  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_RUNNING, run).ok());
  ASSERT_TRUE(store->ReportProgress(id, 2, {7, 2.0, 1200}).ok());
  r = store->Transition(id, proto::JOB_STATE_SUCCEEDED);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GT(r->finished_unix_ms(), 0);
  EXPECT_EQ(r->step(), 7);
  EXPECT_DOUBLE_EQ(r->loss(), 2.0);
  EXPECT_EQ(r->layout().dp(), 1);

  const std::vector<std::string> logs = LogTexts(*store, id);
  ASSERT_EQ(logs.size(), 6u);
  EXPECT_HAS(logs[0], "submitted 'a'");
  EXPECT_HAS(logs[1], "state PENDING -> PLANNING (generation 1)");
  EXPECT_HAS(logs[2], "PLANNING -> RUNNING (layout dp=2 tp=1 pp=2)");
  EXPECT_HAS(logs[3], "RUNNING -> RECOVERING (generation 2): worker w3 missed 3 heartbeats");
  EXPECT_HAS(logs[5], "RUNNING -> SUCCEEDED");
}

TEST(JobStoreTest, TransitionTableMatchesTheStateMachine) {
  using S = proto::JobState;
  const S P = proto::JOB_STATE_PENDING, PL = proto::JOB_STATE_PLANNING,
          R = proto::JOB_STATE_RUNNING, RC = proto::JOB_STATE_RECOVERING,
          OK = proto::JOB_STATE_SUCCEEDED, F = proto::JOB_STATE_FAILED,
          C = proto::JOB_STATE_CANCELLED;
  const std::set<std::pair<S, S>> legal = {{P, PL}, {P, F},   {P, C},  {PL, R}, {PL, F},
                                           {PL, C}, {PL, RC}, {R, RC}, {R, OK}, {R, F},
                                           {R, C},  {RC, R},  {RC, F}, {RC, C}};
  for (int from = 0; from <= 7; ++from) {
    for (int to = 0; to <= 7; ++to) {
      const auto f = static_cast<S>(from), t = static_cast<S>(to);
      EXPECT_EQ(IsLegalTransition(f, t), legal.count({f, t}) == 1)
          << JobStateName(f) << " -> " << JobStateName(t);
    }
  }
  EXPECT_EQ(ParseJobState("running"), R);
  EXPECT_EQ(ParseJobState("Cancelled"), C);
  EXPECT_FALSE(ParseJobState("done").has_value());
}

TEST(JobStoreTest, IllegalTransitionsFailNamingFromAndToAndChangeNothing) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  auto sub = store->Submit(Spec("a"), "");
  ASSERT_TRUE(sub.ok());
  const std::string id = sub->job.id();

  auto r = store->Transition(id, proto::JOB_STATE_RUNNING);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_HAS(r.status().message(), "PENDING -> RUNNING");
  r = store->Transition(id, proto::JOB_STATE_SUCCEEDED);
  EXPECT_HAS(r.status().message(), "PENDING -> SUCCEEDED");
  r = store->Transition(id, proto::JOB_STATE_PENDING);
  EXPECT_HAS(r.status().message(), "PENDING -> PENDING");

  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_CANCELLED).ok());
  for (proto::JobState to : {proto::JOB_STATE_RUNNING, proto::JOB_STATE_CANCELLED,
                             proto::JOB_STATE_FAILED, proto::JOB_STATE_PLANNING}) {
    r = store->Transition(id, to);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_HAS(r.status().message(), std::string("CANCELLED -> ") + JobStateName(to));
    EXPECT_HAS(r.status().message(), "already ended");
  }
  auto got = store->Get(id);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->state(), proto::JOB_STATE_CANCELLED);
  EXPECT_EQ(LogTexts(*store, id).size(), 2u);  // failed transitions log nothing
  EXPECT_EQ(store->Transition("job-999999", proto::JOB_STATE_FAILED).status().code(),
            StatusCode::kNotFound);
}

TEST(JobStoreTest, StaleGenerationsAreFenced) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string id = store->Submit(Spec("a"), "")->job.id();
  EXPECT_EQ(store->ReportProgress(id, 0, {1, 1, 1}).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_PLANNING).ok());
  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_RECOVERING).ok());  // generation 2
  TransitionUpdate u;
  u.expected_generation = 1;
  auto r = store->Transition(id, proto::JOB_STATE_RUNNING, u);
  ASSERT_FALSE(r.ok());
  EXPECT_HAS(r.status().message(), "stale generation 1");
  u.expected_generation = 2;
  ASSERT_TRUE(store->Transition(id, proto::JOB_STATE_RUNNING, u).ok());
  Status s = store->ReportProgress(id, 1, {3, 1, 1});
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_HAS(s.message(), "stale generation 1");
  EXPECT_TRUE(store->ReportProgress(id, 2, {3, 1, 1}).ok());
}

TEST(JobStoreTest, SubmitWithAClientKeyIsIdempotent) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  auto a = store->Submit(Spec("a"), "key-1");
  auto again = store->Submit(Spec("a"), "key-1");
  ASSERT_TRUE(a.ok() && again.ok());
  EXPECT_TRUE(a->created);
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job.id(), a->job.id());
  auto other = store->Submit(Spec("b"), "key-1");
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), StatusCode::kAlreadyExists);
  EXPECT_HAS(other.status().message(), "client_key: 'key-1' was used for job-000001");
  auto b = store->Submit(Spec("a"), "key-2");
  ASSERT_TRUE(b.ok());
  EXPECT_NE(b->job.id(), a->job.id());
  auto no_key_1 = store->Submit(Spec("a"), "");
  auto no_key_2 = store->Submit(Spec("a"), "");
  EXPECT_NE(no_key_1->job.id(), no_key_2->job.id());
  EXPECT_EQ(store->List().size(), 4u);
  EXPECT_EQ(store->Submit(Spec("a"), std::string(200, 'k')).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Submit(Spec("a"), "bad\nkey").status().code(), StatusCode::kInvalidArgument);
}

TEST(JobStoreTest, EverythingSurvivesReopen) {
  ScratchDir dir;
  const std::string path = dir.path() + "/jobs";
  std::string a, b, c;
  {
    auto store = OpenStore(path);
    ASSERT_NE(store, nullptr);
    a = store->Submit(Spec("a"), "ka")->job.id();
    b = store->Submit(Spec("b"), "")->job.id();
    c = store->Submit(Spec("c"), "")->job.id();
    ASSERT_TRUE(store->Transition(a, proto::JOB_STATE_PLANNING).ok());
    TransitionUpdate u;
    u.layout = Layout(4, 1, 1);
    ASSERT_TRUE(store->Transition(a, proto::JOB_STATE_RUNNING, u).ok());
    ASSERT_TRUE(store->ReportProgress(a, 1, {42, 3.25, 777}).ok());
    ASSERT_TRUE(store->AppendLog(a, "step 42 | loss 3.25").ok());
    ASSERT_TRUE(store->Transition(b, proto::JOB_STATE_CANCELLED).ok());
  }
  auto store = OpenStore(path);
  ASSERT_NE(store, nullptr);
  const auto jobs = store->List();
  ASSERT_EQ(jobs.size(), 3u);
  EXPECT_EQ(jobs[0].id(), a);
  EXPECT_EQ(jobs[0].state(), proto::JOB_STATE_RUNNING);
  EXPECT_EQ(jobs[0].step(), 42);
  EXPECT_DOUBLE_EQ(jobs[0].loss(), 3.25);
  EXPECT_EQ(jobs[0].layout().dp(), 4);
  EXPECT_EQ(jobs[0].spec().name(), "a");
  EXPECT_EQ(jobs[1].state(), proto::JOB_STATE_CANCELLED);
  EXPECT_EQ(jobs[2].state(), proto::JOB_STATE_PENDING);
  const auto logs = LogTexts(*store, a);
  ASSERT_EQ(logs.size(), 4u);
  EXPECT_EQ(logs[3], "step 42 | loss 3.25");
  // Logs continue where they were; ids are never reused; the client key still deduplicates.
  EXPECT_EQ(*store->AppendLog(a, "next"), 4);
  EXPECT_EQ(store->Submit(Spec("d"), "")->job.id(), "job-000004");
  auto again = store->Submit(Spec("a"), "ka");
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job.id(), a);
}

TEST(JobStoreTest, ASecondOpenOfTheSameDirectoryIsRefused) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  auto second = JobStore::Open(dir.path());
  ASSERT_FALSE(second.ok());
  EXPECT_HAS(second.status().message(), "another strata-coordinator");
}

TEST(JobStoreTest, ReadLogsPagesFromAnOffset) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string id = store->Submit(Spec("a"), "")->job.id();
  for (int i = 1; i < 25; ++i) ASSERT_EQ(*store->AppendLog(id, "line " + std::to_string(i)), i);
  auto page = store->ReadLogs(id, 10, 5);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->entries.size(), 5u);
  EXPECT_EQ(page->entries[0].seq(), 10);
  EXPECT_EQ(page->entries[0].text(), "line 10");
  EXPECT_EQ(page->next_offset, 15);
  EXPECT_EQ(page->total, 25);
  page = store->ReadLogs(id, 20, 100);
  EXPECT_EQ(page->entries.size(), 5u);
  EXPECT_EQ(page->next_offset, 25);
  page = store->ReadLogs(id, 99, 100);
  EXPECT_TRUE(page->entries.empty());
  page = store->ReadLogs(id, 0, 100, /*max_bytes=*/20);  // "submitted 'a'" + "line 1": 19 bytes
  EXPECT_EQ(page->entries.size(), 2u);
  // An over-long line is truncated, not refused.
  ASSERT_TRUE(store->AppendLog(id, std::string(100000, 'x')).ok());
  page = store->ReadLogs(id, 25, 1);
  ASSERT_EQ(page->entries.size(), 1u);
  EXPECT_LT(page->entries[0].text().size(), 17000u);
  EXPECT_EQ(store->ReadLogs("job-404", 0, 1).status().code(), StatusCode::kNotFound);
}

TEST(JobStoreTest, ConcurrentSubmitsGetDistinctIdsAndKeysDeduplicate) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  std::atomic<int> seen{0};
  store->SetObserver([&](const proto::JobRecord&) { seen.fetch_add(1); });
  constexpr int kThreads = 4, kEach = 10;
  std::vector<std::vector<std::string>> ids(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        // Every thread submits shared-i once (only one creates it) and its own job.
        const std::string n = std::to_string(i);
        auto shared = store->Submit(Spec(fmt::format("s{}", n)), fmt::format("shared-{}", n));
        auto own = store->Submit(Spec("o"), "");
        if (shared.ok() && own.ok()) {
          ids[t].push_back(shared->job.id());
          ids[t].push_back(own->job.id());
          (void)store->AppendLog(own->job.id(), "hello");
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  std::set<std::string> distinct;
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(ids[t].size(), 2u * kEach);
    for (int i = 0; i < kEach; ++i) EXPECT_EQ(ids[t][2 * i], ids[0][2 * i]);  // same shared job
    distinct.insert(ids[t].begin(), ids[t].end());
  }
  EXPECT_EQ(distinct.size(), static_cast<size_t>(kEach + kThreads * kEach));
  EXPECT_EQ(store->List().size(), distinct.size());
  EXPECT_EQ(seen.load(), static_cast<int>(distinct.size()));  // created submits only
}

// ---------------------------------------------------------------------------------------------
// API over a socket

struct RawReply {
  int status = 0;
  std::string head, body, all;
};

// Sends `bytes` on a fresh connection and reads until the server closes it.
RawReply Raw(int port, const std::string& bytes, bool half_close = false) {
  RawReply r;
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return r;
  timeval tv{20, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return r;
  }
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may stop reading (413); its answer is still readable
    sent += static_cast<size_t>(n);
  }
  if (half_close) ::shutdown(fd, SHUT_WR);
  char buf[8192];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    r.all.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  // The final response, after a possible "100 Continue".
  size_t start = 0;
  if (r.all.rfind("HTTP/1.1 100 ", 0) == 0) start = r.all.find("\r\n\r\n") + 4;
  if (r.all.compare(start, 9, "HTTP/1.1 ") != 0) return r;
  const size_t end = r.all.find("\r\n\r\n", start);
  r.status = std::atoi(r.all.substr(start + 9, 3).c_str());
  r.head = r.all.substr(start, end == std::string::npos ? std::string::npos : end - start);
  if (end != std::string::npos) r.body = r.all.substr(end + 4);
  return r;
}

std::string Request(const std::string& method, const std::string& target, const std::string& body,
                    const std::string& extra_headers = "") {
  return method + " " + target + " HTTP/1.1\r\nHost: test\r\nConnection: close\r\n" +
         extra_headers + "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

template <typename M>
M ParseJson(const std::string& body) {
  M m;
  auto st = google::protobuf::util::JsonStringToMessage(body, &m);
  EXPECT_TRUE(st.ok()) << st.ToString() << "\n" << body;
  return m;
}

class FakeWorkers : public WorkerDirectory {
 public:
  std::vector<WorkerInfo> List() override {
    WorkerInfo a;
    a.id = "w-1";
    a.host = "node1:9000";
    a.device = "cpu";
    a.memory_bytes = 1 << 30;
    a.state = "idle";
    a.heartbeat_lag_seconds = 0.25;
    WorkerInfo b = a;
    b.id = "w-\"2\"";
    b.heartbeat_lag_seconds = 4.5;
    return {a, b};
  }
};

class ApiTest : public ::testing::Test {
 protected:
  void Start(const std::string& token = "", ApiHooks hooks = {}) {
    store_ = OpenStore(dir_.path() + "/jobs");
    ASSERT_NE(store_, nullptr);
    ApiServerOptions o;
    o.listen = "127.0.0.1:0";
    o.token = token;
    o.threads = 2;
    o.log_poll_timeout = milliseconds(1500);
    auto s = ApiServer::Start(store_.get(), std::move(hooks), o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
    ASSERT_GT(server_->port(), 0);
    EXPECT_EQ(server_->address(), "127.0.0.1:" + std::to_string(server_->port()));
    token_ = token;
  }

  HttpResponse Call(const std::string& method, const std::string& target,
                    const std::string& body = "", const std::string& content_type = "",
                    std::vector<std::pair<std::string, std::string>> headers = {}) {
    HttpRequest req;
    req.method = method;
    req.target = target;
    req.body = body;
    req.content_type = content_type;
    req.headers = std::move(headers);
    if (!token_.empty()) req.headers.emplace_back("Authorization", "Bearer " + token_);
    auto r = HttpCall(HostPort{"127.0.0.1", server_->port()}, req, std::chrono::seconds(20));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : HttpResponse{};
  }

  void ExpectHealthy() {
    HttpResponse h = Call("GET", "/healthz");
    EXPECT_EQ(h.status, 200);
    EXPECT_EQ(h.body, R"({"status":"ok"})");
  }

  ScratchDir dir_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<ApiServer> server_;
  std::string token_;
};

TEST_F(ApiTest, SubmitYamlAndJsonThenListStatusCancelAndLogs) {
  Start();
  HttpResponse r = Call("POST", "/v1/jobs", kYaml, "application/yaml");
  ASSERT_EQ(r.status, 201) << r.body;
  EXPECT_EQ(r.content_type, "application/json");
  const auto y = ParseJson<proto::SubmitJobResponse>(r.body);
  EXPECT_EQ(y.id(), "job-000001");
  EXPECT_EQ(y.state(), "PENDING");
  EXPECT_TRUE(y.created());

  r = Call("POST", "/v1/jobs", kJson, "application/json");
  ASSERT_EQ(r.status, 201) << r.body;
  const std::string json_id = ParseJson<proto::SubmitJobResponse>(r.body).id();
  EXPECT_EQ(json_id, "job-000002");
  // Without a content type the body is sniffed: '{' is JSON, anything else YAML.
  EXPECT_EQ(Call("POST", "/v1/jobs", kJson).status, 201);
  EXPECT_EQ(Call("POST", "/v1/jobs", kYaml).status, 201);

  r = Call("GET", "/v1/jobs");
  ASSERT_EQ(r.status, 200);
  const auto list = ParseJson<proto::ApiJobList>(r.body);
  ASSERT_EQ(list.jobs_size(), 4);
  EXPECT_EQ(list.jobs(0).name(), "yaml-job");
  EXPECT_EQ(list.jobs(1).name(), "json-job");
  EXPECT_EQ(list.jobs(1).total_steps(), 9);
  EXPECT_FALSE(list.jobs(0).has_spec());

  ASSERT_TRUE(store_->Transition(json_id, proto::JOB_STATE_PLANNING).ok());
  TransitionUpdate u;
  u.layout = Layout(2, 1, 1);
  ASSERT_TRUE(store_->Transition(json_id, proto::JOB_STATE_RUNNING, u).ok());
  ASSERT_TRUE(store_->ReportProgress(json_id, 1, {3, 4.5, 1234.5}).ok());
  r = Call("GET", "/v1/jobs/" + json_id);
  ASSERT_EQ(r.status, 200) << r.body;
  const auto job = ParseJson<proto::ApiJob>(r.body);
  EXPECT_EQ(job.state(), "RUNNING");
  EXPECT_EQ(job.generation(), 1);
  EXPECT_EQ(job.layout().dp(), 2);
  EXPECT_EQ(job.step(), 3);
  EXPECT_DOUBLE_EQ(job.loss(), 4.5);
  EXPECT_DOUBLE_EQ(job.tokens_per_second(), 1234.5);
  EXPECT_EQ(job.spec().model().d_model(), 32);
  EXPECT_EQ(job.spec().train().lr(), 1e-3);  // defaults applied
  EXPECT_FALSE(job.created().empty());
  EXPECT_FALSE(job.started().empty());
  EXPECT_HAS(r.body, R"("tokens_per_second":1234.5)");  // numbers stay JSON numbers

  r = Call("GET", "/v1/jobs?state=running");
  EXPECT_EQ(ParseJson<proto::ApiJobList>(r.body).jobs_size(), 1);

  r = Call("POST", "/v1/jobs/" + json_id + "/cancel");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(ParseJson<proto::ApiJob>(r.body).state(), "CANCELLED");
  r = Call("POST", "/v1/jobs/" + json_id + "/cancel");
  EXPECT_EQ(r.status, 409);
  EXPECT_HAS(r.body, "CANCELLED -\\u003e CANCELLED");
  EXPECT_EQ(Call("POST", "/v1/jobs/job-777777/cancel").status, 404);

  r = Call("GET", "/v1/jobs/" + json_id + "/logs?offset=0");
  ASSERT_EQ(r.status, 200) << r.body;
  auto logs = ParseJson<proto::ApiLogs>(r.body);
  ASSERT_EQ(logs.entries_size(), 4);
  EXPECT_HAS(logs.entries(0).text(), "submitted 'json-job'");
  EXPECT_HAS(logs.entries(3).text(), "RUNNING -> CANCELLED: cancelled via the API");
  EXPECT_EQ(logs.next_offset(), 4);
  EXPECT_TRUE(logs.done());
  r = Call("GET", "/v1/jobs/" + json_id + "/logs?offset=2&limit=1");
  logs = ParseJson<proto::ApiLogs>(r.body);
  ASSERT_EQ(logs.entries_size(), 1);
  EXPECT_EQ(logs.entries(0).seq(), 2);
  EXPECT_EQ(logs.next_offset(), 3);
  EXPECT_FALSE(logs.done());
  ExpectHealthy();
}

TEST_F(ApiTest, ClientKeyMakesSubmitIdempotent) {
  Start();
  HttpResponse a = Call("POST", "/v1/jobs", kYaml, "", {{"Client-Key", "deploy-7"}});
  ASSERT_EQ(a.status, 201) << a.body;
  HttpResponse b = Call("POST", "/v1/jobs", kYaml, "", {{"Client-Key", "deploy-7"}});
  ASSERT_EQ(b.status, 200) << b.body;
  const auto first = ParseJson<proto::SubmitJobResponse>(a.body);
  const auto second = ParseJson<proto::SubmitJobResponse>(b.body);
  EXPECT_EQ(first.id(), second.id());
  EXPECT_FALSE(second.created());
  // The same key in the body ({"client_key", "spec"}), as JSON, names the same job.
  const std::string wrapped = std::string(R"({"client_key": "deploy-7", "spec": )") + kJson + "}";
  HttpResponse c = Call("POST", "/v1/jobs", wrapped, "application/json");
  EXPECT_EQ(c.status, 409) << c.body;  // a different spec under the same key
  EXPECT_HAS(c.body, "client_key: 'deploy-7' was used for job-000001 with a different spec");
  const std::string wrapped2 = std::string(R"({"client_key": "k2", "spec": )") + kJson + "}";
  HttpResponse d = Call("POST", "/v1/jobs", wrapped2, "application/json");
  ASSERT_EQ(d.status, 201) << d.body;
  EXPECT_EQ(ParseJson<proto::ApiJob>(Call("GET", "/v1/jobs/job-000002").body).client_key(), "k2");
  HttpResponse e = Call("POST", "/v1/jobs", wrapped2, "application/json", {{"Client-Key", "k3"}});
  EXPECT_EQ(e.status, 400);
  EXPECT_HAS(e.body, "client_key");
  EXPECT_EQ(ParseJson<proto::ApiJobList>(Call("GET", "/v1/jobs").body).jobs_size(), 2);
}

TEST_F(ApiTest, LogsFollowIsALongPoll) {
  Start();
  const std::string id =
      ParseJson<proto::SubmitJobResponse>(Call("POST", "/v1/jobs", kYaml).body).id();
  // A new line arrives while the request waits: it is answered at once with that line.
  std::thread writer([&] {
    std::this_thread::sleep_for(milliseconds(300));
    ASSERT_TRUE(store_->AppendLog(id, "step 1 | loss 5.5").ok());
  });
  auto t0 = std::chrono::steady_clock::now();
  HttpResponse r = Call("GET", "/v1/jobs/" + id + "/logs?offset=1&follow=1");
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  writer.join();
  ASSERT_EQ(r.status, 200) << r.body;
  auto logs = ParseJson<proto::ApiLogs>(r.body);
  ASSERT_EQ(logs.entries_size(), 1);
  EXPECT_EQ(logs.entries(0).text(), "step 1 | loss 5.5");
  EXPECT_GE(waited, 0.25);
  EXPECT_LT(waited, 1.4);
  EXPECT_FALSE(logs.done());

  // Nothing new: the answer comes empty after the poll timeout (1.5 s here, 10 s by default).
  t0 = std::chrono::steady_clock::now();
  r = Call("GET", "/v1/jobs/" + id + "/logs?offset=2&follow=1");
  EXPECT_GE(std::chrono::steady_clock::now() - t0, milliseconds(1400));
  logs = ParseJson<proto::ApiLogs>(r.body);
  EXPECT_EQ(logs.entries_size(), 0);
  EXPECT_EQ(logs.next_offset(), 2);

  // The job ends while a follower waits: it gets the last line and done=true.
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(200));
    ASSERT_TRUE(store_->Transition(id, proto::JOB_STATE_CANCELLED).ok());
  });
  r = Call("GET", "/v1/jobs/" + id + "/logs?offset=2&follow=1");
  canceller.join();
  logs = ParseJson<proto::ApiLogs>(r.body);
  ASSERT_EQ(logs.entries_size(), 1);
  EXPECT_HAS(logs.entries(0).text(), "PENDING -> CANCELLED");
  EXPECT_TRUE(logs.done());
  // A finished job never waits.
  t0 = std::chrono::steady_clock::now();
  r = Call("GET", "/v1/jobs/" + id + "/logs?offset=3&follow=1");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(1000));
  EXPECT_TRUE(ParseJson<proto::ApiLogs>(r.body).done());
}

TEST_F(ApiTest, BadInputIsAnsweredWith4xxNamingTheFieldAndTheServerKeepsRunning) {
  Start();
  const std::string deep = std::string(40, '[') + std::string(40, ']');
  std::string deep_json = "{\"name\": ";
  for (int i = 0; i < 40; ++i) deep_json += "{\"a\": ";
  deep_json += "1" + std::string(40, '}') + "}";
  const struct {
    const char* what;
    std::string request;
    int status;
    std::string message;
  } cases[] = {
      {"malformed JSON",
       Request("POST", "/v1/jobs", R"({"name": "x",)", "Content-Type: application/json\r\n"), 400,
       "malformed JSON"},
      {"malformed YAML", Request("POST", "/v1/jobs", "name: [x\nmodel: {"), 400, "malformed YAML"},
      {"JSON unknown field",
       Request("POST", "/v1/jobs",
               R"({"name": "x", "data": {"train": "/a"}, "model": {"layerz": 2}})"),
       400, "model.layerz: unknown key"},
      {"YAML unknown key",
       Request("POST", "/v1/jobs", "name: x\ndata: {train: /a}\ntrian: {steps: 3}\n"), 400,
       "did you mean 'train'"},
      {"invalid value",
       Request("POST", "/v1/jobs", "name: x\ndata: {train: /a}\nmodel: {heads: 5}\n"), 400,
       "model.heads: 5 does not divide"},
      {"JSON wrong type",
       Request("POST", "/v1/jobs",
               R"({"name": "x", "data": {"train": "/a"}, "train": {"steps": "many"}})"),
       400, "train.steps"},
      {"JSON string for name",
       Request("POST", "/v1/jobs", R"({"name": 5, "data": {"train": "/a"}})"), 400,
       "name: expected a string, got 5"},
      {"JSON not an object",
       Request("POST", "/v1/jobs", "[1, 2]", "Content-Type: application/json\r\n"), 400,
       "must be a map"},
      {"missing data", Request("POST", "/v1/jobs", "name: x\n"), 400, "data.train: required"},
      {"relative path", Request("POST", "/v1/jobs", "name: x\ndata: {train: input.txt}\n"), 400,
       "data.train: 'input.txt' is a relative path"},
      {"negative steps",
       Request("POST", "/v1/jobs", "name: x\ndata: {train: /a}\ntrain: {steps: -3}\n"), 400,
       "train.steps"},
      {"empty body", Request("POST", "/v1/jobs", ""), 400, "body: empty"},
      {"deep JSON", Request("POST", "/v1/jobs", deep_json, "Content-Type: application/json\r\n"),
       400, "nested deeper than 32"},
      {"deep YAML flow", Request("POST", "/v1/jobs", "name: " + deep), 400,
       "nested deeper than 32"},
      {"bad UTF-8",
       Request("POST", "/v1/jobs", "{\"name\": \"\xff\xfe\", \"data\": {\"train\": \"/a\"}}"), 400,
       ""},
      {"oversized body", Request("POST", "/v1/jobs", std::string(2 << 20, 'a')), 413,
       "larger than 1048576 bytes"},
      {"oversized chunked body",
       "POST /v1/jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" +
           [] {
             std::string s;
             for (int i = 0; i < 40; ++i) s += "10000\r\n" + std::string(65536, 'b') + "\r\n";
             return s + "0\r\n\r\n";
           }(),
       413, "larger than"},
      {"oversized header",
       Request("GET", "/healthz", "", "X-Big: " + std::string(20000, 'h') + "\r\n"), 431,
       "headers"},
      {"unknown path", Request("GET", "/v2/nothing", ""), 404, "no endpoint GET /v2/nothing"},
      {"unknown job", Request("GET", "/v1/jobs/job-123456", ""), 404, "job 'job-123456' not found"},
      {"unknown job logs", Request("GET", "/v1/jobs/nope/logs", ""), 404, "not found"},
      {"wrong method", Request("DELETE", "/v1/jobs/job-000001", ""), 405,
       "DELETE is not supported"},
      {"bad offset", Request("GET", "/v1/jobs/job-000001/logs?offset=-1", ""), 400,
       "offset: '-1' is not a non-negative integer"},
      {"bad follow", Request("GET", "/v1/jobs/job-000001/logs?follow=maybe", ""), 400, "follow"},
      {"bad state filter", Request("GET", "/v1/jobs?state=done", ""), 400,
       "state: 'done' is not a job state"},
      {"plan without planner", Request("POST", "/v1/plan", "name: x\ndata: {train: /a}\n"), 501,
       "no planner"},
      {"not HTTP", "HELLO THERE\r\n\r\n", 400, "malformed HTTP"},
      {"bad content length", "POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: zz\r\n\r\n", 400,
       "malformed HTTP"},
  };
  ASSERT_EQ(Call("POST", "/v1/jobs", kYaml).status, 201);  // job-000001 exists
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const RawReply r = Raw(server_->port(), c.request);
    EXPECT_EQ(r.status, c.status) << r.all.substr(0, 400);
    EXPECT_HAS(r.body, "\"error\"");
    EXPECT_HAS(r.body, c.message);
    ExpectHealthy();
  }
  // Truncated requests and abrupt closes get no answer and harm nothing.
  for (const std::string& partial :
       {std::string("POST /v1/jobs HTTP/1.1\r\nContent-Length: 100\r\n\r\nname:"),
        std::string("GET /v1/jo"), std::string("")}) {
    Raw(server_->port(), partial, /*half_close=*/true);
    ExpectHealthy();
  }
  EXPECT_EQ(store_->List().size(), 1u);  // none of the bad submissions was stored
}

TEST_F(ApiTest, Expect100ContinueIsAnswered) {
  Start();
  const RawReply r =
      Raw(server_->port(), Request("POST", "/v1/jobs", kYaml, "Expect: 100-continue\r\n"));
  EXPECT_HAS(r.all, "HTTP/1.1 100 Continue");
  EXPECT_EQ(r.status, 201) << r.all;
}

TEST_F(ApiTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  Start();
  std::string two = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
  two += Request("GET", "/v1/jobs", "");
  const RawReply r = Raw(server_->port(), two);
  EXPECT_EQ(r.status, 200);
  EXPECT_HAS(r.all, R"({"status":"ok"})");
  EXPECT_HAS(r.all, R"({"jobs":[]})");
}

TEST_F(ApiTest, TokenIsRequiredOnEveryRequest) {
  const std::string token = "0123456789abcdef0123456789abcdef";
  Start(token);
  for (const std::string& auth : std::vector<std::string>{
           "", "Authorization: Bearer wrong\r\n", "Authorization: Bearer " + token + "x\r\n",
           "Authorization: Bearer " + token.substr(1) + "\r\n",
           "Authorization: Basic " + token + "\r\n", std::string("Authorization: Bearer\r\n")}) {
    for (const char* path : {"/healthz", "/metrics", "/v1/jobs", "/v1/nothing"}) {
      SCOPED_TRACE(auth + path);
      const RawReply r = Raw(server_->port(), Request("GET", path, "", auth));
      EXPECT_EQ(r.status, 401);
      EXPECT_HAS(r.body, "authorization:");
      EXPECT_HAS(r.head, "WWW-Authenticate: Bearer");
    }
  }
  const RawReply post = Raw(server_->port(), Request("POST", "/v1/jobs", kYaml));
  EXPECT_EQ(post.status, 401);
  EXPECT_TRUE(store_->List().empty());
  ExpectHealthy();  // Call() sends the right token
  EXPECT_EQ(Call("POST", "/v1/jobs", kYaml).status, 201);
  const RawReply lower = Raw(
      server_->port(), Request("GET", "/v1/jobs", "", "authorization: bearer " + token + "\r\n"));
  EXPECT_EQ(lower.status, 200);
}

TEST(ApiServerStartTest, NonLoopbackNeedsATokenAndBadAddressesAreRefused) {
  ScratchDir dir;
  auto store = OpenStore(dir.path());
  ASSERT_NE(store, nullptr);
  ApiServerOptions o;
  o.listen = "0.0.0.0:0";
  auto s = ApiServer::Start(store.get(), {}, o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(s.status().message(), "not a loopback address and no token");
  EXPECT_HAS(s.status().message(), "--token-file");
  for (const char* bad : {"nowhere", "127.0.0.1:http", "127.0.0.1:70000", "example.com:80"}) {
    o.listen = bad;
    s = ApiServer::Start(store.get(), {}, o);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_HAS(s.status().message(), "--listen");
  }
  // A port in use is UNAVAILABLE and says so.
  o.listen = "127.0.0.1:0";
  auto first = ApiServer::Start(store.get(), {}, o);
  ASSERT_TRUE(first.ok());
  o.listen = (*first)->address();
  s = ApiServer::Start(store.get(), {}, o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kUnavailable);
  EXPECT_HAS(s.status().message(), "in use");
  // Loopback in any spelling needs no token.
  o.listen = "localhost:0";
  EXPECT_TRUE(ApiServer::Start(store.get(), {}, o).ok());
  o.listen = "[::1]:0";
  auto v6 = ApiServer::Start(store.get(), {}, o);
  if (!v6.ok()) {
    EXPECT_EQ(v6.status().code(), StatusCode::kUnavailable);  // no IPv6 on this machine
  }
}

TEST(ApiServerStartTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("secret-token", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-tokem", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token-", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("secret-token\0", 13), "secret-token"));
}

TEST_F(ApiTest, WorkersPlanAndMetricsComeFromTheHooks) {
  FakeWorkers workers;
  ApiHooks hooks;
  hooks.workers = &workers;
  std::atomic<int> calls{0};
  hooks.plan = [&](const proto::JobSpec& spec, int n, std::string device) -> Result<std::string> {
    ++calls;
    if (n == 3) return InvalidArgument("workers: 3 does not fit; use 2 or 4");
    if (device == "text") return std::string("dp=2 tp=1 pp=1\nbecause it is fastest");
    if (device == "boom") throw std::runtime_error("planner exploded");
    return fmt::format(R"({{"name": "{}", "workers": {}, "device": "{}"}})", spec.name(), n,
                       device);
  };
  Start("", hooks);
  HttpResponse r = Call("GET", "/v1/workers");
  ASSERT_EQ(r.status, 200);
  const auto list = ParseJson<proto::ApiWorkerList>(r.body);
  ASSERT_EQ(list.workers_size(), 2);
  EXPECT_EQ(list.workers(0).host(), "node1:9000");
  EXPECT_DOUBLE_EQ(list.workers(1).heartbeat_lag_seconds(), 4.5);

  r = Call("POST", "/v1/plan?workers=4&device=cuda", kYaml);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.body, R"({"name": "yaml-job", "workers": 4, "device": "cuda"})");
  r = Call("POST", "/v1/plan?device=text", kJson);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.body, R"({"plan":"dp=2 tp=1 pp=1\nbecause it is fastest"})");
  r = Call("POST", "/v1/plan?workers=3", kYaml);
  EXPECT_EQ(r.status, 400);
  EXPECT_HAS(r.body, "workers: 3 does not fit");
  r = Call("POST", "/v1/plan?workers=0", kYaml);
  EXPECT_EQ(r.status, 400);
  r = Call("POST", "/v1/plan?device=boom", kYaml);
  EXPECT_EQ(r.status, 500);
  EXPECT_HAS(r.body, "planner exploded");
  r = Call("POST", "/v1/plan", "name: x\n");  // the spec is validated before the hook
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(calls.load(), 4);
  ExpectHealthy();

  const std::string id =
      ParseJson<proto::SubmitJobResponse>(Call("POST", "/v1/jobs", kYaml).body).id();
  ASSERT_EQ(Call("POST", "/v1/jobs", kJson).status, 201);
  ASSERT_TRUE(store_->Transition(id, proto::JOB_STATE_PLANNING).ok());
  ASSERT_TRUE(store_->Transition(id, proto::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->Transition(id, proto::JOB_STATE_RECOVERING).ok());
  ASSERT_TRUE(store_->Transition(id, proto::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->ReportProgress(id, 2, {12, 3.0, 2500}).ok());
  r = Call("GET", "/metrics");
  ASSERT_EQ(r.status, 200);
  EXPECT_HAS(r.content_type, "text/plain; version=0.0.4");
  EXPECT_HAS(r.body, "# TYPE strata_jobs gauge\n");
  EXPECT_HAS(r.body, "strata_jobs{state=\"running\"} 1\n");
  EXPECT_HAS(r.body, "strata_jobs{state=\"pending\"} 1\n");
  EXPECT_HAS(r.body, "strata_jobs{state=\"failed\"} 0\n");
  EXPECT_HAS(r.body, "strata_workers 2\n");
  EXPECT_HAS(r.body, "strata_steps_total 12\n");
  EXPECT_HAS(r.body, "strata_tokens_per_second 2500\n");
  EXPECT_HAS(r.body, "strata_recoveries_total 1\n");
  EXPECT_HAS(r.body, "strata_heartbeat_lag_seconds{worker=\"w-1\"} 0.25\n");
  EXPECT_HAS(r.body, "strata_heartbeat_lag_seconds{worker=\"w-\\\"2\\\"\"} 4.5\n");
}

TEST_F(ApiTest, StopWithOpenConnectionsAndWaitingPollsIsClean) {
  Start();
  const std::string id =
      ParseJson<proto::SubmitJobResponse>(Call("POST", "/v1/jobs", kYaml).body).id();
  std::thread poller([&] {
    Raw(server_->port(), Request("GET", "/v1/jobs/" + id + "/logs?offset=5&follow=1", ""));
  });
  const int idle = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(server_->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(idle, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  std::this_thread::sleep_for(milliseconds(200));
  server_->Stop();
  server_->Stop();  // idempotent
  poller.join();
  ::close(idle);
}

// ---------------------------------------------------------------------------------------------
// The real process

const std::string kCoordinator = std::string(STRATA_BINARY_DIR) + "/bin/strata-coordinator";

struct Daemon {
  pid_t pid = -1;
  int port = 0;
  std::string log;
};

// Starts strata-coordinator with `args`, output to `log`; waits for "listening on HOST:PORT".
// port stays 0 when the process exits first (pid is then -1).
Daemon Spawn(const std::vector<std::string>& args, const std::string& log) {
  Daemon d;
  d.log = log;
  // Everything the child needs is built before fork: it only calls async-signal-safe functions.
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(kCoordinator.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  d.pid = ::fork();
  if (d.pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execv(kCoordinator.c_str(), argv.data());
    ::_exit(127);
  }
  const std::string marker = "strata-coordinator: listening on ";
  for (int i = 0; i < 400 && d.port == 0; ++i) {
    std::this_thread::sleep_for(milliseconds(50));
    std::ifstream in(log);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    const size_t at = text.find(marker);
    const size_t space = at == std::string::npos ? at : text.find(' ', at + marker.size());
    if (space != std::string::npos) {
      const size_t colon = text.rfind(':', space);
      d.port = std::atoi(text.c_str() + colon + 1);
      break;
    }
    int status = 0;
    if (::waitpid(d.pid, &status, WNOHANG) == d.pid) {
      d.pid = -1;
      break;
    }
  }
  return d;
}

int WaitExit(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(CoordinatorProcessTest, JobsSurviveKill9AndSigtermIsClean) {
  ASSERT_TRUE(std::filesystem::exists(kCoordinator))
      << kCoordinator << " is missing; build the strata-coordinator target";
  ScratchDir dir;
  const std::string data = dir.path() + "/data";
  const std::vector<std::string> args = {"--data-dir", data, "--listen", "127.0.0.1:0"};
  Daemon d = Spawn(args, dir.path() + "/run1.log");
  ASSERT_GT(d.pid, 0) << ReadAll(d.log);
  ASSERT_GT(d.port, 0) << ReadAll(d.log);
  const HostPort at{"127.0.0.1", d.port};
  auto post = [](const HostPort& hp, const std::string& target, const std::string& body,
                 const std::string& key) {
    HttpRequest req;
    req.method = "POST";
    req.target = target;
    req.body = body;
    if (!key.empty()) req.headers.emplace_back("Client-Key", key);
    auto r = HttpCall(hp, req);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : HttpResponse{};
  };
  HttpResponse a = post(at, "/v1/jobs", kYaml, "run-a");
  ASSERT_EQ(a.status, 201) << a.body;
  HttpResponse b = post(at, "/v1/jobs", kJson, "");
  ASSERT_EQ(b.status, 201) << b.body;
  const std::string id_a = ParseJson<proto::SubmitJobResponse>(a.body).id();
  const std::string id_b = ParseJson<proto::SubmitJobResponse>(b.body).id();
  ASSERT_EQ(post(at, "/v1/jobs/" + id_b + "/cancel", "", "").status, 200);

  // kill -9 right after the acknowledgements: nothing acknowledged may be lost.
  ASSERT_EQ(::kill(d.pid, SIGKILL), 0);
  EXPECT_EQ(WaitExit(d.pid), 128 + SIGKILL);

  Daemon d2 = Spawn(args, dir.path() + "/run2.log");
  ASSERT_GT(d2.port, 0) << ReadAll(d2.log);
  EXPECT_HAS(ReadAll(d2.log), "2 jobs");
  const HostPort at2{"127.0.0.1", d2.port};
  HttpRequest get;
  get.target = "/v1/jobs/" + id_a;
  auto ra = HttpCall(at2, get);
  ASSERT_TRUE(ra.ok());
  ASSERT_EQ(ra->status, 200) << ra->body;
  EXPECT_EQ(ParseJson<proto::ApiJob>(ra->body).state(), "PENDING");
  EXPECT_EQ(ParseJson<proto::ApiJob>(ra->body).spec().name(), "yaml-job");
  get.target = "/v1/jobs/" + id_b;
  auto rb = HttpCall(at2, get);
  ASSERT_TRUE(rb.ok());
  EXPECT_EQ(ParseJson<proto::ApiJob>(rb->body).state(), "CANCELLED");
  get.target = "/v1/jobs/" + id_b + "/logs";
  auto logs = HttpCall(at2, get);
  ASSERT_TRUE(logs.ok());
  EXPECT_EQ(ParseJson<proto::ApiLogs>(logs->body).entries_size(), 2);
  // The client key still names job a; a new job gets a new id.
  HttpResponse again = post(at2, "/v1/jobs", kYaml, "run-a");
  EXPECT_EQ(again.status, 200);
  EXPECT_EQ(ParseJson<proto::SubmitJobResponse>(again.body).id(), id_a);
  HttpResponse c = post(at2, "/v1/jobs", kYaml, "");
  EXPECT_EQ(ParseJson<proto::SubmitJobResponse>(c.body).id(), "job-000003");

  ASSERT_EQ(::kill(d2.pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(d2.pid), 0) << ReadAll(d2.log);
  EXPECT_HAS(ReadAll(d2.log), "SIGTERM: shutting down");

  // A non-loopback address without a token: refused at start with exit code 2.
  Daemon bad = Spawn({"--data-dir", data, "--listen", "0.0.0.0:0"}, dir.path() + "/run3.log");
  EXPECT_EQ(bad.port, 0);
  EXPECT_HAS(ReadAll(bad.log), "not a loopback address and no token");
  const std::string short_token = dir.path() + "/short.token";
  std::ofstream(short_token) << "abc\n";
  Daemon bad2 = Spawn({"--data-dir", data, "--listen", "0.0.0.0:0", "--token-file", short_token},
                      dir.path() + "/run4.log");
  EXPECT_EQ(bad2.port, 0);
  EXPECT_HAS(ReadAll(bad2.log), "at least 16 characters");
}

TEST(CoordinatorProcessTest, ATokenFileAllowsAnyAddressAndIsEnforced) {
  ScratchDir dir;
  const std::string token_file = dir.path() + "/token";
  std::ofstream(token_file) << "tok-0123456789abcdef-0123456789\n";
  ::chmod(token_file.c_str(), 0600);
  Daemon d = Spawn(
      {"--data-dir", dir.path() + "/data", "--listen", "0.0.0.0:0", "--token-file", token_file},
      dir.path() + "/run.log");
  ASSERT_GT(d.pid, 0) << ReadAll(d.log);
  ASSERT_GT(d.port, 0) << ReadAll(d.log);
  EXPECT_HAS(ReadAll(d.log), "listening on 0.0.0.0:");
  HttpRequest req;
  req.target = "/healthz";
  auto r = HttpCall(HostPort{"127.0.0.1", d.port}, req);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 401);
  req.headers.emplace_back("Authorization", "Bearer tok-0123456789abcdef-0123456789");
  r = HttpCall(HostPort{"127.0.0.1", d.port}, req);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 200);
  ::kill(d.pid, SIGTERM);
  EXPECT_EQ(WaitExit(d.pid), 0);
}

}  // namespace
}  // namespace strata::coordinator
