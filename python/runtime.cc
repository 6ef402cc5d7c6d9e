#include "python/runtime.h"

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/message.h"
#include "transport/system_clock.h"
#include "transport/tcp_network.h"
#include "transport/thread_pool.h"
#include "transport/tracing/call_trace_observer.h"
#include "transport/tracing/rref_trace_observer.h"
#include "transport/tracing/tracing_network.h"

namespace tether {

class Runtime::Impl {
 public:
  RuntimeOptions options;
  std::unique_ptr<SystemClock> clock;
  ThreadPool* pool = nullptr;  // Never freed; see runtime.h.
  std::unique_ptr<TcpNetwork> network;
  std::unique_ptr<FaultyNetwork> faulty;
  std::unique_ptr<TracingNetwork> tracing;
  // When tracing: puts the calls the agent failed on the trace. Freed after
  // `agent`.
  std::unique_ptr<CallTraceObserver> call_tracer;
  std::unique_ptr<Agent> agent;
  // When tracing: puts the RRef events on the trace (chained to
  // options.rref_options.observer). Owned here, used by `rrefs`: the
  // destructor frees it after `rrefs` and before `tracing`.
  std::unique_ptr<RRefTraceObserver> rref_tracer;
  std::shared_ptr<RRefContext> rrefs;
  std::shared_ptr<DistAutograd> dist_autograd;
  // What the agent runs on: the above, or the simulator's (ForSimulation).
  Clock* clock_view = nullptr;
  Executor* executor_view = nullptr;
  Network* network_view = nullptr;
  // Stop() has run (and what it returned).
  bool stopped = false;
  std::vector<StuckThread> left_behind;
};

Runtime::Runtime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

namespace {

// RuntimeOptions' faults and trace path, completed from the environment.
absl::Status FromEnvironment(RuntimeOptions* options) {
  if (options->faults.empty()) {
    std::vector<std::string> types;
    if (const char* v = std::getenv("TETHER_FAULTY_MESSAGES")) {
      types = absl::StrSplit(v, ',', absl::SkipWhitespace());
    }
    int num_fail_sends = 0;
    if (const char* v = std::getenv("TETHER_NUM_FAIL_SENDS")) {
      if (!absl::SimpleAtoi(v, &num_fail_sends)) {
        return absl::InvalidArgumentError(
            absl::StrCat("TETHER_NUM_FAIL_SENDS is not a number: '", v, "'"));
      }
    }
    std::map<std::string, double> delays;
    if (const char* v = std::getenv("TETHER_MESSAGES_TO_DELAY")) {
      for (absl::string_view item : absl::StrSplit(v, ',', absl::SkipWhitespace())) {
        std::pair<std::string, std::string> kv = absl::StrSplit(item, '=');
        double seconds = 0;
        if (!absl::SimpleAtod(kv.second, &seconds)) {
          return absl::InvalidArgumentError(
              absl::StrCat("TETHER_MESSAGES_TO_DELAY wants TYPE=seconds items, got '", item, "'"));
        }
        delays[kv.first] = seconds;
      }
    }
    absl::StatusOr<FaultyNetworkOptions> faults =
        FaultyNetworkOptions::FromNames(types, num_fail_sends, delays);
    if (!faults.ok()) return faults.status();
    options->faults = *std::move(faults);
  }
  if (options->stop_join_timeout < absl::ZeroDuration()) {
    options->stop_join_timeout = absl::Seconds(5);
    if (const char* v = std::getenv("TETHER_SHUTDOWN_JOIN_TIMEOUT")) {
      double seconds = 0;
      if (!absl::SimpleAtod(v, &seconds) || seconds < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("TETHER_SHUTDOWN_JOIN_TIMEOUT wants seconds >= 0, got '", v, "'"));
      }
      options->stop_join_timeout = absl::Seconds(seconds);
    }
  }
  if (options->trace_path.empty()) {
    if (const char* dir = std::getenv("TETHER_TRACE_DIR")) {
      if (*dir != '\0') options->trace_path = absl::StrCat(dir, "/trace-", options->name, ".json");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Listen(const RuntimeOptions& options) {
  if (options.rank < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rank must be >= 0, got ", options.rank));
  }
  if (options.num_worker_threads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_worker_threads must be positive, got ", options.num_worker_threads));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  absl::Status env = FromEnvironment(&impl->options);
  if (!env.ok()) return env;
  TcpNetworkOptions net;
  net.self = options.rank;
  net.listen_host = options.listen_host;
  net.listen_port = 0;
  net.auth_token = options.auth_token;
  net.connect_timeout = options.connect_timeout;
  absl::StatusOr<std::unique_ptr<TcpNetwork>> network = TcpNetwork::Listen(net);
  if (!network.ok()) return network.status();
  impl->network = *std::move(network);
  impl->clock = std::make_unique<SystemClock>();
  impl->pool = new ThreadPool(options.num_worker_threads);
  impl->clock_view = impl->clock.get();
  impl->executor_view = impl->pool;
  impl->network_view = impl->network.get();
  if (!impl->options.faults.empty()) {
    impl->faulty =
        std::make_unique<FaultyNetwork>(impl->network_view, impl->clock_view, impl->options.faults);
    impl->network_view = impl->faulty.get();
  }
  if (!impl->options.trace_path.empty()) {
    impl->tracing = std::make_unique<TracingNetwork>(impl->network_view, impl->clock_view,
                                                     impl->options.trace_path, options.name);
    impl->network_view = impl->tracing.get();
  }
  return std::unique_ptr<Runtime>(new Runtime(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::ForSimulation(const RuntimeOptions& options,
                                                                Clock* clock, Executor* executor,
                                                                Network* network) {
  if (options.rank < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rank must be >= 0, got ", options.rank));
  }
  if (clock == nullptr || executor == nullptr || network == nullptr) {
    return absl::InvalidArgumentError("a simulated runtime needs a clock, executor and network");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->clock_view = clock;
  impl->executor_view = executor;
  impl->network_view = network;
  return std::unique_ptr<Runtime>(new Runtime(std::move(impl)));
}

std::string Runtime::address() const {
  return impl_->network != nullptr ? impl_->network->listen_address() : "";
}

absl::Status Runtime::Connect(const std::vector<WorkerInfo>& workers,
                              const std::map<WorkerId, std::string>& addresses) {
  if (impl_->agent != nullptr) return absl::FailedPreconditionError("already connected");
  if (impl_->network != nullptr) {
    absl::Status peers = impl_->network->SetPeers(addresses);
    if (!peers.ok()) return peers;
  }
  AgentOptions options;
  options.self = impl_->options.rank;
  options.workers = workers;
  options.default_timeout = impl_->options.rpc_timeout;
  // tether.rpc.shutdown() bounds the barrier itself (its `timeout` argument).
  options.shutdown_timeout = absl::ZeroDuration();
  // A program's shutdown() fails at once, naming the worker, when one is gone before it joined.
  options.shutdown_fails_on_lost_peer = true;
  if (impl_->tracing != nullptr) {
    impl_->call_tracer = std::make_unique<CallTraceObserver>(impl_->tracing.get());
    options.call_observer = impl_->call_tracer.get();
  }
  absl::StatusOr<std::unique_ptr<Agent>> agent =
      Agent::Create(options, impl_->clock_view, impl_->network_view, impl_->executor_view);
  if (!agent.ok()) return agent.status();
  impl_->agent = *std::move(agent);
  RRefContextOptions rref_options = impl_->options.rref_options;
  if (impl_->tracing != nullptr) {
    impl_->rref_tracer =
        std::make_unique<RRefTraceObserver>(impl_->tracing.get(), rref_options.observer);
    rref_options.observer = impl_->rref_tracer.get();
  }
  impl_->rrefs = RRefContext::Create(impl_->agent.get(), impl_->clock_view, impl_->executor_view,
                                     rref_options);
  // Once every worker has called shutdown() (the barrier's join, agent.h), this worker's user
  // references and its owners nobody else knows of are deleted. The barrier then waits for the
  // deletions (the RRef context is one of its activity sources), within shutdown()'s own bound,
  // reporting meanwhile; references still alive after it are reported as leaks (lifecycle.cc).
  // So the future is not needed (no timeout of its own).
  std::weak_ptr<RRefContext> weak = impl_->rrefs;
  impl_->agent->AddShutdownJoinedListener([weak] {
    if (std::shared_ptr<RRefContext> rrefs = weak.lock()) {
      rrefs->DeleteAllUsersAndUnforkedOwners(absl::ZeroDuration());
    }
  });
  DistAutogradOptions autograd_options;
  absl::StatusOr<std::shared_ptr<DistAutograd>> autograd = DistAutograd::Create(
      impl_->agent.get(), impl_->clock_view, impl_->executor_view, autograd_options);
  if (!autograd.ok()) return autograd.status();
  impl_->dist_autograd = *std::move(autograd);
  return absl::OkStatus();
}

Agent* Runtime::agent() const { return impl_->agent.get(); }
RRefContext* Runtime::rrefs() const { return impl_->rrefs.get(); }
std::shared_ptr<DistAutograd> Runtime::dist_autograd() const { return impl_->dist_autograd; }
Executor* Runtime::executor() const { return impl_->executor_view; }
Clock* Runtime::clock() const { return impl_->clock_view; }
int Runtime::num_worker_threads() const {
  return impl_->pool != nullptr ? impl_->pool->num_threads() : impl_->options.num_worker_threads;
}

int Runtime::num_idle_threads() const {
  return impl_->pool != nullptr ? impl_->pool->num_idle_threads() : num_worker_threads();
}

std::map<std::string, int> Runtime::failed_sends() const {
  std::map<std::string, int> out;
  if (impl_->faulty == nullptr) return out;
  for (const auto& [type, count] : impl_->faulty->failed()) out[MessageTypeName(type)] = count;
  return out;
}

absl::Status Runtime::Start() {
  if (impl_->agent == nullptr) return absl::FailedPreconditionError("Connect() first");
  return impl_->agent->Start();
}

std::vector<StuckThread> Runtime::Stop() {
  Impl& impl = *impl_;
  if (impl.stopped) return impl.left_behind;
  impl.stopped = true;
  if (impl.agent != nullptr && !impl.agent->is_shut_down()) {
    impl.agent->Shutdown(/*graceful=*/false).Wait();
  }
  impl.network_view->Stop();
  // Runs what is queued (callbacks failing the last calls), then joins the
  // threads, leaving behind those still in a task after the bound.
  if (impl.pool != nullptr) {
    impl.left_behind =
        impl.pool->ShutdownWithin(ThreadPool::kDrain, impl.options.stop_join_timeout);
  }
  if (!impl.left_behind.empty()) {
    // Their tasks may still reach everything below: keep all of it (runtime.h).
    std::string text =
        absl::StrCat("tether: worker '", impl.options.name, "': ", impl.left_behind.size(),
                     " thread(s) still inside a task (most likely a handler in user code) ",
                     absl::FormatDuration(impl.options.stop_join_timeout),
                     " after the pool began to stop; left behind so the process can exit "
                     "(set TETHER_SHUTDOWN_JOIN_TIMEOUT to wait longer):");
    for (const StuckThread& t : impl.left_behind) absl::StrAppend(&text, "\n  ", t.ToString());
    std::fprintf(stderr, "%s\n", text.c_str());
    std::fflush(stderr);
    return impl.left_behind;
  }
  if (impl.rrefs != nullptr) impl.rrefs->Close(/*ignore_leaks=*/true).IgnoreError();
  impl.rrefs.reset();
  impl.dist_autograd.reset();
  impl.rref_tracer.reset();  // After the context that calls it.
  impl.agent.reset();
  impl.call_tracer.reset();  // After the agent that calls it.
  // Nothing is left to need a timer. Stopping the timer thread now (it waits for a callback that
  // is running) means none runs while the networks below are freed: the faulty network's delayed
  // sends are guarded by its own gate too (faulty_network.h), this is the second line.
  if (impl.clock != nullptr) impl.clock->Stop();
  impl.tracing.reset();
  impl.faulty.reset();
  impl.network.reset();
  impl.clock.reset();  // Last: every network above was given it.
  return {};
}

Runtime::~Runtime() {
  Stop();
  // Threads left behind may still use the state: never free it (runtime.h).
  if (!impl_->left_behind.empty()) (void)impl_.release();
}

}  // namespace tether
