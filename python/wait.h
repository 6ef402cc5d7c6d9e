// Blocking waits of bound functions: the GIL released, Ctrl-C honoured, and inside a tether.sim
// worker a yield to the simulator (virtual time) instead of a blocked thread.
//
//   Future<Message> f = ...;
//   WaitInterruptibly(f);                      // GIL held on entry and on return
//   if (!WaitInterruptibly(f, deadline)) ...   // timed out
#ifndef TETHER_PYTHON_WAIT_H_
#define TETHER_PYTHON_WAIT_H_

#include <functional>

#include "absl/time/time.h"
#include "core/future.h"
#include "sim/process/wait_kind.h"

namespace tether {

// GIL held on entry and return (released while waiting). Throws error_already_set if a signal
// handler raised (KeyboardInterrupt). Returns whether `ready()` came true by `deadline`.
// `kind`: what the wait is for, reported as data if a simulated worker hangs in it.
bool WaitUntilReady(const std::function<bool()>& ready,
                    const std::function<bool(absl::Duration)>& wait_for, absl::Time deadline,
                    sim::WaitKind kind = sim::WaitKind::kOther);

template <typename T>
bool WaitInterruptibly(const Future<T>& future, absl::Time deadline = absl::InfiniteFuture(),
                       sim::WaitKind kind = sim::WaitKind::kOther) {
  return WaitUntilReady([&future] { return future.ready(); },
                        [&future](absl::Duration d) { return future.WaitFor(d); }, deadline,
                        kind);
}

}  // namespace tether

#endif  // TETHER_PYTHON_WAIT_H_
