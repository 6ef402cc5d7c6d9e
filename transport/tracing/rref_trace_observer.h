// RRefTraceObserver: puts a traced worker's RRef events (core/rref_context.h)
// on its Chrome trace, as markers of category "rref" ("rref owner created",
// "rref user confirmed", "rref fork added", ...) whose detail names the
// reference, the fork and the peer. Give it as RRefContextOptions::observer
// of a worker whose network is a TracingNetwork:
//
//   RRefTraceObserver observer(&traced, options.observer);  // chains to it
//   options.observer = &observer;
//   auto rrefs = RRefContext::Create(agent, clock, executor, options);
//
// Callbacks run synchronously under the RRef context's lock, on whichever
// thread made the event (an executor thread, or the thread that called the
// context or dropped a handle); it only takes the TracingNetwork's lock, and
// then calls `next`. `trace` and `next` must outlive it, and it must outlive
// the RRef context that calls it.
#ifndef TETHER_TRANSPORT_TRACING_RREF_TRACE_OBSERVER_H_
#define TETHER_TRANSPORT_TRACING_RREF_TRACE_OBSERVER_H_

#include <string>

#include "core/rref_context.h"
#include "transport/tracing/tracing_network.h"

namespace tether {

class RRefTraceObserver : public RRefObserver {
 public:
  // `next` (may be null) gets every event too, after it is marked.
  explicit RRefTraceObserver(TracingNetwork* trace,
                             RRefObserver* next = nullptr)
      : trace_(trace), next_(next) {}

  void OnRRefEvent(const RRefEvent& event) override;

  // The marker's name: "rref owner created", "rref fork added", ...
  static std::string EventName(RRefEvent::Kind kind);
  // "rref GUID(0:1) fork GUID(0:2) peer 0", leaving out what is unset.
  static std::string EventDetail(const RRefEvent& event);

 private:
  TracingNetwork* const trace_;
  RRefObserver* const next_;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_TRACING_RREF_TRACE_OBSERVER_H_
