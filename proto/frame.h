// Length-prefixed protobuf frames over TCP sockets (the control plane's wire format, see
// proto/control.proto): a 4-byte little-endian length N (1 <= N <= max), then N bytes of one
// serialized message. Blocking POSIX sockets; the caller owns the descriptors.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/status.h"

namespace google::protobuf {
class MessageLite;
}

namespace strata::wire {

inline constexpr uint32_t kMaxFrameBytes = 16u << 20;

// The bytes of one frame (length prefix + serialized message), for asynchronous writers.
// INTERNAL when the message does not serialize or exceeds kMaxFrameBytes.
Result<std::string> EncodeFrame(const google::protobuf::MessageLite& message);

// OK, or UNAVAILABLE when the peer is gone.
Status WriteFrame(int fd, const google::protobuf::MessageLite& message);
// Waits up to `timeout` (negative: forever) for a frame. DEADLINE_EXCEEDED when none started in
// time (nothing consumed); UNAVAILABLE when the peer closed; INVALID_ARGUMENT for a length out
// of range or bytes that do not parse (the stream is then unusable: close it).
Status ReadFrame(int fd, google::protobuf::MessageLite* message,
                 std::chrono::milliseconds timeout = std::chrono::milliseconds(-1),
                 uint32_t max_bytes = kMaxFrameBytes);

// Listens on "host:port" (port 0 picks one; *port receives it). INVALID_ARGUMENT for a bad
// address, UNAVAILABLE when it cannot bind.
Result<int> Listen(const std::string& host_port, int* port);
// Connects to "host:port" within `timeout`. UNAVAILABLE naming the address otherwise.
Result<int> Connect(const std::string& host_port, std::chrono::milliseconds timeout);
// Splits "host:port"; INVALID_ARGUMENT naming `what` otherwise.
Status SplitHostPort(const std::string& host_port, std::string* host, int* port,
                     const std::string& what);

}  // namespace strata::wire
