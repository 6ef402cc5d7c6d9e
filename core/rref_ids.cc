#include "core/rref_ids.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/rref.pb.h"

namespace tether {
namespace {

void ToProto(const GloballyUniqueId& id, rref_wire::GlobalId* out) {
  out->set_worker(id.worker);
  out->set_local(id.local);
}

GloballyUniqueId FromProto(const rref_wire::GlobalId& id) {
  return GloballyUniqueId{id.worker(), id.local()};
}

template <typename Proto>
bool ParseProto(absl::string_view bytes, Proto* msg) {
  return msg->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

}  // namespace

std::string GloballyUniqueId::ToString() const {
  return absl::StrCat("GUID(", worker, ":", local, ")");
}

std::string RRefDescriptor::Serialize() const {
  rref_wire::Descriptor msg;
  ToProto(rref_id, msg.mutable_rref_id());
  ToProto(fork_id, msg.mutable_fork_id());
  msg.set_owner(owner);
  msg.set_parent(parent);
  msg.set_type_name(type_name);
  return msg.SerializeAsString();
}

absl::StatusOr<RRefDescriptor> RRefDescriptor::Parse(absl::string_view bytes) {
  rref_wire::Descriptor msg;
  if (!ParseProto(bytes, &msg)) {
    return absl::InvalidArgumentError("RRef descriptor: not a serialized descriptor");
  }
  RRefDescriptor d;
  d.rref_id = FromProto(msg.rref_id());
  d.fork_id = FromProto(msg.fork_id());
  d.owner = msg.owner();
  d.parent = msg.parent();
  d.type_name = msg.type_name();
  if (!d.rref_id.valid() || !d.fork_id.valid() || d.owner < 0 || d.parent < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("RRef descriptor: invalid ids (rref ", d.rref_id.ToString(), ", fork ",
                     d.fork_id.ToString(), ", owner ", d.owner, ", parent ", d.parent, ")"));
  }
  return d;
}

std::string EncodeForkRef(const RRefId& rref, const ForkId& fork, absl::string_view attachment) {
  rref_wire::ForkRef msg;
  ToProto(rref, msg.mutable_rref_id());
  ToProto(fork, msg.mutable_fork_id());
  if (!attachment.empty()) msg.set_attachment(std::string(attachment));
  return msg.SerializeAsString();
}

bool DecodeForkRef(absl::string_view payload, RRefId* rref, ForkId* fork, std::string* attachment) {
  rref_wire::ForkRef msg;
  if (!ParseProto(payload, &msg)) return false;
  *rref = FromProto(msg.rref_id());
  *fork = FromProto(msg.fork_id());
  if (attachment != nullptr) *attachment = msg.attachment();
  return true;
}

std::string EncodeRemoteCall(RemoteCallPayload call) {
  rref_wire::RemoteCall msg;
  ToProto(call.rref_id, msg.mutable_rref_id());
  ToProto(call.fork_id, msg.mutable_fork_id());
  msg.set_created_by(call.created_by);
  msg.set_type_name(call.type_name);
  msg.set_payload(std::move(call.payload));
  return msg.SerializeAsString();
}

bool DecodeRemoteCall(absl::string_view payload, RemoteCallPayload* out) {
  rref_wire::RemoteCall msg;
  if (!ParseProto(payload, &msg)) return false;
  out->rref_id = FromProto(msg.rref_id());
  out->fork_id = FromProto(msg.fork_id());
  out->created_by = msg.created_by();
  out->type_name = msg.type_name();
  out->payload = std::move(*msg.mutable_payload());
  return true;
}

std::string EncodeChildControl(const ForkId& fork, bool query) {
  rref_wire::ChildControl msg;
  ToProto(fork, msg.mutable_fork_id());
  msg.set_query(query);
  return msg.SerializeAsString();
}

bool DecodeChildControl(absl::string_view payload, ForkId* fork, bool* query) {
  rref_wire::ChildControl msg;
  if (!ParseProto(payload, &msg)) return false;
  *fork = FromProto(msg.fork_id());
  *query = msg.query();
  return true;
}

std::string EncodeChildQueryReply(ChildState state) {
  rref_wire::ChildQueryReply msg;
  switch (state) {
    case ChildState::kRefused:
      msg.set_state(rref_wire::ChildQueryReply::REFUSED);
      break;
    case ChildState::kPending:
      msg.set_state(rref_wire::ChildQueryReply::PENDING);
      break;
    case ChildState::kDone:
      msg.set_state(rref_wire::ChildQueryReply::DONE);
      break;
  }
  return msg.SerializeAsString();
}

bool DecodeChildQueryReply(absl::string_view payload, ChildState* state) {
  rref_wire::ChildQueryReply msg;
  if (!ParseProto(payload, &msg)) return false;
  switch (msg.state()) {
    case rref_wire::ChildQueryReply::REFUSED:
      *state = ChildState::kRefused;
      break;
    case rref_wire::ChildQueryReply::DONE:
      *state = ChildState::kDone;
      break;
    default:
      *state = ChildState::kPending;
      break;
  }
  return true;
}

}  // namespace tether
