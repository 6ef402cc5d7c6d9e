// Message: what a Network carries between workers, a wire envelope plus its out-of-band buffers.
//
// `envelope.buffers` describes `buffers` one to one (sizes); SealBuffers() fills it in before a
// send, and CheckBuffers() verifies it on receipt.
#ifndef TETHER_CORE_MESSAGE_H_
#define TETHER_CORE_MESSAGE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "core/buffer.h"
#include "core/envelope.pb.h"

namespace tether {

using WorkerId = int32_t;
using wire::MessageType;

struct Message {
  wire::Envelope envelope;
  std::vector<Buffer> buffers;

  // Sets envelope.buffers to describe `buffers`.
  void SealBuffers();
  // Returns kInvalidArgument unless envelope.buffers describes `buffers` exactly.
  absl::Status CheckBuffers() const;
  // Sum of the buffers' sizes.
  size_t BufferBytes() const;
};

// The name of a message type as in envelope.proto ("PYTHON_CALL"), or "UNKNOWN(n)".
std::string MessageTypeName(MessageType type);
// Parses a name as MessageTypeName prints it. Returns kInvalidArgument for an unknown name.
absl::Status ParseMessageType(absl::string_view name, MessageType* type);

// Encodes `status` (not OK) into an envelope's error field and back.
void SetError(const absl::Status& status, wire::Envelope* envelope);
absl::Status ErrorFromEnvelope(const wire::Envelope& envelope);

// Whether `type` is a reply (RESPONSE or ERROR_RESPONSE).
inline bool IsReply(MessageType type) {
  return type == wire::RESPONSE || type == wire::ERROR_RESPONSE;
}

}  // namespace tether

#endif  // TETHER_CORE_MESSAGE_H_
