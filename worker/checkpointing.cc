#include "worker/checkpointing.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstring>

namespace strata::worker {

proto::ShardLayout LayoutOf(const model::ParamTensor& t, int64_t begin, int64_t end) {
  proto::ShardLayout l;
  for (int64_t d : t.global_shape) l.add_global_shape(d);
  for (int64_t d : t.shape) l.add_local_shape(d);
  l.set_shard_dim(t.shard_dim);
  l.set_shard_blocks(t.shard_blocks);
  l.set_shard_offset(t.shard_offset);
  l.set_shard_extent(t.shard_extent);
  l.set_begin(begin);
  l.set_end(end);
  return l;
}

CheckpointSaver::CheckpointSaver(SaverOptions options) : options_(std::move(options)) {
  if (!options_.storage) options_.storage = checkpoint::DefaultStorage();
}

CheckpointSaver::~CheckpointSaver() {
  cancel_.store(true);
  if (thread_.joinable()) thread_.join();
}

void CheckpointSaver::Reserve(size_t floats) {
  if (options_.async && staging_.size() < floats) staging_.assign(floats, 0.f);
}

Status CheckpointSaver::TakeResult() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!unreported_) return Status::Ok();
  unreported_ = false;
  return result_;
}

Status CheckpointSaver::Wait() {
  if (thread_.joinable()) thread_.join();
  return TakeResult();
}

Status CheckpointSaver::Poll() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done_) return Status::Ok();
  }
  if (thread_.joinable()) thread_.join();
  return TakeResult();
}

int64_t CheckpointSaver::last_committed_step() const {
  std::lock_guard<std::mutex> lock(mu_);
  return committed_;
}

void CheckpointSaver::Run(proto::Manifest manifest, std::vector<SaveItem> items) {
  const int64_t step = manifest.step();
  const auto t0 = std::chrono::steady_clock::now();
  int64_t bytes = 0;
  Status s = [&]() -> Status {
    ASSIGN_OR_RETURN(
        std::unique_ptr<checkpoint::ShardWriter> w,
        checkpoint::ShardWriter::Create(options_.storage, options_.root, step, options_.rank,
                                        checkpoint::kDefaultChunkBytes, options_.tag));
    for (const SaveItem& it : items) {
      RETURN_IF_ERROR(w->Add({it.tensor, it.layout, it.data}));
    }
    bytes = w->bytes();
    return w->Finish();
  }();
  if (!s.ok()) {
    checkpoint::ReportSaveFailed(*options_.storage, options_.root, step, options_.rank, s,
                                 options_.tag);
    s = Status(s.code(), fmt::format("checkpoint step {}: rank {} could not write its shards: {}",
                                     step, options_.rank, s.message()));
  }
  const double write_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (options_.on_written) options_.on_written(manifest, s);
  if (s.ok() && options_.commit) {
    s = checkpoint::CommitWhenDurable(options_.storage, options_.root, manifest, options_.world,
                                      options_.commit_timeout, &cancel_, options_.tag,
                                      options_.fence);
    if (s.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        committed_ = step;
      }
      spdlog::info("checkpoint step {} committed ({:.1f} MB from rank {} written in {:.2f} s)",
                   step, bytes / 1e6, options_.rank, write_s);
      Result<int> gc =
          checkpoint::CollectGarbage(*options_.storage, options_.root, options_.retention, step);
      if (!gc.ok()) spdlog::warn("checkpoint retention: {}", gc.status().ToString());
    }
  }
  if (!s.ok()) {
    spdlog::error("{}; committed checkpoints are intact", s.ToString());
  }
  std::lock_guard<std::mutex> lock(mu_);
  done_ = true;
  result_ = s;
  unreported_ = !s.ok();
}

Status CheckpointSaver::Save(const proto::Manifest& manifest, const std::vector<SaveItem>& items,
                             double* stall_seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  Status previous = Wait();
  std::vector<SaveItem> own = items;
  if (options_.async) {
    size_t total = 0;
    for (const SaveItem& it : items) {
      total += static_cast<size_t>(it.layout.end() - it.layout.begin());
    }
    if (staging_.size() < total) staging_.resize(total);
    size_t at = 0;
    for (SaveItem& it : own) {
      const size_t n = static_cast<size_t>(it.layout.end() - it.layout.begin());
      if (n > 0) std::memcpy(staging_.data() + at, it.data, n * sizeof(float));
      it.data = staging_.data() + at;
      at += n;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = false;
  }
  cancel_.store(false);
  if (options_.async) {
    thread_ = std::thread(&CheckpointSaver::Run, this, manifest, std::move(own));
  } else {
    Run(manifest, std::move(own));
  }
  if (stall_seconds != nullptr) {
    *stall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (!previous.ok()) return previous;
  return options_.async ? Status::Ok() : TakeResult();
}

}  // namespace strata::worker
