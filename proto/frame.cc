#include "proto/frame.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <google/protobuf/message_lite.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace strata::wire {
namespace {

Status WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      return Status(StatusCode::kUnavailable, std::string("send: ") + std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) return Status(StatusCode::kUnavailable, "connection closed by peer");
    if (r < 0)
      return Status(StatusCode::kUnavailable, std::string("recv: ") + std::strerror(errno));
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

}  // namespace

Status SplitHostPort(const std::string& host_port, std::string* host, int* port,
                     const std::string& what) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == host_port.size()) {
    return InvalidArgument(fmt::format("{}: '{}' is not HOST:PORT", what, host_port));
  }
  char* end = nullptr;
  const long p = std::strtol(host_port.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || p < 0 || p > 65535) {
    return InvalidArgument(fmt::format("{}: bad port in '{}'", what, host_port));
  }
  *host = host_port.substr(0, colon);
  *port = static_cast<int>(p);
  return Status::Ok();
}

Result<std::string> EncodeFrame(const google::protobuf::MessageLite& message) {
  std::string frame(4, '\0');
  if (!message.AppendToString(&frame) || frame.size() - 4 > kMaxFrameBytes) {
    return Internal("frame too large or not serializable");
  }
  const uint32_t n = static_cast<uint32_t>(frame.size() - 4);
  frame[0] = static_cast<char>(n & 0xff);
  frame[1] = static_cast<char>((n >> 8) & 0xff);
  frame[2] = static_cast<char>((n >> 16) & 0xff);
  frame[3] = static_cast<char>(n >> 24);
  return frame;
}

Status WriteFrame(int fd, const google::protobuf::MessageLite& message) {
  ASSIGN_OR_RETURN(std::string frame, EncodeFrame(message));
  return WriteAll(fd, frame.data(), frame.size());
}

Status ReadFrame(int fd, google::protobuf::MessageLite* message, std::chrono::milliseconds timeout,
                 uint32_t max_bytes) {
  if (timeout.count() >= 0) {
    pollfd p{fd, POLLIN, 0};
    int r;
    do {
      r = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (r < 0 && errno == EINTR);
    if (r == 0) return DeadlineExceeded("no frame within the timeout");
    if (r < 0)
      return Status(StatusCode::kUnavailable, std::string("poll: ") + std::strerror(errno));
  }
  unsigned char len[4];
  RETURN_IF_ERROR(ReadAll(fd, reinterpret_cast<char*>(len), 4));
  const uint32_t n =
      len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  if (n == 0 || n > max_bytes) {
    return InvalidArgument(fmt::format("frame length {} outside [1, {}]", n, max_bytes));
  }
  std::vector<char> body(n);
  RETURN_IF_ERROR(ReadAll(fd, body.data(), n));
  if (!message->ParseFromArray(body.data(), static_cast<int>(n))) {
    return InvalidArgument("frame does not parse");
  }
  return Status::Ok();
}

Result<int> Listen(const std::string& host_port, int* port) {
  std::string host;
  int p = 0;
  RETURN_IF_ERROR(SplitHostPort(host_port, &host, &p, "listen address"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(p));
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    return InvalidArgument(fmt::format("listen address: '{}' is not an IPv4 address", host));
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status(StatusCode::kUnavailable, std::strerror(errno));
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 128) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    return Status(StatusCode::kUnavailable, fmt::format("cannot listen on {}: {}", host_port, err));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (port != nullptr) *port = ntohs(addr.sin_port);
  return fd;
}

Result<int> Connect(const std::string& host_port, std::chrono::milliseconds timeout) {
  std::string host;
  int p = 0;
  RETURN_IF_ERROR(SplitHostPort(host_port, &host, &p, "address"));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(p).c_str(), &hints, &res) != 0 || res == nullptr) {
    return Status(StatusCode::kUnavailable, fmt::format("cannot resolve {}", host_port));
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ::freeaddrinfo(res);
    return Status(StatusCode::kUnavailable, std::strerror(errno));
  }
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  const int rc = ::connect(fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (rc != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    return Status(StatusCode::kUnavailable,
                  fmt::format("cannot connect to {}: {}", host_port, err));
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval zero{0, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof(zero));
  return fd;
}

}  // namespace strata::wire
