// Buffer: a span of bytes that shares ownership of its storage.
//
// Out-of-band payloads (tensor storages, large byte strings) travel as Buffers next to the wire
// envelope and are never copied into it. A Buffer can wrap memory owned by something else (a
// tensor: keep the tensor alive in `owner`), or allocate its own storage that a transport reads
// into and that can later become a tensor's storage without a copy.
//
//   Buffer b = Buffer::Allocate(n);        // writable until shared
//   read(fd, b.mutable_data(), n);
//   Buffer view = Buffer::Wrap(tensor_holder, ptr, size);
//
// Copies of a Buffer alias the same bytes; they are cheap (one shared_ptr copy).
#ifndef TETHER_CORE_BUFFER_H_
#define TETHER_CORE_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/strings/string_view.h"

namespace tether {

class Buffer {
 public:
  Buffer() = default;

  // Allocates `size` uninitialized bytes.
  static Buffer Allocate(size_t size);
  // Copies `bytes` into new storage.
  static Buffer CopyFrom(absl::string_view bytes);
  // Aliases memory kept alive by `owner`.
  static Buffer Wrap(std::shared_ptr<const void> owner, const void* data, size_t size);

  const uint8_t* data() const { return data_; }
  // Writable access, for whoever allocated the buffer and fills it before sharing it.
  uint8_t* mutable_data() { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  absl::string_view view() const {
    return absl::string_view(reinterpret_cast<const char*>(data_), size_);
  }
  // Keeps the storage alive; hand it to whatever adopts the bytes (a tensor's deleter).
  const std::shared_ptr<const void>& owner() const { return owner_; }

 private:
  Buffer(std::shared_ptr<const void> owner, uint8_t* data, size_t size)
      : owner_(std::move(owner)), data_(data), size_(size) {}

  std::shared_ptr<const void> owner_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace tether

#endif  // TETHER_CORE_BUFFER_H_
