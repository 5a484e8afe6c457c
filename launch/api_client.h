// `strata submit|jobs|status|logs|cancel`: the CLI side of the coordinator's HTTP API
// (coordinator/api_server.h).
//
// Every command takes --coordinator HOST:PORT (else env STRATA_COORDINATOR, else
// 127.0.0.1:8470) and --token-file FILE (else env STRATA_TOKEN holding the token itself).
// Exit codes as the rest of the CLI: 0 success, 1 the coordinator cannot be reached or failed
// (5xx), 2 bad input (usage, job spec, unknown job, a refused token: 4xx).
#pragma once

#include <string>
#include <vector>

namespace strata::launch {

// Lines for `strata help`, one command each.
extern const char kApiUsage[];

// submit JOB.yaml [--client-key KEY]: reads the spec, resolves its relative paths against the
// job file's directory, sends it; prints the job id.
int SubmitCommand(const std::vector<std::string>& args);
// jobs [--state S] [--json]: one line per job.
int JobsCommand(const std::vector<std::string>& args);
// status ID [--json]: state, layout, progress, last error and the spec.
int StatusCommand(const std::vector<std::string>& args);
// logs ID [-f|--follow] [--offset N]: the job's log; -f waits for new lines until it ends.
int LogsCommand(const std::vector<std::string>& args);
// cancel ID
int CancelCommand(const std::vector<std::string>& args);
// workers [--json]: the registered workers.
int WorkersCommand(const std::vector<std::string>& args);

}  // namespace strata::launch
