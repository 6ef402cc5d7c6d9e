// WaitKind: what a simulated worker's blocked frame waits for, as data (ChildRuntime::BlockUntil,
// sim/process/child.h). The host reports it (WorkerOutcome::blocked_in_shutdown), and the driver
// classifies a hang by it, never by the text that says where the frame waits.
//
//   rt.BlockUntil([&] { return done.ready(); }, "rpc.shutdown()", WaitKind::kShutdown);
#ifndef TETHER_SIM_PROCESS_WAIT_KIND_H_
#define TETHER_SIM_PROCESS_WAIT_KIND_H_

namespace tether::sim {

enum class WaitKind {
  kOther,
  kShutdown,  // the graceful-shutdown barrier
};

}  // namespace tether::sim

#endif  // TETHER_SIM_PROCESS_WAIT_KIND_H_
