// A small blocking HTTP/1.1 client (Boost.Beast inside; no Boost types here) for talking to the
// coordinator's API: one connection per call, a deadline for the whole exchange.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace strata::coordinator {

struct HostPort {
  std::string host;  // a name or an IP literal (without brackets)
  int port = 0;
  std::string ToString() const;  // "host:port", "[::1]:port"
};

// Parses "HOST:PORT", "[V6]:PORT" or ":PORT" (host 127.0.0.1). `what` names the input in
// errors ("--listen"): INVALID_ARGUMENT "--listen: 'x' is not HOST:PORT; e.g. 127.0.0.1:8470".
// Port 0 is allowed (an ephemeral port for servers).
Result<HostPort> ParseHostPort(const std::string& text, const std::string& what);

struct HttpRequest {
  std::string method = "GET";  // GET, POST, ...
  std::string target = "/";    // path and query
  std::string body;
  std::string content_type;  // set when non-empty
  std::vector<std::pair<std::string, std::string>> headers;
};

struct HttpResponse {
  int status = 0;
  std::string content_type;
  std::string body;
};

// Sends `request` to `server` and reads the whole response (at most 64 MiB). Any HTTP status is
// a successful exchange. Errors: UNAVAILABLE when the server cannot be reached ("cannot connect
// to 127.0.0.1:8470: Connection refused"), DEADLINE_EXCEEDED past `timeout`, IO_ERROR for a
// broken exchange. Never throws.
Result<HttpResponse> HttpCall(const HostPort& server, const HttpRequest& request,
                              std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace strata::coordinator
