// libFuzzer target for everything that decodes bytes from the network before
// (and during) authentication and framing: handshake records, frame headers,
// envelopes and buffers. Built outside Bazel by tools/fuzz-frame (clang++
// -fsanitize=fuzzer,address).
//
// The first input byte picks how the rest is cut into reads (so partial
// headers, envelopes and buffers are exercised, and the direct-read path for
// buffers); the reader runs with small limits so impossible sizes are rejected
// instead of allocated. Every message that decodes must be self-consistent and
// must survive a re-encode/decode round trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "transport/auth.h"
#include "transport/frame.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "frame_fuzzer invariant broken: %s\n", what);
    std::abort();
  }
}

tether::FrameLimits SmallLimits() {
  tether::FrameLimits l;
  l.max_envelope_bytes = 1 << 20;
  l.max_buffer_count = 1024;
  l.max_buffer_bytes = 1 << 20;
  l.max_total_buffer_bytes = 4 << 20;
  return l;
}

void RoundTrip(const tether::Message& m) {
  Check(m.CheckBuffers().ok(),
        "decoded message's buffers match its descriptors");
  tether::Message copy = m;
  absl::StatusOr<tether::EncodedFrame> f = tether::EncodeFrame(copy);
  Check(f.ok(), "a decoded message re-encodes");
  std::string bytes(reinterpret_cast<const char*>(f->header),
                    tether::kFrameHeaderSize);
  bytes += f->envelope;
  for (const tether::Buffer& b : f->buffers) bytes += std::string(b.view());
  tether::FrameReader r(SmallLimits());
  std::vector<tether::Message> out;
  Check(
      r.Feed(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &out)
          .ok(),
      "a re-encoded message decodes");
  Check(out.size() == 1, "one message in, one message out");
  Check(out[0].buffers.size() == m.buffers.size(), "buffer count survives");
  for (size_t i = 0; i < m.buffers.size(); ++i) {
    Check(out[0].buffers[i].view() == m.buffers[i].view(),
          "buffer bytes survive");
  }
  Check(out[0].envelope.payload() == m.envelope.payload(), "payload survives");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Invalid UTF-8 in a string field makes protobuf log an error per input.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t chunk = 1 + (data[0] % 64) * (data[0] >= 128 ? 97 : 1);
  const bool direct = (data[0] & 1) != 0;
  ++data;
  --size;

  // Handshake records: any 80 bytes either decode or are rejected with a
  // status.
  if (size >= tether::kHandshakeSize) {
    for (auto kind :
         {tether::HandshakeKind::kHello, tether::HandshakeKind::kAcceptHello,
          tether::HandshakeKind::kProof}) {
      absl::StatusOr<tether::HandshakeRecord> r =
          tether::DecodeHandshake(data, kind);
      if (r.ok()) {
        uint8_t again[tether::kHandshakeSize];
        tether::EncodeHandshake(*r, again);
        Check(std::memcmp(again, data, tether::kHandshakeSize) == 0,
              "handshake round trip");
      }
    }
  }

  tether::FrameReader reader(SmallLimits());
  std::vector<tether::Message> out;
  size_t pos = 0;
  absl::Status status;
  while (pos < size && status.ok()) {
    if (direct && reader.DirectSize() > 0) {
      size_t n = std::min({reader.DirectSize(), size - pos, chunk * 3});
      std::memcpy(reader.DirectData(), data + pos, n);
      reader.CommitDirect(n, &out);
      pos += n;
      continue;
    }
    size_t n = std::min(chunk, size - pos);
    status = reader.Feed(data + pos, n, &out);
    pos += n;
  }
  if (!status.ok()) {
    Check(status.code() == absl::StatusCode::kInvalidArgument ||
              status.code() == absl::StatusCode::kResourceExhausted,
          "bad input is kInvalidArgument");
    Check(!status.message().empty(), "errors say what was wrong");
  }
  for (const tether::Message& m : out) RoundTrip(m);
  return 0;
}
