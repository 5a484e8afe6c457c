// Built instead of gloo.cc when CMake finds no Gloo (headers + libgloo).
#include "comm/gloo.h"

namespace strata::comm {

Result<std::unique_ptr<ProcessGroup>> MakeGlooGroup(std::shared_ptr<Store>, const std::string&, int,
                                                    int, std::chrono::milliseconds,
                                                    const GlooOptions&) {
  return Unimplemented(
      "gloo: this build of Strata has no Gloo backend (install libgloo-dev "
      "and re-run cmake)");
}

}  // namespace strata::comm
