#include "core/message.h"

#include "absl/strings/str_cat.h"

namespace tether {

void Message::SealBuffers() {
  envelope.clear_buffers();
  for (const Buffer& b : buffers) envelope.add_buffers()->set_size(b.size());
}

absl::Status Message::CheckBuffers() const {
  if (static_cast<size_t>(envelope.buffers_size()) != buffers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("message describes ", envelope.buffers_size(),
                                                   " buffers but carries ", buffers.size()));
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (envelope.buffers(i).size() != buffers[i].size()) {
      return absl::InvalidArgumentError(absl::StrCat("buffer ", i, " is described as ",
                                                     envelope.buffers(i).size(),
                                                     " bytes but carries ", buffers[i].size()));
    }
  }
  return absl::OkStatus();
}

size_t Message::BufferBytes() const {
  size_t total = 0;
  for (const Buffer& b : buffers) total += b.size();
  return total;
}

std::string MessageTypeName(MessageType type) {
  if (!wire::MessageType_IsValid(type)) {
    return absl::StrCat("UNKNOWN(", static_cast<int>(type), ")");
  }
  return wire::MessageType_Name(type);
}

absl::Status ParseMessageType(absl::string_view name, MessageType* type) {
  if (!wire::MessageType_Parse(std::string(name), type)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown message type '", name, "'"));
  }
  return absl::OkStatus();
}

void SetError(const absl::Status& status, wire::Envelope* envelope) {
  envelope->mutable_error()->set_code(static_cast<int>(status.code()));
  envelope->mutable_error()->set_message(std::string(status.message()));
}

absl::Status ErrorFromEnvelope(const wire::Envelope& envelope) {
  int code = envelope.error().code();
  if (code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kUnknown);
  }
  return absl::Status(static_cast<absl::StatusCode>(code), envelope.error().message());
}

}  // namespace tether
