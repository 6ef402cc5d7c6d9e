// Framed, blocking I/O of link::Frame (link.proto) plus out-of-band buffers
// over a pipe or a Unix socket between the simulator's host and a worker
// process.
//
//   TETHER_RETURN_IF_ERROR(WriteFrame(fd, frame, buffers));
//   TETHER_ASSIGN_OR_RETURN(LinkFrame in, ReadFrame(fd));
//
// Errors: kUnavailable when the other end is gone (EOF, EPIPE, ECONNRESET),
// kInvalidArgument for a malformed frame (its size beyond the limits, a body
// that does not parse).
#ifndef TETHER_SIM_PROCESS_PIPE_H_
#define TETHER_SIM_PROCESS_PIPE_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/buffer.h"
#include "sim/process/link.pb.h"

namespace tether::sim {

struct LinkFrame {
  link::Frame frame;
  std::vector<Buffer> buffers;  // as described by frame.buffer_sizes
};

// Writes `frame` (its buffer_sizes are set from `buffers`) and the buffers.
absl::Status WriteFrame(int fd, link::Frame frame,
                        const std::vector<Buffer>& buffers = {});
absl::StatusOr<LinkFrame> ReadFrame(int fd);

}  // namespace tether::sim

#endif  // TETHER_SIM_PROCESS_PIPE_H_
