// EventLoop: the epoll set and the wake-up of the TCP transport's event loop.
//
// It owns an epoll instance and an eventfd registered in it under kWakeKey. Callers register
// their sockets under keys of their own (any value but kWakeKey) and run Wait() in their loop;
// Wake() from any thread makes a Wait() in progress (or the next one) return at once.
//
//   auto loop = EventLoop::Create().value();
//   loop->Add(listen_fd, /*key=*/0, EPOLLIN);
//   while (running) {
//     loop->Wait(timeout_ms, [&](uint64_t key, uint32_t events) { Handle(key, events); });
//   }
//   loop->Wake();  // from another thread: Wait() returns
//
// Threads: Wait() on one thread at a time (the loop's); Add/Modify/Remove from any thread (epoll
// is thread-safe), as the transport's writers arm EPOLLOUT; Wake() from any thread. The handler
// runs on the thread in Wait(). The loop owns its two descriptors, not the callers' sockets.
#ifndef TETHER_TRANSPORT_EVENT_LOOP_H_
#define TETHER_TRANSPORT_EVENT_LOOP_H_

#include <cstdint>
#include <memory>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace tether {

class EventLoop {
 public:
  // The key of the wake-up eventfd: Wait() consumes its events and never passes them on.
  static constexpr uint64_t kWakeKey = 1;
  // The most events one Wait() reports.
  static constexpr int kMaxEvents = 64;

  // kUnavailable ("epoll/eventfd: ...") if either descriptor cannot be created.
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();

  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // epoll_ctl ADD / MOD / DEL of `fd` with `events` (EPOLLIN, ...), reported under `key`.
  void Add(int fd, uint64_t key, uint32_t events);
  void Modify(int fd, uint64_t key, uint32_t events);
  void Remove(int fd);

  // Waits up to `timeout_ms` (0: poll, -1: forever) and calls `handler(key, events)` for every
  // event, in the order epoll reports them; a wake-up is drained in its place instead. Returns
  // epoll_wait's count (wake-ups included), or -1 with errno set (EINTR: interrupted, harmless).
  int Wait(int timeout_ms, absl::FunctionRef<void(uint64_t key, uint32_t events)> handler);

  // Makes the current or next Wait() return. Thread-safe, never blocks.
  void Wake();

 private:
  EventLoop(int epoll_fd, int event_fd) : epoll_fd_(epoll_fd), event_fd_(event_fd) {}
  void DrainWake();

  const int epoll_fd_;
  const int event_fd_;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_EVENT_LOOP_H_
