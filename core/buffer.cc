#include "core/buffer.h"

#include <cstring>

namespace tether {

Buffer Buffer::Allocate(size_t size) {
  if (size == 0) return Buffer();
  std::shared_ptr<uint8_t> storage(new uint8_t[size], std::default_delete<uint8_t[]>());
  uint8_t* data = storage.get();
  return Buffer(std::move(storage), data, size);
}

Buffer Buffer::CopyFrom(absl::string_view bytes) {
  Buffer b = Allocate(bytes.size());
  if (!bytes.empty()) std::memcpy(b.mutable_data(), bytes.data(), bytes.size());
  return b;
}

Buffer Buffer::Wrap(std::shared_ptr<const void> owner, const void* data, size_t size) {
  return Buffer(std::move(owner), static_cast<uint8_t*>(const_cast<void*>(data)), size);
}

}  // namespace tether
