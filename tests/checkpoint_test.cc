// The checkpoint store: resharding arithmetic against model::ParamTensor::GlobalIndex, the
// commit rule, retention, integrity checks, faults (fsync failure, disk full, power loss,
// flipped bytes), and the trainer's save/resume (bitwise on the same layout, float-exact on
// another, fallback past a corrupt checkpoint).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "checkpoint/fault_fs.h"
#include "checkpoint/hf_gpt2.h"
#include "checkpoint/reshard.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/storage_internal.h"
#include "checkpoint/store.h"
#include "comm/grid.h"
#include "comm/inprocess.h"
#include "model/gpt.h"
#include "tests/test_util.h"
#include "worker/trainer.h"

namespace strata {
namespace {

using checkpoint::CheckpointReader;
using checkpoint::ShardWriter;

// A ParamTensor-like description of local tensor `part` of `parts` (the Megatron split of
// dimension `dim`, `blocks` blocks, local blocks padded to `pad_to` entries).
model::ParamTensor Sharded(std::vector<int64_t> global, int dim, int blocks, int part, int parts,
                           int64_t pad_to = 0) {
  model::ParamTensor t;
  t.global_shape = global;
  t.shape = global;
  t.shard_dim = parts == 1 && blocks == 1 && pad_to == 0 ? -1 : dim;
  t.shard_blocks = blocks;
  if (dim >= 0) {
    const int64_t gblock = global[dim] / blocks;
    const int64_t per = (gblock + parts - 1) / parts;
    t.shard_offset = std::min<int64_t>(gblock, per * part);
    t.shard_extent = std::min<int64_t>(gblock, t.shard_offset + per) - t.shard_offset;
    const int64_t lblock = std::max<int64_t>(pad_to, per);
    t.shape[dim] = lblock * blocks;
  }
  if (t.shard_dim < 0) {
    t.shard_offset = 0;
    t.shard_extent = 0;
  }
  t.numel = 1;
  for (int64_t d : t.shape) t.numel *= d;
  return t;
}

using worker::LayoutOf;

// The local tensor's values taken from a global tensor (0 for padding), by GlobalIndex.
std::vector<float> Slice(const model::ParamTensor& t, const std::vector<float>& global) {
  std::vector<float> local(static_cast<size_t>(t.numel), 0.f);
  for (int64_t i = 0; i < t.numel; ++i) {
    const int64_t g = t.GlobalIndex(i);
    if (g >= 0) local[i] = global[g];
  }
  return local;
}

std::vector<float> Iota(int64_t n, float start = 1.f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
  return v;
}

TEST(Reshard, RunsAgreeWithParamTensorGlobalIndex) {
  struct Case {
    std::vector<int64_t> global;
    int dim, blocks, parts;
    int64_t pad;
  };
  const Case cases[] = {
      {{12, 4}, 0, 3, 2, 0},  // c_attn weight, tp 2
      {{12}, 0, 3, 2, 0},     // c_attn bias
      {{4, 16}, 1, 1, 4, 0},  // row-parallel proj, tp 4
      {{10, 4}, 0, 1, 3, 4},  // vocab-parallel wte, vocab 10 padded to 3 x 4
      {{5, 3}, -1, 1, 1, 0},  // replicated
  };
  for (const Case& c : cases) {
    for (int part = 0; part < c.parts; ++part) {
      const model::ParamTensor t = Sharded(c.global, c.dim, c.blocks, part, c.parts, c.pad);
      for (auto [b, e] :
           {std::pair<int64_t, int64_t>{0, t.numel}, {1, t.numel - 1}, {t.numel / 2, t.numel}}) {
        const proto::ShardLayout l = LayoutOf(t, b, e);
        ASSERT_TRUE(checkpoint::ValidateLayout(l, "t").ok());
        std::vector<int64_t> expect(static_cast<size_t>(t.numel), -1), got(expect);
        for (int64_t i = b; i < e; ++i) expect[i] = t.GlobalIndex(i);
        for (const checkpoint::Run& r : checkpoint::LocalRuns(l)) {
          for (int64_t k = 0; k < r.len; ++k) got[r.local + k] = r.global + k;
        }
        EXPECT_EQ(got, expect) << "dim " << c.dim << " part " << part << " [" << b << "," << e
                               << ")";
      }
    }
  }
}

TEST(Reshard, EveryLayoutPairCopiesExactly) {
  // Write a global [12, 8] tensor as tp=a shards (each also split in two element ranges, as
  // ZeRO-1 would), read it as tp=b shards: every element lands where GlobalIndex says.
  const std::vector<int64_t> global_shape = {12, 8};
  const std::vector<float> global = Iota(96);
  for (int dim : {0, 1}) {
    for (int a : {1, 2, 4}) {
      for (int b : {1, 2, 3, 4}) {
        std::vector<std::pair<std::vector<checkpoint::Run>, std::vector<float>>> src;
        std::vector<int64_t> src_begin;
        for (int part = 0; part < a; ++part) {
          const model::ParamTensor t = Sharded(global_shape, dim, 1, part, a);
          const std::vector<float> local = Slice(t, global);
          const int64_t mid = t.numel / 3;
          for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, mid}, {mid, t.numel}}) {
            std::vector<checkpoint::Run> runs = checkpoint::LocalRuns(LayoutOf(t, lo, hi));
            checkpoint::SortByGlobal(&runs);
            src.push_back({runs, std::vector<float>(local.begin() + lo, local.begin() + hi)});
            src_begin.push_back(lo);
          }
        }
        for (int part = 0; part < b; ++part) {
          const model::ParamTensor t = Sharded(global_shape, dim, 1, part, b);
          const proto::ShardLayout l = LayoutOf(t, 0, t.numel);
          std::vector<float> dst(static_cast<size_t>(t.numel), 0.f);  // padding stays 0
          int64_t copied = 0;
          for (size_t s = 0; s < src.size(); ++s) {
            copied += checkpoint::CopyOverlap(checkpoint::LocalRuns(l), 0, dst.data(), src[s].first,
                                              src_begin[s], src[s].second.data());
          }
          EXPECT_EQ(copied, checkpoint::CountReal(l));
          EXPECT_EQ(dst, Slice(t, global)) << "dim " << dim << " tp " << a << " -> " << b;
        }
      }
    }
  }
}

