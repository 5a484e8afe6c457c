// Checkpoint save/restore throughput against `dd` on the same disk, in the same run.
//
//   build/bin/checkpoint_bench [--dir DIR] [--preset gpt2] [--ranks-save 2] [--repeats 2]
//
// The state is a GPT-2 124M's parameters + AdamW moments (fp32; ~1.5 GB), split row-wise over
// --ranks-save writers (each a RocksDB instance, written one after the other in this process).
// Save = ShardWriter Add/Finish for every rank + commit (synced); compared with
// `dd if=/dev/zero bs=8M count=N conv=fdatasync` writing the same bytes. Restore = reading every
// tensor back through CheckpointReader (checksums verified) with the page cache dropped for the
// files first (posix_fadvise DONTNEED after fsync), compared with `dd of=/dev/null` of dd's file
// under the same cache drop. Reshard restore reads the same checkpoint onto other splits
// (1 and 4 row shards, and column shards) to time the resharding path against the same layout.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/hf_gpt2.h"
#include "checkpoint/store.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace ck = strata::checkpoint;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Drops every file under `dir` from the page cache (they are synced already).
void DropCache(const std::string& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

double RunShell(const std::string& cmd) {
  const auto t0 = Clock::now();
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "command failed: %s\n", cmd.c_str());
    std::exit(1);
  }
  return Since(t0);
}

