#include "checkpoint/checksum.h"

#include <xxhash.h>

#include "common/status.h"

namespace strata::checkpoint {

uint64_t Checksum(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

Checksummer::Checksummer() : state_(XXH3_createState()) {
  CHECK(state_ != nullptr);
  CHECK(XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_)) == XXH_OK);
}

Checksummer::~Checksummer() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void Checksummer::Update(const void* data, size_t bytes) {
  CHECK(XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, bytes) == XXH_OK);
}

uint64_t Checksummer::Digest() const {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
}

}  // namespace strata::checkpoint
