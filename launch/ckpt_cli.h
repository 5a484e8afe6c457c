// `strata ckpt ls|verify` and `strata export`: inspecting and exporting checkpoints. Exit codes
// as the rest of the CLI: 0 success, 1 a failed check or runtime failure, 2 bad input.
#pragma once

#include <string>
#include <vector>

namespace strata::launch {

int CkptCommand(const std::vector<std::string>& args);
int ExportCommand(const std::vector<std::string>& args);

}  // namespace strata::launch