strata::proto::ShardLayout Rows(const std::vector<int64_t>& shape, int part, int parts, int dim) {
  strata::proto::ShardLayout l;
  for (int64_t d : shape) l.add_global_shape(d);
  int64_t n = 1;
  if (parts == 1 || static_cast<int>(shape.size()) <= dim) {
    for (int64_t d : shape) l.add_local_shape(d), n *= d;
    l.set_shard_dim(-1);
    l.set_shard_blocks(1);
  } else {
    const int64_t per = (shape[dim] + parts - 1) / parts;
    const int64_t off = std::min<int64_t>(shape[dim], per * part);
    const int64_t ext = std::min<int64_t>(shape[dim], off + per) - off;
    for (size_t i = 0; i < shape.size(); ++i) {
      const int64_t d = static_cast<int>(i) == dim ? per : shape[i];
      l.add_local_shape(d);
      n *= d;
    }
    l.set_shard_dim(dim);
    l.set_shard_blocks(1);
    l.set_shard_offset(off);
    l.set_shard_extent(ext);
  }
  l.set_begin(0);
  l.set_end(n);
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/strata_ckpt_bench", preset = "gpt2";
  int ranks = 2, repeats = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--dir")
      dir = v;
    else if (f == "--preset")
      preset = v;
    else if (f == "--ranks-save")
      ranks = std::atoi(v.c_str());
    else if (f == "--repeats")
      repeats = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      return 2;
    }
  }
  ck::Gpt2Config cfg{12, 12, 768, 50257, 1024};
  if (preset == "small") cfg = {4, 4, 256, 50257, 256};
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto storage = ck::DefaultStorage();

  // The state: params, adam_m, adam_v of every tensor, as each save rank's row shard.
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
  };
  std::vector<Tensor> tensors;
  int64_t elements = 0;
  for (const auto& [name, shape] : ck::Gpt2TensorShapes(cfg)) {
    for (const char* kind : {"param/", "adam_m/", "adam_v/"}) {
      tensors.push_back({kind + name, shape});
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      elements += n;
    }
  }
  const double gb = elements * 4 / 1e9;
  std::vector<std::vector<std::vector<float>>> data(ranks);  // [rank][tensor]
  for (int r = 0; r < ranks; ++r) {
    for (const Tensor& t : tensors) {
      const auto l = Rows(t.shape, r, ranks, 0);
      std::vector<float> v(static_cast<size_t>(l.end()));
      // Rows past the shard's extent are padding: 0, as in a model.
      const int64_t real =
          l.shard_dim() < 0 ? l.end() : l.end() / l.local_shape(0) * l.shard_extent();
      for (int64_t i = 0; i < real; ++i)
        v[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;
      data[r].push_back(std::move(v));
    }
  }
  std::printf(
      "checkpoint_bench: %s state %.2f GB (%zu tensors incl. AdamW moments), %d save ranks, "
      "dir %s\n\n",
      preset.c_str(), gb, tensors.size(), ranks, dir.c_str());
  std::printf("%-34s %9s %9s %9s\n", "operation", "seconds", "GB/s", "vs dd");

  const std::string ddfile = dir + "/dd.bin";
  const int64_t count = (elements * 4 + (8 << 20) - 1) / (8 << 20);
  double best_save = 1e30, best_dd_w = 1e30, best_restore = 1e30, best_dd_r = 1e30;
  const std::string root = dir + "/ckpt";
  for (int rep = 0; rep < repeats; ++rep) {
    std::filesystem::remove_all(root);
    std::filesystem::remove(ddfile);
    RunShell("sync");
    auto t0 = Clock::now();
    for (int r = 0; r < ranks; ++r) {
      auto w = ck::ShardWriter::Create(storage, root, 1, r);
      if (!w.ok()) return std::fprintf(stderr, "%s\n", w.status().ToString().c_str()), 1;
      for (size_t i = 0; i < tensors.size(); ++i) {
        strata::Status s =
            (*w)->Add({tensors[i].name, Rows(tensors[i].shape, r, ranks, 0), data[r][i].data()});
        if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
      }
      strata::Status s = (*w)->Finish();
      if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    }
    strata::proto::Manifest m;
    m.set_step(1);
    strata::Status s = ck::CommitWhenDurable(storage, root, m, ranks, std::chrono::seconds(60));
    if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    best_save = std::min(best_save, Since(t0));
    best_dd_w = std::min(
        best_dd_w,
        RunShell(fmt::format("dd if=/dev/zero of={} bs=8M count={} conv=fdatasync status=none",
                             ddfile, count)));

    // Restore on the same layout: every rank's shards, checksums verified.
    DropCache(dir);
    t0 = Clock::now();
    auto man = ck::ReadManifest(*storage, root, 1);
    auto reader = ck::CheckpointReader::Open(storage, root, *man);
    if (!reader.ok()) return std::fprintf(stderr, "%s\n", reader.status().ToString().c_str()), 1;
    std::vector<std::vector<std::vector<float>>> got(ranks);
    std::vector<ck::CheckpointReader::ReadRequest> reads;
    for (int r = 0; r < ranks; ++r) {
      got[r].resize(tensors.size());
      for (size_t i = 0; i < tensors.size(); ++i) {
        const auto l = Rows(tensors[i].shape, r, ranks, 0);
        got[r][i].resize(static_cast<size_t>(l.end()));
        reads.push_back({tensors[i].name, l, got[r][i].data()});
      }
    }
    strata::Status rs = (*reader)->ReadMany(reads);
    if (!rs.ok()) return std::fprintf(stderr, "%s\n", rs.ToString().c_str()), 1;
    best_restore = std::min(best_restore, Since(t0));
    if (got != data) return std::fprintf(stderr, "restore mismatch\n"), 1;
    DropCache(dir);
    best_dd_r = std::min(best_dd_r,
                         RunShell(fmt::format("dd if={} of=/dev/null bs=8M status=none", ddfile)));
  }
  std::printf("%-34s %9.2f %9.2f %9.2f\n", "save (shards + commit, synced)", best_save,
              gb / best_save, best_dd_w / best_save);
  std::printf("%-34s %9.2f %9.2f %9s\n", "dd write conv=fdatasync", best_dd_w, gb / best_dd_w,
              "1.00");
  std::printf("%-34s %9.2f %9.2f %9.2f\n", "restore same layout (verified)", best_restore,
              gb / best_restore, best_dd_r / best_restore);
  std::printf("%-34s %9.2f %9.2f %9s\n", "dd read", best_dd_r, gb / best_dd_r, "1.00");

  // Resharded restores: other splits of the same checkpoint.
  struct Split {
    const char* what;
    int parts, dim;
  };
  for (const Split& sp :
       {Split{"restore as 1 shard (unsharded)", 1, 0}, Split{"restore as 4 row shards", 4, 0},
        Split{"restore as 4 column shards", 4, 1}}) {
    DropCache(dir);
    const auto t0 = Clock::now();
    auto man = ck::ReadManifest(*storage, root, 1);
    auto reader = ck::CheckpointReader::Open(storage, root, *man);
    std::vector<std::vector<float>> bufs;
    std::vector<ck::CheckpointReader::ReadRequest> reads;
    for (int p = 0; p < sp.parts; ++p) {
      for (const Tensor& t : tensors) {
        const auto l = Rows(t.shape, p, sp.parts, sp.dim);
        bufs.emplace_back(static_cast<size_t>(l.end()));
        reads.push_back({t.name, l, bufs.back().data()});
      }
    }
    strata::Status rs = (*reader)->ReadMany(reads);
    if (!rs.ok()) return std::fprintf(stderr, "%s\n", rs.ToString().c_str()), 1;
    const double secs = Since(t0);
    std::printf("%-34s %9.2f %9.2f %8.2fx same-layout time\n", sp.what, secs, gb / secs,
                secs / best_restore);
  }
  std::filesystem::remove_all(dir);
  return 0;
}