TEST(Reshard, InconsistentLayoutsAreRejected) {
  model::ParamTensor t = Sharded({12, 4}, 0, 3, 0, 2);
  proto::ShardLayout l = LayoutOf(t, 0, t.numel);
  l.set_shard_extent(5);  // beyond a block of 4
  EXPECT_FALSE(checkpoint::ValidateLayout(l, "x").ok());
  l = LayoutOf(t, 0, t.numel + 1);
  EXPECT_FALSE(checkpoint::ValidateLayout(l, "x").ok());
  l = LayoutOf(t, 0, t.numel);
  l.set_shard_dim(2);
  EXPECT_FALSE(checkpoint::ValidateLayout(l, "x").ok());
}

// ---------------------------------------------------------------------------------------------
// The store

// Saves global tensor "w" [8, 6] split by rows over `world` ranks, plus a replicated "b" [6]
// (rank 0), as step `step`. Returns the commit's status.
Status SaveStep(std::shared_ptr<checkpoint::Storage> storage, const std::string& root, int64_t step,
                int world, float base, int64_t chunk_bytes = 16) {
  const std::vector<float> w = Iota(48, base), b = Iota(6, -base);
  for (int r = 0; r < world; ++r) {
    const model::ParamTensor t = Sharded({8, 6}, 0, 1, r, world);
    const std::vector<float> local = Slice(t, w);
    auto writer = ShardWriter::Create(storage, root, step, r, chunk_bytes);
    RETURN_IF_ERROR(writer.status());
    RETURN_IF_ERROR((*writer)->Add({"w", LayoutOf(t, 0, t.numel), local.data()}));
    if (r == 0) {
      RETURN_IF_ERROR((*writer)->Add({"b", LayoutOf(Sharded({6}, -1, 1, 0, 1), 0, 6), b.data()}));
    }
    RETURN_IF_ERROR((*writer)->Finish());
  }
  proto::Manifest m;
  m.set_step(step);
  return checkpoint::CommitWhenDurable(storage, root, m, world, std::chrono::seconds(5));
}

