// Content checksums of checkpoint shards: XXH3-64 (libxxhash), ~10x faster than the disk, so a
// checksum never limits save or restore throughput.
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata::checkpoint {

uint64_t Checksum(const void* data, size_t bytes);

// Incremental form: feeding the bytes in any split gives Checksum() of their concatenation.
class Checksummer {
 public:
  Checksummer();
  ~Checksummer();
  Checksummer(const Checksummer&) = delete;
  Checksummer& operator=(const Checksummer&) = delete;
  void Update(const void* data, size_t bytes);
  uint64_t Digest() const;

 private:
  void* state_;  // XXH3_state_t
};

}  // namespace strata::checkpoint
