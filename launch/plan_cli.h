// `strata plan JOB.yaml`: the planner's layout for a job on N workers of one device kind
// (coordinator/planner.h). Exit codes as the rest of the CLI: 0 a plan was printed, 1 a
// runtime failure, 2 bad input (flag, job spec) or a model that fits on no layout.
#pragma once

#include <string>
#include <vector>

namespace strata::launch {

// args: everything after `plan`.
int PlanCommand(const std::vector<std::string>& args);

}  // namespace strata::launch
