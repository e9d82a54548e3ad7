// Fuzz target: the expert data plane's frame parsing (expert-server/data_plane_frame.h), as the
// server meets it: a hello, then request frames back to back, each header checked against the
// server's limits before its payload is viewed in place. The first byte picks the limits. A
// header that passes must describe a payload the server can hold and view without reading out
// of bounds; one that fails must carry a gRPC code the client maps back.
#include <cstdint>
#include <cstring>
#include <vector>

#include "expert-server/data_plane_frame.h"
#include "tests/fuzz/fuzz_check.h"

namespace dp = dsmoe::data_plane;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 + sizeof(dp::HelloHeader)) return 0;
  const dp::Limits limits = (data[0] & 1) != 0 ? dp::Limits{64, 16, 96} : dp::Limits{8, 4, 8};
  ++data;
  --size;
  const auto hello = dp::ReadHeader<dp::HelloHeader>(data);
  const absl::Status hello_status = dp::CheckHello(hello, limits);
  if (!hello_status.ok()) {
    DSMOE_FUZZ_CHECK(hello_status.code() == absl::StatusCode::kInvalidArgument ||
                     hello_status.code() == absl::StatusCode::kFailedPrecondition);
    return 0;
  }
  size_t at = sizeof(dp::HelloHeader);
  std::vector<uint32_t> payload;  // 4-byte aligned, as the server's buffer
  while (size - at >= sizeof(dp::RequestHeader)) {
    const auto h = dp::ReadHeader<dp::RequestHeader>(data + at);
    at += sizeof(h);
    const absl::Status s = dp::CheckRequestHeader(h, limits);
    if (!s.ok()) {  // answered, then the connection closes
      DSMOE_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument ||
                       s.code() == absl::StatusCode::kResourceExhausted);
      DSMOE_FUZZ_CHECK(s.message().size() <= dp::kMaxMessageBytes);
      return 0;
    }
    DSMOE_FUZZ_CHECK(h.num_tokens <= limits.max_tokens &&
                     h.num_assignments <= limits.max_assignments);
    DSMOE_FUZZ_CHECK(h.payload_bytes ==
                     dp::RequestPayloadBytes(h.num_tokens, h.num_assignments, limits.hidden_size));
    if (size - at < h.payload_bytes) return 0;  // the stream ends inside the payload
    payload.resize((h.payload_bytes + 3) / 4);
    if (h.payload_bytes > 0) std::memcpy(payload.data(), data + at, h.payload_bytes);
    at += h.payload_bytes;
    const dp::RequestView v = dp::ViewPayload(h, payload.data(), limits.hidden_size);
    const auto* begin = reinterpret_cast<const unsigned char*>(payload.data());
    const auto* end = begin + h.payload_bytes;
    const size_t n = h.num_assignments;
    DSMOE_FUZZ_CHECK(reinterpret_cast<const unsigned char*>(v.hidden) == begin);
    DSMOE_FUZZ_CHECK(reinterpret_cast<const unsigned char*>(v.weight + n) == end);
    // Read every value the service would (ASan reports any read past the buffer).
    uint32_t mix = 0;
    for (size_t i = 0; i < n; ++i) {
      mix ^= v.token[i] ^ v.expert[i];
      float w;
      std::memcpy(&w, v.weight + i, sizeof(w));
      mix += static_cast<uint32_t>(w != w);
    }
    for (uint64_t i = 0; i < uint64_t{h.num_tokens} * limits.hidden_size; ++i)
      mix += static_cast<uint32_t>(v.hidden[i] != v.hidden[i]);
    (void)mix;
  }
  // The client's reply check on whatever is left.
  if (size - at >= sizeof(dp::ReplyHeader)) {
    const auto r = dp::ReadHeader<dp::ReplyHeader>(data + at);
    const absl::Status s = dp::CheckReplyHeader(r, 4 * limits.hidden_size);
    if (s.ok() && r.status != 0) DSMOE_FUZZ_CHECK(r.payload_bytes <= dp::kMaxMessageBytes);
  }
  return 0;
}