std::vector<float> ReadW(std::shared_ptr<checkpoint::Storage> storage, const std::string& root,
                         int64_t step, Status* status) {
  auto m = checkpoint::ReadManifest(*storage, root, step);
  if (!m.ok()) {
    *status = m.status();
    return {};
  }
  auto reader = CheckpointReader::Open(storage, root, *m);
  if (!reader.ok()) {
    *status = reader.status();
    return {};
  }
  auto w = (*reader)->ReadGlobal("w", nullptr);
  *status = w.status();
  return w.ok() ? *w : std::vector<float>{};
}

TEST(CheckpointStore, RoundTripOntoAnotherLayout) {
  testing::ScratchDir dir;
  auto storage = checkpoint::DefaultStorage();
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 7, 2, 1.f).ok());
  auto steps = checkpoint::CommittedSteps(*storage, root);
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, std::vector<int64_t>{7});
  auto m = checkpoint::ReadManifest(*storage, root, 7);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->world(), 2);
  EXPECT_EQ(m->shards_size(), 3);
  EXPECT_EQ(m->total_bytes(), (48 + 6) * 4);
  auto reader = CheckpointReader::Open(storage, root, *m);
  ASSERT_TRUE(reader.ok());
  EXPECT_TRUE((*reader)->VerifyAll().ok());
  // Read as 3 column shards (another split dimension and count).
  const std::vector<float> w = Iota(48, 1.f);
  for (int part = 0; part < 3; ++part) {
    const model::ParamTensor t = Sharded({8, 6}, 1, 1, part, 3);
    std::vector<float> got(static_cast<size_t>(t.numel));
    ASSERT_TRUE((*reader)->Read("w", LayoutOf(t, 0, t.numel), got.data()).ok());
    EXPECT_EQ(got, Slice(t, w));
  }
  std::vector<int64_t> shape;
  auto b = (*reader)->ReadGlobal("b", &shape);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, Iota(6, -1.f));
  EXPECT_EQ(shape, std::vector<int64_t>{6});
  // A tensor the checkpoint lacks, and a shape it does not have.
  float x[6];
  EXPECT_EQ((*reader)->Read("nope", LayoutOf(Sharded({6}, -1, 1, 0, 1), 0, 6), x).code(),
            StatusCode::kNotFound);
  const Status other = (*reader)->Read("b", LayoutOf(Sharded({3}, -1, 1, 0, 1), 0, 3), x);
  EXPECT_EQ(other.code(), StatusCode::kNotFound);
  EXPECT_HAS(other.message(), "global shape");
}

