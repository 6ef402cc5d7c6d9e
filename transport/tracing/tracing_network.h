// TracingNetwork: records what a real worker sends and receives as a Chrome
// trace, in the same event format as the simulator's traces
// (core/trace_event.h). It wraps any Network; each worker writes its own file
// when the network stops, and `tools/merge-traces` joins the files of all
// workers into one timeline, one track per worker.
//
//   TracingNetwork traced(&tcp, &clock, "/tmp/run/trace-worker0.json", "worker0");
//   ... give `traced` to the agent ...   // the file is written by Stop()
//
// Errors are markers of category "error": a reply with an error ("call
// failed" on the caller's track, "replied with error" on the callee's), a
// failed send, a failed peer. RRef events go on the track through an
// RRefTraceObserver (rref_trace_observer.h).
//
// Timestamps are the clock's Now() in Unix microseconds (a SystemClock follows
// the wall clock), so files from one host line up as they are; the merge
// command also corrects skew between hosts from the messages themselves.
// Thread-safe; `inner` and `clock` must outlive it.
#ifndef TETHER_TRANSPORT_TRACING_TRACING_NETWORK_H_
#define TETHER_TRANSPORT_TRACING_TRACING_NETWORK_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "core/clock.h"
#include "core/network.h"

namespace tether {

class TracingNetwork : public Network, private NetworkObserver {
 public:
  TracingNetwork(Network* inner, Clock* clock, std::string path, std::string worker_name);
  ~TracingNetwork() override;

  WorkerId self() const override { return inner_->self(); }
  absl::Status Start(NetworkObserver* observer) override;
  absl::Status Send(WorkerId to, Message message) override;
  // Stops the inner network, then writes the trace file.
  void Stop() override;

  // Adds a marker (an error, an RRef event) to this worker's track.
  void Mark(const std::string& name, const std::string& category, const std::string& detail);
  // Writes the events so far (also done by Stop()). kUnavailable if the file
  // cannot be written.
  absl::Status Flush();
  size_t num_events() const;

 private:
  void OnMessage(Message message) override;
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override;
  int64_t NowUs();

  Network* const inner_;
  Clock* const clock_;
  const std::string path_;
  const std::string worker_name_;
  NetworkObserver* observer_ = nullptr;
  mutable absl::Mutex mu_;
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_TRACING_TRACING_NETWORK_H_
