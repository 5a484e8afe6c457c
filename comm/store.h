// Store: the key-value rendezvous through which Gloo groups (and later NCCL ids) are formed.
// The coordinator implements the same interface over its control plane (daemon mode); tests
// and single-host runs use the two implementations here.
//
// Keys are arbitrary strings, values arbitrary bytes. Keys are never deleted: re-forming a
// group after a failure uses a new prefix (e.g. the job's generation number).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace strata::comm {

class Store {
 public:
  virtual ~Store() = default;

  // Sets (or overwrites) key. IO_ERROR/UNAVAILABLE if the store cannot be written.
  [[nodiscard]] virtual Status Set(const std::string& key, const std::string& value) = 0;
  // The value of key, waiting up to `timeout` for it to be set; DEADLINE_EXCEEDED
  // ("store: key 'k' not set after <ms> ms") if it is not.
  [[nodiscard]] virtual Result<std::string> Get(const std::string& key,
                                                std::chrono::milliseconds timeout) = 0;
  // Waits until every key is set; DEADLINE_EXCEEDED naming the missing keys otherwise.
  [[nodiscard]] virtual Status Wait(const std::vector<std::string>& keys,
                                    std::chrono::milliseconds timeout) = 0;
  // Atomically adds delta to the integer stored at key (absent = 0) and returns the new value.
  // The value is stored as decimal text, so Get returns e.g. "3".
  [[nodiscard]] virtual Result<int64_t> Add(const std::string& key, int64_t delta) = 0;
};

// In memory, for ranks that are threads of one process. Thread-safe.
std::shared_ptr<Store> MakeHashStore();

// One file per key under `dir` (created if missing), for processes on one host or a shared
// filesystem. Set writes a temporary file and renames it (readers never see half a value);
// Add takes an flock on a lock file. Get/Wait poll every few milliseconds.
// IO_ERROR if the directory cannot be created.
Result<std::shared_ptr<Store>> MakeFileStore(const std::string& dir);

}  // namespace strata::comm