TEST(CheckpointStore, NothingUncommittedIsListedOrLoaded) {
  testing::ScratchDir dir;
  auto storage = checkpoint::DefaultStorage();
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 1, 2, 1.f).ok());
  // Step 2: rank 0 durable, rank 1 never reports.
  const model::ParamTensor t = Sharded({8, 6}, 0, 1, 0, 2);
  const std::vector<float> local = Slice(t, Iota(48, 2.f));
  auto writer = ShardWriter::Create(storage, root, 2, 0);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->Add({"w", LayoutOf(t, 0, t.numel), local.data()}).ok());
  ASSERT_TRUE((*writer)->Finish().ok());
  proto::Manifest m;
  m.set_step(2);
  const Status s =
      checkpoint::CommitWhenDurable(storage, root, m, 2, std::chrono::milliseconds(100));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
  EXPECT_HAS(s.message(), "ranks 1 did not report");
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), std::vector<int64_t>{1});
  EXPECT_EQ(checkpoint::ReadManifest(*storage, root, 2).status().code(), StatusCode::kNotFound);
  // A rank that reports a failed save ends the wait at once with its error.
  checkpoint::ReportSaveFailed(*storage, root, 2, 1, IoError("disk on fire"));
  const Status f = checkpoint::CommitWhenDurable(storage, root, m, 2, std::chrono::seconds(30));
  EXPECT_HAS(f.message(), "rank 1 failed to save");
  EXPECT_HAS(f.message(), "disk on fire");
  // The garbage collector removes the uncommitted step below the in-flight bound only.
  auto removed = checkpoint::CollectGarbage(*storage, root, {}, 2);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 0);
  EXPECT_TRUE(std::filesystem::exists(root + "/step-00000002"));
  removed = checkpoint::CollectGarbage(*storage, root, {}, 3);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 1);
  EXPECT_FALSE(std::filesystem::exists(root + "/step-00000002"));
  Status rs;
  EXPECT_EQ(ReadW(storage, root, 1, &rs), Iota(48, 1.f));
  EXPECT_TRUE(rs.ok()) << rs.ToString();
}

TEST(CheckpointStore, RetentionKeepsLastKAndEveryNth) {
  testing::ScratchDir dir;
  auto storage = checkpoint::DefaultStorage();
  const std::string root = dir.path() + "/ckpt";
  for (int s = 1; s <= 7; ++s) ASSERT_TRUE(SaveStep(storage, root, s, 1, s).ok());
  checkpoint::RetentionPolicy p;
  p.keep_last = 2;
  p.keep_every = 3;
  auto removed = checkpoint::CollectGarbage(*storage, root, p, 8);
  ASSERT_TRUE(removed.ok()) << removed.status().ToString();
  EXPECT_EQ(*removed, 4);  // 1, 2, 4, 5
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), (std::vector<int64_t>{3, 6, 7}));
  EXPECT_FALSE(std::filesystem::exists(root + "/step-00000001"));
  EXPECT_TRUE(std::filesystem::exists(root + "/step-00000003"));
  // Resuming from 3 abandons 6 and 7.
  removed = checkpoint::CollectGarbage(*storage, root, p, 8, 3);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), (std::vector<int64_t>{3}));
  Status rs;
  EXPECT_EQ(ReadW(storage, root, 3, &rs), Iota(48, 3.f));
}

// Flips one byte in the middle of every SST file of `instance_dir`.
int CorruptSsts(const std::string& instance_dir) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(instance_dir)) {
    if (e.path().extension() != ".sst") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(40);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(40);
    f.write(&c, 1);
    ++n;
  }
  return n;
}

TEST(CheckpointStore, CorruptShardIsNamed) {
  testing::ScratchDir dir;
  auto storage = checkpoint::DefaultStorage();
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 3, 2, 1.f).ok());
  ASSERT_GT(CorruptSsts(root + "/step-00000003/rank-00001"), 0);
  Status s;
  ReadW(storage, root, 3, &s);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_HAS(s.message(), "tensor w");
  EXPECT_HAS(s.message(), "rank 1");
  EXPECT_HAS(s.message(), "step-00000003/rank-00001");
  auto m = checkpoint::ReadManifest(*storage, root, 3);
  auto reader = CheckpointReader::Open(storage, root, *m);
  const Status v = (*reader)->VerifyAll();
  EXPECT_EQ(v.code(), StatusCode::kDataLoss);
  EXPECT_HAS(v.message(), "rank 1");
  // A missing instance is named too.
  std::filesystem::remove_all(root + "/step-00000003/rank-00000");
  ReadW(storage, root, 3, &s);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_HAS(s.message(), "rank-00000");
}

