// Framing of Tether messages on a byte stream (TCP), kept apart from the
// sockets so it can be tested and fuzzed on its own.
//
// A frame is a fixed 16-byte header, the serialized wire::Envelope, then the
// out-of-band buffers back to back, their sizes taken from the envelope's
// buffer descriptors:
//
//   offset 0   u32 magic "TTHR" (0x52485454 little-endian)
//   offset 4   u16 version (1)
//   offset 6   u16 flags: 0, or kFrameGoodbye (then both lengths are 0)
//   offset 8   u32 envelope length
//   offset 12  u32 buffer count
//
// A goodbye frame carries no message: a worker that stops sends it last, so
// its peers can tell an orderly stop from a crash.
//
// All integers little-endian. Sending: EncodeFrame() serializes the envelope
// and keeps the message's Buffers by reference, so a scatter-gather write sends
// them without copying. Receiving: FrameReader decodes incrementally; it checks
// the header and the envelope against FrameLimits before allocating anything,
// and reads each buffer into storage of its own (Buffer::Allocate'd, or for
// 1 MB and more an anonymous mapping with transparent huge pages owned by the
// Buffer), which can become a tensor's storage without a copy. Large buffers
// can be received straight from the socket into that storage
// (DirectSpan/CommitDirect).
//
// Not thread-safe; one reader per connection, used by one thread at a time.
#ifndef TETHER_TRANSPORT_FRAME_H_
#define TETHER_TRANSPORT_FRAME_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/message.h"

namespace tether {

inline constexpr uint32_t kFrameMagic = 0x52485454;  // "TTHR" on the wire.
inline constexpr uint16_t kFrameVersion = 1;
inline constexpr size_t kFrameHeaderSize = 16;
inline constexpr uint16_t kFrameGoodbye = 1;

// Sanity limits on what a peer may send; anything beyond is rejected as bad
// input.
struct FrameLimits {
  uint32_t max_envelope_bytes = 64u << 20;
  uint32_t max_buffer_count = 65536;
  uint64_t max_buffer_bytes = uint64_t{8} << 30;
  uint64_t max_total_buffer_bytes = uint64_t{16} << 30;
};

struct FrameHeader {
  uint32_t envelope_bytes = 0;
  uint32_t buffer_count = 0;
  bool goodbye = false;
};

void EncodeFrameHeader(const FrameHeader& header,
                       uint8_t out[kFrameHeaderSize]);
// kInvalidArgument naming the problem (wrong magic, unsupported version,
// unknown flags, a goodbye with lengths, an envelope or buffer count beyond
// `limits`).
absl::StatusOr<FrameHeader> DecodeFrameHeader(
    const uint8_t in[kFrameHeaderSize], const FrameLimits& limits);

// Parses an envelope and checks its buffer descriptors against the header and
// `limits`.
absl::StatusOr<wire::Envelope> DecodeEnvelope(const FrameHeader& header,
                                              const uint8_t* data, size_t size,
                                              const FrameLimits& limits);

// A message ready to be written: header and envelope bytes, then the buffers,
// uncopied.
struct EncodedFrame {
  uint8_t header[kFrameHeaderSize];
  std::string envelope;
  std::vector<Buffer> buffers;

  // Bytes on the wire.
  size_t size() const;
};

// Seals the message's buffer descriptors and serializes it. kInvalidArgument if
// the envelope or buffer count does not fit a frame at all.
absl::StatusOr<EncodedFrame> EncodeFrame(Message message);

class FrameReader {
 public:
  explicit FrameReader(FrameLimits limits = {}) : limits_(limits) {}

  // Consumes `size` bytes of the stream; appends each completed message to
  // `out`. After an error the stream is unusable (every later call returns the
  // same error): kInvalidArgument for bad input, kResourceExhausted if a buffer
  // within the limits cannot be allocated.
  absl::Status Feed(const uint8_t* data, size_t size,
                    std::vector<Message>* out);

  // While a buffer's bytes are being received: where its remaining bytes go, so
  // a caller can read() straight into it, then report with CommitDirect() how
  // many bytes it wrote there. Size 0 when no buffer is in progress.
  uint8_t* DirectData();
  size_t DirectSize() const;
  // `n` <= DirectSize(). Appends the message to `out` if that completed it.
  void CommitDirect(size_t n, std::vector<Message>* out);
  // The error that stopped the stream, if any.
  const absl::Status& error() const { return error_; }

  // Whether a goodbye frame was received (the peer is stopping).
  bool goodbye() const { return goodbye_; }
  // Whether the reader is between frames (nothing partial buffered).
  bool at_frame_boundary() const { return state_ == kHeader && have_ == 0; }

 private:
  enum State { kHeader, kEnvelope, kBuffers };
  void StartBuffers(std::vector<Message>* out);
  void NextBuffer(std::vector<Message>* out);

  const FrameLimits limits_;
  absl::Status error_;
  bool goodbye_ = false;
  State state_ = kHeader;
  uint8_t header_bytes_[kFrameHeaderSize];
  size_t have_ = 0;  // Bytes of the header or envelope collected so far.
  FrameHeader header_;
  std::string envelope_bytes_;
  Message message_;    // Being assembled.
  size_t buffer_ = 0;  // Index of the buffer being filled.
  size_t buffer_have_ = 0;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_FRAME_H_
