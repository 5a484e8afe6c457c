// Training data: a UTF-8 text file (byte tokenizer, vocab 256) or llm.c token shards
// (.bin: 256 x int32 header {20240520, version 1, token count, ...} then uint16 tokens).
//
// A sample is seq_len+1 consecutive tokens (inputs = first seq_len, targets = shifted by one).
// Sample k of a split starts at token k*seq_len, so a split of N tokens has
// (N-1)/seq_len samples. The training order is a pure function of (seed, epoch, index): global
// sample g is sample Permute(seed, g / S, g % S) of the epoch, S = samples per epoch. A resumed or
// re-planned run that knows g therefore continues with exactly the samples it would have seen.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/job.pb.h"

namespace strata::worker {

// A bijection on [0, n) chosen by (seed, epoch); a keyed Feistel network with cycle walking.
// Requires n > 0 and index < n.
uint64_t PermuteIndex(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t n);

class Dataset {
 public:
  // Loads the files named by `data` (already validated and defaulted). Tokens >= vocab_size are an
  // error naming the file and position. Fails when a split has fewer than seq_len+1 tokens.
  static Result<Dataset> Open(const proto::DataSpec& data, int vocab_size, int seq_len);

  int seq_len() const { return seq_len_; }
  int64_t train_tokens() const { return static_cast<int64_t>(train_.size()); }
  int64_t val_tokens() const { return static_cast<int64_t>(val_.size()); }
  int64_t train_samples() const;  // per epoch
  int64_t val_samples() const;

  // Writes `count` samples of training order starting at global sample `first`:
  // inputs[i*seq_len + t] and targets[i*seq_len + t], i in [0, count).
  void TrainBatch(uint64_t seed, int64_t first, int count, int32_t* inputs, int32_t* targets) const;
  // Validation samples in file order, index taken modulo val_samples().
  void ValBatch(int64_t first, int count, int32_t* inputs, int32_t* targets) const;

 private:
  int seq_len_ = 0;
  std::vector<uint16_t> train_;
  std::vector<uint16_t> val_;
};

// Writes tokens as an llm.c .bin shard (used by tests and data preparation tools).
Status WriteLlmcShard(const std::string& path, const std::vector<uint16_t>& tokens);

}  // namespace strata::worker