TEST(CheckpointStore, ByteFlippedOnReadIsCaught) {
  testing::ScratchDir dir;
  auto fault = checkpoint::NewFaultInjectionFs();
  auto storage = checkpoint::StorageOn(fault);
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 1, 1, 1.f, 1 << 20).ok());
  fault->SetFlipByteOnRead("step-00000001/rank-00000/");
  Status s;
  ReadW(storage, root, 1, &s);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_HAS(s.message(), "tensor w");
  fault->ClearFlip();
  EXPECT_EQ(ReadW(storage, root, 1, &s), Iota(48, 1.f));
  EXPECT_TRUE(s.ok());
}

TEST(CheckpointStore, FailedSyncLeavesThePreviousCheckpoint) {
  testing::ScratchDir dir;
  auto fault = checkpoint::NewFaultInjectionFs();
  auto storage = checkpoint::StorageOn(fault);
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 1, 2, 1.f).ok());
  fault->SetFailSync(true);
  const Status s = SaveStep(storage, root, 2, 2, 2.f);
  EXPECT_FALSE(s.ok());
  fault->SetFailSync(false);
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), std::vector<int64_t>{1});
  // Power loss: whatever the failed save left unsynced is gone; step 1 still loads.
  ASSERT_TRUE(fault->DropUnsyncedData().ok());
  Status rs;
  EXPECT_EQ(ReadW(storage, root, 1, &rs), Iota(48, 1.f));
  EXPECT_TRUE(rs.ok()) << rs.ToString();
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), std::vector<int64_t>{1});
}

TEST(CheckpointStore, DiskFullIsResourceExhausted) {
  testing::ScratchDir dir;
  auto fault = checkpoint::NewFaultInjectionFs();
  auto storage = checkpoint::StorageOn(fault);
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 1, 1, 1.f).ok());
  fault->SetSpaceLimit(100);
  const Status s = SaveStep(storage, root, 2, 1, 2.f);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  fault->ClearSpaceLimit();
  Status rs;
  EXPECT_EQ(ReadW(storage, root, 1, &rs), Iota(48, 1.f));
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), std::vector<int64_t>{1});
  // The next save works again and commits.
  EXPECT_TRUE(SaveStep(storage, root, 3, 1, 3.f).ok());
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), (std::vector<int64_t>{1, 3}));
}

TEST(CheckpointStore, PowerLossDuringSaveKeepsLatestCommitted) {
  // Every prefix of a save's writes may be lost; what was committed before stays loadable.
  testing::ScratchDir dir;
  auto fault = checkpoint::NewFaultInjectionFs();
  auto storage = checkpoint::StorageOn(fault);
  const std::string root = dir.path() + "/ckpt";
  ASSERT_TRUE(SaveStep(storage, root, 1, 2, 1.f).ok());
  // Rank 0 of step 2 finishes, rank 1 is mid-save (shards added, never finished): crash.
  {
    const model::ParamTensor t = Sharded({8, 6}, 0, 1, 0, 2);
    const std::vector<float> local = Slice(t, Iota(48, 2.f));
    auto w0 = ShardWriter::Create(storage, root, 2, 0);
    ASSERT_TRUE(w0.ok());
    ASSERT_TRUE((*w0)->Add({"w", LayoutOf(t, 0, t.numel), local.data()}).ok());
    ASSERT_TRUE((*w0)->Finish().ok());
    auto w1 = ShardWriter::Create(storage, root, 2, 1);
    ASSERT_TRUE(w1.ok());
  }
  ASSERT_TRUE(fault->DropUnsyncedData().ok());
  EXPECT_EQ(*checkpoint::CommittedSteps(*storage, root), std::vector<int64_t>{1});
  Status rs;
  EXPECT_EQ(ReadW(storage, root, 1, &rs), Iota(48, 1.f));
  EXPECT_TRUE(rs.ok()) << rs.ToString();
}

// ---------------------------------------------------------------------------------------------
// The trainer

