// The expert data plane's wire format (expert-server/README.md, "Data plane"): fixed-size
// little-endian headers and raw little-endian tensors, no protobuf. Shared by the server
// (data_plane_server.h) and the client (client/expert_links.h); header-only, so the client
// library does not link the server's.
//
//   hello        client -> server  HelloHeader
//   hello reply  server -> client  HelloReplyHeader, then message_bytes of text (an error)
//   request      client -> server  RequestHeader, then payload_bytes:
//                                    hidden [num_tokens, H] f32, token u32[n], expert u32[n],
//                                    weight f32[n]   (n = num_assignments)
//   reply        server -> client  ReplyHeader, then payload_bytes: output [num_tokens, H] f32
//                                    when status is 0 (OK), else the error message (text)
//
// Everything here is pure (no I/O): the parsers are what the fuzz target drives.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dsmoe::data_plane {

static_assert(std::endian::native == std::endian::little,
              "the data plane sends host floats as little-endian bytes");

inline constexpr uint32_t kHelloMagic = 0x4C45'4844;    // "DHEL"
inline constexpr uint32_t kRequestMagic = 0x5145'5244;  // "DREQ"
inline constexpr uint32_t kReplyMagic = 0x5045'5244;    // "DREP"
inline constexpr uint32_t kVersion = 1;
// Error texts in replies are cut to this many bytes (the client refuses longer ones).
inline constexpr uint32_t kMaxMessageBytes = 4096;

struct HelloHeader {
  uint32_t magic = kHelloMagic;
  uint32_t version = kVersion;
  uint32_t hidden_size = 0;  // the client's; the server refuses another
  uint32_t reserved = 0;
};
static_assert(sizeof(HelloHeader) == 16);

struct HelloReplyHeader {
  uint32_t magic = kHelloMagic;
  uint32_t version = kVersion;
  uint32_t status = 0;       // absl/gRPC code; not 0: the message says why, then the server closes
  uint32_t hidden_size = 0;  // the server's
  uint32_t max_tokens = 0;   // per request, at most
  uint32_t max_assignments = 0;
  uint32_t message_bytes = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(HelloReplyHeader) == 32);

struct RequestHeader {
  uint32_t magic = kRequestMagic;
  uint32_t layer = 0;
  uint32_t num_tokens = 0;
  uint32_t num_assignments = 0;
  uint64_t payload_bytes = 0;  // must equal PayloadBytes(num_tokens, num_assignments, H)
};
static_assert(sizeof(RequestHeader) == 24);

// ReplyHeader.flags: the server closes the connection after this reply (the request's header
// was malformed, so the rest of the stream cannot be trusted).
inline constexpr uint16_t kReplyCloses = 1;

struct ReplyHeader {
  uint32_t magic = kReplyMagic;
  uint16_t status = 0;  // absl/gRPC code
  uint16_t flags = 0;   // kReplyCloses
  double compute_seconds = 0;
  uint64_t payload_bytes = 0;
};
static_assert(sizeof(ReplyHeader) == 24);

// TLS 1.3 cipher suites of both sides, AES-128-GCM first: every byte of every call is
// encrypted, and it is the fastest of the three with AES-NI (OpenSSL's default puts AES-256
// first).
inline constexpr char kTls13CipherSuites[] =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

// What a server accepts per request.
struct Limits {
  uint32_t hidden_size = 0;
  uint32_t max_tokens = 0;
  uint32_t max_assignments = 0;
};

inline uint64_t RequestPayloadBytes(uint64_t num_tokens, uint64_t num_assignments, uint64_t H) {
  return num_tokens * H * sizeof(float) + num_assignments * 3 * sizeof(uint32_t);
}

template <typename Header>
Header ReadHeader(const void* bytes) {
  Header h;
  std::memcpy(&h, bytes, sizeof(h));
  return h;
}

// Checks a client's hello against the server's limits.
inline absl::Status CheckHello(const HelloHeader& h, const Limits& limits) {
  if (h.magic != kHelloMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad hello magic 0x", absl::Hex(h.magic), ": not a dsmoe data-plane client"));
  }
  if (h.version != kVersion) {
    return absl::FailedPreconditionError(absl::StrCat("data-plane protocol version ", h.version,
                                                      " not supported (this server speaks ",
                                                      kVersion, ")"));
  }
  if (h.hidden_size != limits.hidden_size) {
    return absl::FailedPreconditionError(absl::StrCat("client hidden size ", h.hidden_size,
                                                      " but this server's model has ",
                                                      limits.hidden_size));
  }
  return absl::OkStatus();
}

// Checks a request header before its payload is read. An error means the stream cannot be
// trusted any more (the server replies with it and closes the connection): a bad magic, a
// length over the limits, or a payload length that does not match the counts.
inline absl::Status CheckRequestHeader(const RequestHeader& h, const Limits& limits) {
  if (h.magic != kRequestMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad request magic 0x", absl::Hex(h.magic), " (expected 0x",
                     absl::Hex(kRequestMagic), "): the stream is out of step"));
  }
  if (h.num_tokens > limits.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(h.num_tokens,
                                                     " tokens exceed this server's limit of ",
                                                     limits.max_tokens, " per request"));
  }
  if (h.num_assignments > limits.max_assignments) {
    return absl::ResourceExhaustedError(absl::StrCat(h.num_assignments,
                                                     " assignments exceed this server's limit of ",
                                                     limits.max_assignments, " per request"));
  }
  const uint64_t want = RequestPayloadBytes(h.num_tokens, h.num_assignments, limits.hidden_size);
  if (h.payload_bytes != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request payload of ", h.payload_bytes, " bytes; ", h.num_tokens, " tokens of hidden size ",
        limits.hidden_size, " and ", h.num_assignments, " assignments need ", want));
  }
  return absl::OkStatus();
}

// Checks a reply header against the call it answers (client side).
inline absl::Status CheckReplyHeader(const ReplyHeader& h, uint64_t output_bytes) {
  if (h.magic != kReplyMagic) {
    return absl::InternalError(
        absl::StrCat("bad reply magic 0x", absl::Hex(h.magic), ": the stream is out of step"));
  }
  if (h.status > 16) return absl::InternalError(absl::StrCat("bad reply status ", h.status));
  if (h.status == 0 && h.payload_bytes != output_bytes) {
    return absl::InternalError(absl::StrCat("reply of ", h.payload_bytes, " bytes; expected ",
                                            output_bytes));
  }
  if (h.status != 0 && h.payload_bytes > kMaxMessageBytes) {
    return absl::InternalError(absl::StrCat("error message of ", h.payload_bytes, " bytes"));
  }
  return absl::OkStatus();
}

// The request payload viewed in place (`payload` 4-byte aligned, RequestPayloadBytes long).
struct RequestView {
  const float* hidden;  // [num_tokens, H]
  const uint32_t* token;
  const uint32_t* expert;
  const float* weight;
};

inline RequestView ViewPayload(const RequestHeader& h, const void* payload, uint64_t H) {
  const auto* p = static_cast<const unsigned char*>(payload);
  const uint64_t n = h.num_assignments, hidden_bytes = uint64_t{h.num_tokens} * H * sizeof(float);
  RequestView v;
  v.hidden = reinterpret_cast<const float*>(p);
  v.token = reinterpret_cast<const uint32_t*>(p + hidden_bytes);
  v.expert = v.token + n;
  v.weight = reinterpret_cast<const float*>(v.expert + n);
  return v;
}

}  // namespace dsmoe::data_plane
