#include "transport/frame.h"

#include <sys/mman.h>

#include <cstring>
#include <limits>
#include <new>

#include "absl/strings/str_cat.h"
#include "transport/little_endian.h"

namespace tether {
namespace {

using le::Get16;
using le::Get32;
using le::Put16;
using le::Put32;

// Received buffers of at least this size are mapped directly and marked for
// transparent huge pages: a 64 MB tensor then costs a few dozen page faults
// instead of 16384.
constexpr size_t kLargeBuffer = size_t{1} << 20;

Buffer AllocateReceiveBuffer(size_t size) {
  if (size < kLargeBuffer) return Buffer::Allocate(size);
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  madvise(p, size, MADV_HUGEPAGE);
  std::shared_ptr<void> owner(p, [size](void* q) { munmap(q, size); });
  return Buffer::Wrap(std::move(owner), p, size);
}

}  // namespace

void EncodeFrameHeader(const FrameHeader& header,
                       uint8_t out[kFrameHeaderSize]) {
  Put32(out, kFrameMagic);
  Put16(out + 4, kFrameVersion);
  Put16(out + 6, header.goodbye ? kFrameGoodbye : 0);
  Put32(out + 8, header.envelope_bytes);
  Put32(out + 12, header.buffer_count);
}

absl::StatusOr<FrameHeader> DecodeFrameHeader(
    const uint8_t in[kFrameHeaderSize], const FrameLimits& limits) {
  uint32_t magic = Get32(in);
  if (magic != kFrameMagic) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad frame: wrong magic 0x", absl::Hex(magic, absl::kZeroPad8),
        " (not a Tether peer, or the stream lost its framing)"));
  }
  uint16_t version = Get16(in + 4);
  if (version != kFrameVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad frame: unsupported version ", version,
                     " (this worker speaks ", kFrameVersion, ")"));
  }
  uint16_t flags = Get16(in + 6);
  if (flags != 0 && flags != kFrameGoodbye) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad frame: unknown flags 0x", absl::Hex(flags)));
  }
  FrameHeader h;
  h.envelope_bytes = Get32(in + 8);
  h.buffer_count = Get32(in + 12);
  h.goodbye = flags == kFrameGoodbye;
  if (h.goodbye && (h.envelope_bytes != 0 || h.buffer_count != 0)) {
    return absl::InvalidArgumentError(
        "bad frame: a goodbye frame must not carry a message");
  }
  if (h.envelope_bytes > limits.max_envelope_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad frame: envelope of ", h.envelope_bytes,
        " bytes exceeds the limit of ", limits.max_envelope_bytes));
  }
  if (h.buffer_count > limits.max_buffer_count) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad frame: ", h.buffer_count,
                     " buffers exceed the limit of ", limits.max_buffer_count));
  }
  return h;
}

absl::StatusOr<wire::Envelope> DecodeEnvelope(const FrameHeader& header,
                                              const uint8_t* data, size_t size,
                                              const FrameLimits& limits) {
  wire::Envelope envelope;
  if (size > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      !envelope.ParseFromArray(data, static_cast<int>(size))) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad frame: envelope of ", size, " bytes does not parse"));
  }
  if (static_cast<uint64_t>(envelope.buffers_size()) != header.buffer_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad frame: header announces ", header.buffer_count,
        " buffers but the envelope describes ", envelope.buffers_size()));
  }
  uint64_t total = 0;
  for (int i = 0; i < envelope.buffers_size(); ++i) {
    uint64_t n = envelope.buffers(i).size();
    if (n > limits.max_buffer_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad frame: buffer ", i, " of ", n, " bytes exceeds the limit of ",
          limits.max_buffer_bytes));
    }
    if (n > limits.max_total_buffer_bytes - total) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad frame: buffers total more than the limit of ",
                       limits.max_total_buffer_bytes, " bytes"));
    }
    total += n;
  }
  return envelope;
}

size_t EncodedFrame::size() const {
  size_t n = kFrameHeaderSize + envelope.size();
  for (const Buffer& b : buffers) n += b.size();
  return n;
}

