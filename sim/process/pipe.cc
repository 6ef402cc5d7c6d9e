#include "sim/process/pipe.h"

#include <errno.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace tether::sim {
namespace {

constexpr uint32_t kMaxFrameBytes = 256u << 20;
constexpr uint64_t kMaxBufferBytes = 16ull << 30;

absl::Status WriteAll(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(
          absl::StrCat("link write failed: ", std::strerror(errno)));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, void* data, size_t size) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = ::read(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(
          absl::StrCat("link read failed: ", std::strerror(errno)));
    }
    if (n == 0)
      return absl::UnavailableError("the other end of the link closed");
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteFrame(int fd, link::Frame frame,
                        const std::vector<Buffer>& buffers) {
  frame.clear_buffer_sizes();
  for (const Buffer& b : buffers) frame.add_buffer_sizes(b.size());
  std::string body;
  if (!frame.SerializeToString(&body))
    return absl::InternalError("cannot serialize link frame");
  if (body.size() > kMaxFrameBytes)
    return absl::InvalidArgumentError("link frame too large");
  uint32_t len = static_cast<uint32_t>(body.size());
  absl::Status s = WriteAll(fd, &len, sizeof(len));
  if (s.ok()) s = WriteAll(fd, body.data(), body.size());
  for (const Buffer& b : buffers) {
    if (!s.ok()) break;
    s = WriteAll(fd, b.data(), b.size());
  }
  return s;
}

absl::StatusOr<LinkFrame> ReadFrame(int fd) {
  uint32_t len = 0;
  absl::Status s = ReadAll(fd, &len, sizeof(len));
  if (!s.ok()) return s;
  if (len > kMaxFrameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("link frame of ", len, " bytes is too large"));
  }
  std::string body(len, '\0');
  s = ReadAll(fd, body.data(), len);
  if (!s.ok()) return s;
  LinkFrame out;
  if (!out.frame.ParseFromString(body)) {
    return absl::InvalidArgumentError("link frame does not parse");
  }
  uint64_t total = 0;
  for (uint64_t size : out.frame.buffer_sizes()) {
    total += size;
    if (total > kMaxBufferBytes)
      return absl::InvalidArgumentError("link buffers too large");
  }
  for (uint64_t size : out.frame.buffer_sizes()) {
    Buffer b = Buffer::Allocate(size);
    s = ReadAll(fd, b.mutable_data(), size);
    if (!s.ok()) return s;
    out.buffers.push_back(std::move(b));
  }
  return out;
}

}  // namespace tether::sim
