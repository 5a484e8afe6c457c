// Job-spec loading: YAML text -> strata.proto.JobSpec, preset expansion, defaults, validation.
//
// Every error is INVALID_ARGUMENT (or NOT_FOUND for a missing file) and its message starts with
// the dotted field path, then says what is wrong and how to fix it, e.g.
//   "model.heads: 5 does not divide model.d_model=128; choose heads in {1, 2, 4, 8, ...}".
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "proto/job.pb.h"

namespace strata::spec {

// Parses YAML into a JobSpec by the message's field names. Unknown keys, wrong types
// (a string where a number belongs, a list where a map belongs) and malformed YAML are errors.
// For integer fields of `parallel`, the word `auto` means 0. A null value (`key:` or `key: ~`)
// leaves the field unset. `source` names the input in messages.
Result<proto::JobSpec> ParseYaml(const std::string& yaml_text, const std::string& source);

// Expands model.preset and fills every unset field with its documented default. Idempotent.
// Unknown presets are left for Validate to report.
void ApplyDefaults(proto::JobSpec* spec);

// Checks a defaulted spec. Does not touch the file system.
Status Validate(const proto::JobSpec& spec);

// Checks that data.train (and data.val when set) match at least one readable file.
Status ValidateDataFiles(const proto::JobSpec& spec);

// Expands a data path or glob (glob(3)) into the files it names, sorted by path. Every match must
// be a readable regular file after following symlinks. `field` (e.g. "data.train") starts every
// message. NOT_FOUND when nothing matches; INVALID_ARGUMENT for a match that is a directory or
// unreadable. Shared by ValidateDataFiles and worker::Dataset so both see the same file list.
Result<std::vector<std::string>> MatchDataFiles(const std::string& field,
                                                const std::string& pattern);

// Reads `path`, parses, applies defaults, validates (including data files).
// Relative data paths are resolved against the directory of `path` and stored back as absolute.
Result<proto::JobSpec> LoadJobFile(const std::string& path);

// The spec as YAML, every field (for logs and `strata status`).
std::string ToYaml(const proto::JobSpec& spec);

}  // namespace strata::spec
