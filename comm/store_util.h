// Private to comm/: the Store semantics every store shares (MakeHashStore, MakeFileStore, the
// TCP store's server), so that all of them say the same thing.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace strata::comm {

// DEADLINE_EXCEEDED "store: key(s) 'a', 'b' not set after N ms" (at most 8 keys named).
Status StoreKeyTimeout(const std::vector<std::string>& missing, std::chrono::milliseconds timeout);
// The counter an Add finds under `key` (empty: 0); INVALID_ARGUMENT when it is not an integer.
Result<int64_t> ParseStoreCounter(const std::string& key, const std::string& v);

}  // namespace strata::comm