std::string JobYaml(const std::string& text, const std::string& ckpt, bool async,
                    const std::string& extra = "") {
  return "model: {layers: 2, heads: 2, d_model: 32, seq_len: 16}\n"
         "data: {train: " +
         text +
         "}\n"
         "train: {steps: 8, global_batch: 8, micro_batch: 2, lr: 1.0e-2, warmup: 2, seed: 5, "
         "grad_clip: 0.5}\n"
         "eval: {every: 0}\n"
         "checkpoint: {dir: " +
         ckpt + ", every: 4, async: " + (async ? "true" : "false") + extra + "}\n";
}

worker::TrainOptions Quiet() {
  worker::TrainOptions o;
  o.threads = 1;
  o.log_steps = false;
  return o;
}

struct Trace {
  std::vector<float> losses;
  std::vector<float> params;
};

Trace Train(const proto::JobSpec& spec, int64_t max_steps, bool resume,
            worker::TrainOptions opt = Quiet()) {
  Trace out;
  opt.max_steps = max_steps;
  auto t = worker::Trainer::Create(spec, opt);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  if (!t.ok()) return out;
  auto start = (*t)->StartCheckpoints(resume);
  EXPECT_TRUE(start.ok()) << start.status().ToString();
  while ((*t)->step() < (*t)->total_steps()) {
    auto st = (*t)->Step();
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    if (!st.ok()) return out;
    out.losses.push_back(st->loss);
    const int64_t step = (*t)->step();
    if (step % spec.checkpoint().every() == 0 || step == (*t)->total_steps()) {
      EXPECT_TRUE((*t)->SaveCheckpoint().ok());
    }
  }
  EXPECT_TRUE((*t)->WaitForCheckpoint().ok());
  const model::Gpt& m = (*t)->model();
  out.params.assign(m.params(), m.params() + m.num_params());
  return out;
}

TEST(CheckpointResume, SameLayoutIsBitwiseIdentical) {
  for (bool async : {false, true}) {
    testing::ScratchDir dir;
    const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
    const proto::JobSpec a = testing::SpecFromYaml(JobYaml(text, dir.path() + "/a", async));
    const proto::JobSpec b = testing::SpecFromYaml(JobYaml(text, dir.path() + "/b", async));
    const Trace straight = Train(a, 8, false);
    const Trace first = Train(b, 4, false);
    const Trace second = Train(b, 8, true);
    ASSERT_EQ(straight.losses.size(), 8u);
    ASSERT_EQ(first.losses.size() + second.losses.size(), 8u);
    std::vector<float> joined = first.losses;
    joined.insert(joined.end(), second.losses.begin(), second.losses.end());
    EXPECT_EQ(joined, straight.losses) << "async " << async;
    EXPECT_EQ(second.params, straight.params) << "async " << async;
  }
}

TEST(CheckpointResume, NewRunIntoUsedDirectoryAndMismatchedJobAreRefused) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
  const proto::JobSpec spec = testing::SpecFromYaml(JobYaml(text, dir.path() + "/c", false));
  Train(spec, 4, false);
  auto t = worker::Trainer::Create(spec, Quiet());
  ASSERT_TRUE(t.ok());
  auto fresh = (*t)->StartCheckpoints(false);
  EXPECT_EQ(fresh.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(fresh.status().message(), "--resume");
  EXPECT_HAS(fresh.status().message(), "latest step 4");
  proto::JobSpec other = spec;
  other.mutable_train()->set_global_batch(16);
  auto t2 = worker::Trainer::Create(other, Quiet());
  ASSERT_TRUE(t2.ok());
  auto resumed = (*t2)->StartCheckpoints(true);
  EXPECT_EQ(resumed.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(resumed.status().message(), "train.global_batch");
}

TEST(CheckpointResume, CorruptLatestFallsBackToPrevious) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
  const std::string root = dir.path() + "/d";
  const proto::JobSpec spec = testing::SpecFromYaml(JobYaml(text, root, false));
  const Trace full = Train(spec, 8, false);  // commits 4 and 8
  ASSERT_GT(CorruptSsts(root + "/step-00000008/rank-00000"), 0);
  auto t = worker::Trainer::Create(spec, Quiet());
  ASSERT_TRUE(t.ok());
  auto step = (*t)->Resume();
  ASSERT_TRUE(step.ok()) << step.status().ToString();
  EXPECT_EQ(*step, 4);
  // It continues from 4 exactly as the first run did.
  std::vector<float> losses;
  for (int i = 0; i < 4; ++i) losses.push_back((*t)->Step()->loss);
  EXPECT_EQ(losses, std::vector<float>(full.losses.begin() + 4, full.losses.end()));
  // The unusable step 8 belonged to the abandoned history and is gone.
  EXPECT_EQ(*checkpoint::CommittedSteps(*checkpoint::DefaultStorage(), root),
            std::vector<int64_t>{4});
}

