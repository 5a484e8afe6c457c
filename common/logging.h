// Logging: spdlog with one format for every Strata process.
#pragma once

#include <spdlog/spdlog.h>

namespace strata {

// Sets the default logger's pattern and level ("trace".."off"). Safe to call more than once.
void InitLogging(const char* level = "info");

}  // namespace strata
