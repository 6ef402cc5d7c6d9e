// RRef identities and the payloads of the RRef protocol messages.
//
// Every reference has an RRefId and every fork (each copy of a reference that a worker receives) a
// ForkId: both are GloballyUniqueIds, the creating worker plus that worker's counter. An
// RRefDescriptor is what travels inside a call's arguments in place of an RRef. The codecs below
// turn the control messages' payloads (core/rref.proto) into bytes and back; the RRef context
// (core/rref_context.h) is their only user, and nothing else parses those payloads.
//
//   std::string bytes = EncodeForkRef(rref, fork);
//   RRefId r;
//   ForkId f;
//   if (!DecodeForkRef(bytes, &r, &f) || !r.valid()) ...;  // not a ForkRef, or a bad id
//
// Everything here is a plain value or a pure function: no state, no locks, any thread. Decoders
// return false only for bytes that do not parse; checking the ids is the caller's business (which
// ids must be valid differs per message).
#ifndef TETHER_CORE_RREF_IDS_H_
#define TETHER_CORE_RREF_IDS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/message.h"

namespace tether {

struct GloballyUniqueId {
  WorkerId worker = -1;
  uint64_t local = 0;

  bool valid() const { return worker >= 0; }
  std::string ToString() const;  // "GUID(worker:local)"
  friend bool operator==(const GloballyUniqueId& a, const GloballyUniqueId& b) {
    return a.worker == b.worker && a.local == b.local;
  }
  friend bool operator!=(const GloballyUniqueId& a, const GloballyUniqueId& b) { return !(a == b); }
  friend bool operator<(const GloballyUniqueId& a, const GloballyUniqueId& b) {
    return a.worker != b.worker ? a.worker < b.worker : a.local < b.local;
  }
};
using RRefId = GloballyUniqueId;
using ForkId = GloballyUniqueId;

// What is pickled in place of an RRef inside a call's arguments.
struct RRefDescriptor {
  RRefId rref_id;
  ForkId fork_id;
  WorkerId owner = -1;
  WorkerId parent = -1;
  std::string type_name;

  std::string Serialize() const;
  // kInvalidArgument if `bytes` is not a descriptor or has invalid ids.
  static absl::StatusOr<RRefDescriptor> Parse(absl::string_view bytes);
};

// --- Payloads of the control messages (rref_wire in core/rref.proto) ---

// RREF_FORK_REQUEST, RREF_USER_DELETE and RREF_FETCH_CALL: a reference and one of its forks.
// `attachment`: RREF_FETCH_CALL's opaque bytes for the owner's serializer (empty: none).
std::string EncodeForkRef(const RRefId& rref, const ForkId& fork,
                          absl::string_view attachment = {});
bool DecodeForkRef(absl::string_view payload, RRefId* rref, ForkId* fork,
                   std::string* attachment = nullptr);

// *_REMOTE_CALL: the reference to create plus the call itself.
struct RemoteCallPayload {
  RRefId rref_id;
  ForkId fork_id;
  std::string created_by;
  std::string type_name;
  std::string payload;
};
std::string EncodeRemoteCall(RemoteCallPayload call);
bool DecodeRemoteCall(absl::string_view payload, RemoteCallPayload* out);

// RREF_CHILD_ACCEPT: child to parent (accept), or parent to child (`query`: did the call that
// carried this fork ever arrive?).
std::string EncodeChildControl(const ForkId& fork, bool query);
bool DecodeChildControl(absl::string_view payload, ForkId* fork, bool* query);

// The child's answer to a query.
enum class ChildState {
  kRefused,  // the child never received the fork and now refuses it forever
  kPending,  // the child holds the fork and is still confirming it with the owner
  kDone,     // the child holds the fork and is done with it (confirmed, failed, or owner-local)
};
std::string EncodeChildQueryReply(ChildState state);
bool DecodeChildQueryReply(absl::string_view payload, ChildState* state);

}  // namespace tether

#endif  // TETHER_CORE_RREF_IDS_H_