TEST(CheckpointResume, FailedSaveDoesNotStopTrainingUnlessAsked) {
  for (bool stop : {false, true}) {
    testing::ScratchDir dir;
    const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
    const std::string root = dir.path() + "/e";
    const proto::JobSpec spec =
        testing::SpecFromYaml(JobYaml(text, root, true, stop ? ", stop_on_error: true" : ""));
    auto fault = checkpoint::NewFaultInjectionFs();
    worker::TrainOptions opt = Quiet();
    opt.checkpoint_storage = checkpoint::StorageOn(fault);
    opt.max_steps = 8;
    auto t = worker::Trainer::Create(spec, opt);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->StartCheckpoints(false).ok());
    for (int i = 0; i < 4; ++i) ASSERT_TRUE((*t)->Step().ok());
    ASSERT_TRUE((*t)->SaveCheckpoint().ok());
    ASSERT_TRUE((*t)->WaitForCheckpoint().ok());  // step 4 committed
    fault->SetFailSync(true);                     // every later save fails
    auto run = (*t)->Run(nullptr);                // saves at 8 (the end)
    if (stop) {
      EXPECT_FALSE(run.ok());
    } else {
      ASSERT_TRUE(run.ok()) << run.status().ToString();
      EXPECT_EQ(run->steps, 4);
    }
    fault->SetFailSync(false);
    EXPECT_EQ(*checkpoint::CommittedSteps(*opt.checkpoint_storage, root), std::vector<int64_t>{4});
  }
}

// Threads as ranks: a data-parallel ZeRO-1 run saves; one process resumes it, and the reverse.
Trace TrainGrid(const proto::JobSpec& spec, int dp, int tp, int64_t max_steps, bool resume) {
  const int world_size = dp * tp;
  comm::InProcessWorld world(world_size);
  std::vector<Trace> traces(world_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      auto wg = comm::MakeInProcessGroup(world, r);
      ASSERT_TRUE(wg.ok());
      auto grid = comm::Grid::Create(world_size, dp, tp, 1);
      ASSERT_TRUE(grid.ok());
      auto groups = comm::SplitGrid(**wg, *grid);
      ASSERT_TRUE(groups.ok());
      worker::TrainOptions opt = Quiet();
      opt.dp_group = groups->dp.get();
      opt.tp_group = groups->tp.get();
      opt.pp_group = groups->pp.get();
      traces[r] = Train(spec, max_steps, resume, opt);
    });
  }
  for (auto& th : threads) th.join();
  return traces[0];
}

