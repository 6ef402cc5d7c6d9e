// CallTraceObserver: puts the calls a traced worker's agent ended with an error
// of its own (a timeout, a failed peer, a failed send, shutdown; see
// core/agent.h CallObserver) on its Chrome trace, as markers of category
// "error" named "call failed" whose detail names the call and the status.
// (Error replies are marked by the TracingNetwork itself as they pass.)
//
//   CallTraceObserver observer(&traced);
//   agent_options.call_observer = &observer;
//
// Callbacks run on the thread ending the call; it only takes the
// TracingNetwork's lock. `trace` must outlive it, and it the agent.
#ifndef TETHER_TRANSPORT_TRACING_CALL_TRACE_OBSERVER_H_
#define TETHER_TRANSPORT_TRACING_CALL_TRACE_OBSERVER_H_

#include "core/agent.h"
#include "transport/tracing/tracing_network.h"

namespace tether {

class CallTraceObserver : public CallObserver {
 public:
  explicit CallTraceObserver(TracingNetwork* trace) : trace_(trace) {}

  void OnCallFailed(WorkerId to, MessageType type, uint64_t request_id,
                    const absl::Status& status) override;

 private:
  TracingNetwork* const trace_;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_TRACING_CALL_TRACE_OBSERVER_H_
