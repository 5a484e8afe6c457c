#include "coordinator/http_client.h"

#include <fmt/format.h>

#include <cstdlib>
#include <exception>
#include <optional>

#include "coordinator/beast.h"

namespace strata::coordinator {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

constexpr uint64_t kMaxResponseBytes = uint64_t{64} << 20;

}  // namespace

std::string HostPort::ToString() const {
  if (host.find(':') != std::string::npos) return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

Result<HostPort> ParseHostPort(const std::string& text, const std::string& what) {
  auto bad = [&](const std::string& why) {
    return InvalidArgument(
        fmt::format("{}: '{}' {}; use HOST:PORT, e.g. 127.0.0.1:8470", what, text, why));
  };
  HostPort hp;
  std::string port;
  if (!text.empty() && text[0] == '[') {
    const size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("is not [IPV6]:PORT");
    }
    hp.host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos) return bad("has no port");
    hp.host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (hp.host.find(':') != std::string::npos) return bad("is ambiguous (write IPv6 as [ADDR])");
  }
  if (hp.host.empty()) hp.host = "127.0.0.1";
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos) {
    return bad("has no valid port number");
  }
  hp.port = std::atoi(port.c_str());
  if (hp.port > 65535) return bad("has a port above 65535");
  return hp;
}

Result<HttpResponse> HttpCall(const HostPort& server, const HttpRequest& request,
                              std::chrono::milliseconds timeout) {
  try {
    const http::verb verb = http::string_to_verb(request.method);
    if (verb == http::verb::unknown) {
      return InvalidArgument(fmt::format("unknown HTTP method '{}'", request.method));
    }
    net::io_context ioc;
    tcp::resolver resolver(ioc);
    beast::tcp_stream stream(ioc);
    http::request<http::string_body> req{verb, request.target, 11};
    req.set(http::field::host, server.ToString());
    req.set(http::field::user_agent, "strata");
    req.set(http::field::connection, "close");
    if (!request.content_type.empty()) req.set(http::field::content_type, request.content_type);
    for (const auto& [name, value] : request.headers) req.set(name, value);
    req.body() = request.body;
    req.prepare_payload();

    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(kMaxResponseBytes);
    beast::error_code error;
    const char* stage = "resolve";
    const std::string where = server.ToString();
    const auto deadline = std::chrono::steady_clock::now() + timeout;

    auto on_read = [&](beast::error_code ec, size_t) { error = ec; };
    auto on_write = [&](beast::error_code ec, size_t) {
      if (ec) {
        error = ec;
        return;
      }
      stage = "read the response from";
      stream.expires_at(deadline);
      http::async_read(stream, buffer, parser, on_read);
    };
    auto on_connect = [&](beast::error_code ec, const tcp::endpoint&) {
      if (ec) {
        error = ec;
        return;
      }
      stage = "send the request to";
      stream.expires_at(deadline);
      http::async_write(stream, req, on_write);
    };
    resolver.async_resolve(server.host, std::to_string(server.port),
                           [&](beast::error_code ec, tcp::resolver::results_type results) {
                             if (ec) {
                               error = ec;
                               return;
                             }
                             stage = "connect to";
                             stream.expires_at(deadline);
                             stream.async_connect(results, on_connect);
                           });
    // The resolver has no deadline of its own; bound the whole run.
    ioc.run_until(deadline + std::chrono::seconds(1));
    if (!ioc.stopped()) {
      return DeadlineExceeded(
          fmt::format("no answer from {} within {} ms", where, timeout.count()));
    }
    if (error == beast::error::timeout) {
      return DeadlineExceeded(
          fmt::format("could not {} {} within {} ms", stage, where, timeout.count()));
    }
    if (error) {
      const std::string msg = fmt::format("cannot {} {}: {}", stage, where, error.message());
      if (std::string(stage) == "resolve" || std::string(stage) == "connect to") {
        return Status(StatusCode::kUnavailable, msg);
      }
      return IoError(msg);
    }
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    HttpResponse out;
    http::response<http::string_body> res = parser.release();
    out.status = static_cast<int>(res.result_int());
    out.content_type = std::string(res[http::field::content_type]);
    out.body = std::move(res.body());
    return out;
  } catch (const std::exception& e) {
    return IoError(fmt::format("HTTP call to {} failed: {}", server.ToString(), e.what()));
  }
}

}  // namespace strata::coordinator