absl::StatusOr<EncodedFrame> EncodeFrame(Message message) {
  message.SealBuffers();
  if (message.buffers.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("message carries ", message.buffers.size(),
                     " buffers; too many for a frame"));
  }
  EncodedFrame f;
  if (!message.envelope.SerializeToString(&f.envelope)) {
    return absl::InvalidArgumentError("envelope does not serialize");
  }
  if (f.envelope.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "envelope of ", f.envelope.size(), " bytes is too large for a frame"));
  }
  FrameHeader h;
  h.envelope_bytes = static_cast<uint32_t>(f.envelope.size());
  h.buffer_count = static_cast<uint32_t>(message.buffers.size());
  EncodeFrameHeader(h, f.header);
  f.buffers = std::move(message.buffers);
  return f;
}

absl::Status FrameReader::Feed(const uint8_t* data, size_t size,
                               std::vector<Message>* out) {
  while (error_.ok() && size > 0) {
    switch (state_) {
      case kHeader: {
        size_t n = std::min(size, kFrameHeaderSize - have_);
        std::memcpy(header_bytes_ + have_, data, n);
        have_ += n;
        data += n;
        size -= n;
        if (have_ < kFrameHeaderSize) break;
        absl::StatusOr<FrameHeader> h =
            DecodeFrameHeader(header_bytes_, limits_);
        if (!h.ok()) {
          error_ = h.status();
          break;
        }
        header_ = *h;
        have_ = 0;
        if (header_.goodbye) {
          goodbye_ = true;  // Nothing follows it that matters.
          break;
        }
        envelope_bytes_.resize(header_.envelope_bytes);
        state_ = kEnvelope;
        break;  // An empty envelope completes at once, below.
      }
      case kEnvelope: {
        size_t n = std::min(size, envelope_bytes_.size() - have_);
        std::memcpy(&envelope_bytes_[have_], data, n);
        have_ += n;
        data += n;
        size -= n;
        break;
      }
      case kBuffers: {
        size_t n = std::min(size, DirectSize());
        std::memcpy(DirectData(), data, n);
        data += n;
        size -= n;
        CommitDirect(n, out);
        break;
      }
    }
    // An envelope is complete (possibly at once, if empty).
    if (error_.ok() && state_ == kEnvelope && have_ == envelope_bytes_.size()) {
      absl::StatusOr<wire::Envelope> env = DecodeEnvelope(
          header_, reinterpret_cast<const uint8_t*>(envelope_bytes_.data()),
          envelope_bytes_.size(), limits_);
      if (!env.ok()) {
        error_ = env.status();
        break;
      }
      message_ = Message();
      message_.envelope = std::move(*env);
      have_ = 0;
      std::string().swap(envelope_bytes_);
      StartBuffers(out);
    }
  }
  return error_;
}

void FrameReader::StartBuffers(std::vector<Message>* out) {
  state_ = kBuffers;
  buffer_ = 0;
  message_.buffers.reserve(message_.envelope.buffers_size());
  NextBuffer(out);
}

// Allocates the next non-empty buffer, or completes the message.
void FrameReader::NextBuffer(std::vector<Message>* out) {
  while (buffer_ < static_cast<size_t>(message_.envelope.buffers_size())) {
    uint64_t n = message_.envelope.buffers(buffer_).size();
    if (n > 0) {
      try {
        message_.buffers.push_back(AllocateReceiveBuffer(n));
      } catch (const std::bad_alloc&) {
        error_ = absl::ResourceExhaustedError(
            absl::StrCat("cannot allocate a received buffer of ", n, " bytes"));
        return;
      }
      buffer_have_ = 0;
      return;
    }
    message_.buffers.push_back(Buffer());
    ++buffer_;
  }
  out->push_back(std::move(message_));
  message_ = Message();
  state_ = kHeader;
  have_ = 0;
}

uint8_t* FrameReader::DirectData() {
  if (state_ != kBuffers || !error_.ok()) return nullptr;
  return message_.buffers[buffer_].mutable_data() + buffer_have_;
}

size_t FrameReader::DirectSize() const {
  if (state_ != kBuffers || !error_.ok()) return 0;
  return message_.buffers[buffer_].size() - buffer_have_;
}

void FrameReader::CommitDirect(size_t n, std::vector<Message>* out) {
  buffer_have_ += n;
  if (buffer_have_ == message_.buffers[buffer_].size()) {
    ++buffer_;
    NextBuffer(out);
  }
}

}  // namespace tether