TEST(CheckpointResume, OtherLayoutContinuesSampleExact) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
  proto::JobSpec ref_spec = testing::SpecFromYaml(JobYaml(text, dir.path() + "/r", false));
  const Trace ref = Train(ref_spec, 8, false);
  proto::JobSpec spec = testing::SpecFromYaml(JobYaml(text, dir.path() + "/g", true));
  spec.mutable_parallel()->set_zero1(true);
  const Trace a = TrainGrid(spec, 2, 1, 4, false);  // dp 2 + ZeRO-1
  const Trace b = TrainGrid(spec, 1, 2, 6, true);   // tp 2
  const Trace c = Train(spec, 8, true);             // one process
  std::vector<float> joined = a.losses;
  joined.insert(joined.end(), b.losses.begin(), b.losses.end());
  joined.insert(joined.end(), c.losses.begin(), c.losses.end());
  ASSERT_EQ(joined.size(), ref.losses.size());
  for (size_t i = 0; i < joined.size(); ++i) {
    EXPECT_NEAR(joined[i], ref.losses[i], 1e-5 * std::abs(ref.losses[i])) << "step " << i + 1;
  }
  ASSERT_EQ(c.params.size(), ref.params.size());
  float max_abs = 0.f, max_diff = 0.f;
  for (size_t i = 0; i < ref.params.size(); ++i) {
    max_abs = std::max(max_abs, std::abs(ref.params[i]));
    max_diff = std::max(max_diff, std::abs(ref.params[i] - c.params[i]));
  }
  EXPECT_LE(max_diff, 2e-5f * max_abs);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

TEST(CheckpointExport, CliWritesTheModelsWeightsWithHfNames) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
  const std::string root = dir.path() + "/x";
  const proto::JobSpec spec = testing::SpecFromYaml(JobYaml(text, root, false));
  worker::TrainOptions opt = Quiet();
  opt.max_steps = 4;
  auto t = worker::Trainer::Create(spec, opt);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->StartCheckpoints(false).ok());
  ASSERT_TRUE((*t)->Run(nullptr).ok());  // saves step 4
  const std::string out = dir.path() + "/model.safetensors";
  const std::string cmd = std::string(STRATA_BINARY_DIR) + "/bin/strata export " + root +
                          " --format safetensors -o " + out + " > " + dir.path() + "/log 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto file = checkpoint::ReadSafetensors(out);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_NE(file->Find("transformer.h.0.attn.c_attn.weight"), nullptr);
  const model::GptConfig& c = (*t)->model().config();
  checkpoint::Gpt2Config g{c.layers, c.heads, c.channels, c.vocab_size, c.max_seq_len};
  auto tensors = checkpoint::FromHfGpt2(*file, g);
  ASSERT_TRUE(tensors.ok()) << tensors.status().ToString();
  const model::Gpt& m = (*t)->model();
  for (const model::ParamTensor& p : m.tensors()) {
    ASSERT_TRUE(tensors->count(p.name)) << p.name;
    const std::vector<float> want(m.params() + p.offset, m.params() + p.offset + p.numel);
    EXPECT_EQ(tensors->at(p.name), want) << p.name;
  }
  // The export initialises a new model (another seed: the file's weights win), and a
  // mismatched shape is refused naming model.init_from.
  proto::JobSpec init = spec;
  init.mutable_checkpoint()->set_dir("");
  init.mutable_train()->set_seed(99);
  init.mutable_model()->set_init_from(out);
  auto fresh = worker::Trainer::Create(init, Quiet());
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  const model::Gpt& fm = (*fresh)->model();
  EXPECT_EQ(std::vector<float>(fm.params(), fm.params() + fm.num_params()),
            std::vector<float>(m.params(), m.params() + m.num_params()));
  init.mutable_model()->set_layers(3);
  auto wrong = worker::Trainer::Create(init, Quiet());
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(wrong.status().message(), "model.init_from");
  // Bad invocations name the problem and exit 2.
  const std::string bad = std::string(STRATA_BINARY_DIR) + "/bin/strata export " + root +
                          " --format onnx -o " + out + " 2> " + dir.path() + "/err";
  EXPECT_EQ(WEXITSTATUS(std::system(bad.c_str())), 2);
  std::ifstream err(dir.path() + "/err");
  const std::string msg((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  EXPECT_HAS(msg, "--format");
}

}  // namespace
}  // namespace strata
