#include "transport/event_loop.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "transport/socket_util.h"

namespace tether {

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create() {
  int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  int event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd < 0 || event_fd < 0) {
    absl::Status error =
        absl::UnavailableError(absl::StrCat("epoll/eventfd: ", socket_util::ErrnoText(errno)));
    if (epoll_fd >= 0) close(epoll_fd);
    if (event_fd >= 0) close(event_fd);
    return error;
  }
  std::unique_ptr<EventLoop> loop(new EventLoop(epoll_fd, event_fd));
  loop->Add(event_fd, kWakeKey, EPOLLIN);
  return loop;
}

EventLoop::~EventLoop() {
  close(epoll_fd_);
  close(event_fd_);
}

void EventLoop::Add(int fd, uint64_t key, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = key;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
}

void EventLoop::Modify(int fd, uint64_t key, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = key;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
}

void EventLoop::Remove(int fd) { epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr); }

int EventLoop::Wait(int timeout_ms,
                    absl::FunctionRef<void(uint64_t key, uint32_t events)> handler) {
  epoll_event events[kMaxEvents];
  int n = epoll_wait(epoll_fd_, events, kMaxEvents, timeout_ms);
  for (int i = 0; i < n; ++i) {
    if (events[i].data.u64 == kWakeKey) {
      DrainWake();
    } else {
      handler(events[i].data.u64, events[i].events);
    }
  }
  return n;
}

void EventLoop::Wake() {
  uint64_t one = 1;
  (void)!write(event_fd_, &one, sizeof(one));
}

void EventLoop::DrainWake() {
  uint64_t v;
  (void)!read(event_fd_, &v, sizeof(v));
}

}  // namespace tether
