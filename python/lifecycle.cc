#include "python/lifecycle.h"

#include <pybind11/stl.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/profiler/api.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/agent.h"
#include "core/future.h"
#include "core/rref_context.h"
#include "core/status.h"
#include "python/call_profiling.h"
#include "python/callee.h"
#include "python/errors.h"
#include "python/owned_value.h"
#include "python/process_state.h"
#include "python/py_ownership.h"
#include "python/sim_bindings.h"
#include "python/wait.h"
#include "transport/faulty/faulty_network.h"

namespace py = pybind11;

namespace tether {
namespace {

// What failed_sends() reports after shutdown(): the last worker's (GIL held).
std::map<std::string, int>& LastFailedSends() {
  static auto* last = new std::map<std::string, int>();
  return *last;
}

std::vector<std::pair<std::string, int>> Workers(const Worker& w) {
  std::vector<std::pair<std::string, int>> out;
  for (const WorkerInfo& info : w.runtime->agent()->workers()) out.emplace_back(info.name, info.id);
  return out;
}

void RequireNotInitialized() {
  if (CurrentWorker() != nullptr || ListeningRuntime() != nullptr) {
    throw std::runtime_error("RPC is already initialized");
  }
}

RuntimeOptions BaseOptions(const std::string& name, int rank, int num_worker_threads,
                           double rpc_timeout) {
  RuntimeOptions options;
  options.name = name;
  options.rank = rank;
  options.num_worker_threads = num_worker_threads;
  options.rpc_timeout = rpc_timeout <= 0 ? absl::ZeroDuration() : absl::Seconds(rpc_timeout);
  options.rref_options.serializer = SerializeOwned;
  // Ids count from 0, as PyTorch's do (an RRef's repr shows them).
  options.rref_options.first_local_id = 0;
  return options;
}

// `fail_types`, `num_fail_sends` and `delays` (seconds by message type name)
// configure a FaultyNetwork under the agent (the FAULTY_TENSORPIPE backend).
std::string Listen(const std::string& name, int rank, int num_worker_threads, double rpc_timeout,
                   const std::string& auth_token, const std::string& listen_host,
                   const std::vector<std::string>& fail_types, int num_fail_sends,
                   const std::map<std::string, double>& delays) {
  RequireNotInitialized();
  if (GetHooks().run_python_call == nullptr) {
    throw std::runtime_error("tether._C is used before tether.rpc installed its hooks");
  }
  RuntimeOptions options = BaseOptions(name, rank, num_worker_threads, rpc_timeout);
  options.auth_token = auth_token;
  options.listen_host = listen_host;
  absl::StatusOr<FaultyNetworkOptions> faults =
      FaultyNetworkOptions::FromNames(fail_types, num_fail_sends, delays);
  if (!faults.ok()) Raise(faults.status());
  options.faults = *std::move(faults);
  absl::StatusOr<std::unique_ptr<Runtime>> runtime;
  {
    ScopedGilRelease release;
    runtime = Runtime::Listen(options);
  }
  if (!runtime.ok()) Raise(runtime.status());
  ListeningRuntime() = *std::move(runtime);
  return ListeningRuntime()->address();
}

#ifdef TETHER_PLANTED_BUGS
// Protocol bugs planted on purpose for tether.sim's own tests (test-only builds).
void PlantBugs(RRefContextOptions* options) {
  const char* plant = std::getenv("TETHER_SIM_PLANTED_RREF_BUGS");
  if (plant == nullptr) return;
  std::string bugs = plant;
  options->bugs.skip_child_wait = bugs.find("skip_child_wait") != std::string::npos;
  options->bugs.forget_idempotence = bugs.find("forget_idempotence") != std::string::npos;
  options->bugs.free_on_first_delete = bugs.find("free_on_first_delete") != std::string::npos;
  options->bugs.forget_user_delete = bugs.find("forget_user_delete") != std::string::npos;
}
#endif

// Inside tether.sim: the rendezvous goes through the simulator's host. Returns every worker's
// (name, id, address); the addresses are empty.
std::vector<std::tuple<std::string, int, std::string>> SimListen(const std::string& name, int rank,
                                                                 int world_size,
                                                                 int num_worker_threads,
                                                                 double rpc_timeout) {
  RequireNotInitialized();
  if (!InSimulatedWorker()) throw std::runtime_error("sim_listen outside a tether.sim worker");
  RuntimeOptions options = BaseOptions(name, rank, num_worker_threads, rpc_timeout);
#ifdef TETHER_PLANTED_BUGS
  PlantBugs(&options.rref_options);
#endif
  py::module_ c = py::module_::import("tether._C");
  std::vector<std::string> names = c.attr("sim_register")(name).cast<std::vector<std::string>>();
  if (static_cast<int>(names.size()) != world_size) {
    throw std::runtime_error(absl::StrCat("world_size is ", world_size, " but the simulation has ",
                                          names.size(), " workers"));
  }
  SetSimWorkerThreads(num_worker_threads);
  absl::StatusOr<std::unique_ptr<Runtime>> runtime =
      Runtime::ForSimulation(options, SimWorkerClock(), SimWorkerExecutor(), SimWorkerNetwork());
  if (!runtime.ok()) Raise(runtime.status());
  ListeningRuntime() = *std::move(runtime);
  std::vector<std::tuple<std::string, int, std::string>> workers;
  for (int i = 0; i < static_cast<int>(names.size()); ++i) workers.emplace_back(names[i], i, "");
  return workers;
}

void AbandonListen() {
  std::unique_ptr<Runtime> rt = std::move(ListeningRuntime());
  ScopedGilRelease release;
  rt.reset();
}

// `workers`: (name, id, address) for every worker, this one included.
std::vector<std::pair<std::string, int>> Connect(
    const std::vector<std::tuple<std::string, int, std::string>>& workers) {
  if (ListeningRuntime() == nullptr) throw std::runtime_error("listen() first");
  std::unique_ptr<Runtime> runtime = std::move(ListeningRuntime());
  auto worker = std::make_shared<Worker>();
  worker->cu = torch::jit::get_python_cu();
  std::vector<WorkerInfo> infos;
  std::map<WorkerId, std::string> addresses;
  absl::Status s;
  {
    ScopedGilRelease release;
    for (const auto& [name, id, address] : workers) {
      infos.push_back(WorkerInfo{name, id});
      if (address != runtime->address()) addresses[id] = address;
    }
    s = runtime->Connect(infos, addresses);
    if (!s.ok()) runtime.reset();
  }
  if (!s.ok()) Raise(s);
  worker->runtime = std::move(runtime);
  worker->self = worker->runtime->agent()->self();
  pycall::SetNodeId(worker->self.id);  // profiled events carry the worker id
  worker->autograd =
      std::make_shared<dist_autograd::LocalAutograd>(worker->runtime->dist_autograd());
  InstallCallee(worker.get());
  // Current before it serves anything (Start()): a peer that finished its own start first may
  // send a call at once, and its handler needs this worker (and tether.rpc's worker registry,
  // which the caller fills in before start()).
  SetCurrentWorker(worker);
  return Workers(*worker);
}

// Starts serving and calling (after connect() and tether.rpc's own registry).
void Start() {
  std::shared_ptr<Worker> w = RequireWorker();
  absl::Status s;
  {
    ScopedGilRelease release;
    s = w->runtime->Start();
  }
  // A second start() of a running worker: only say so.
  if (absl::IsFailedPrecondition(s)) Raise(s);
  if (!s.ok()) {
    SetCurrentWorker(nullptr);
    bool left_behind;
    {
      ScopedGilRelease release;
      left_behind = !w->runtime->Stop().empty();
    }
    if (left_behind) KeepForever(w);  // As in Shutdown().
    Raise(s);
  }
}

// Stops the worker. Graceful: the agent's barrier (agent.h: every worker calls shutdown(), then
// this worker's user RRefs are deleted, then no work may be left anywhere), bounded by `timeout`
// seconds if > 0; otherwise stops at once. Then the network and the threads. Raises if a
// graceful shutdown could not complete.
// `on_wait(elapsed_seconds)`, if not None, is called about every 100 ms (GIL held) while the
// barrier is still pending (real runs only: a simulated run's waits stay as they are); it
// decides itself when to report (tether/rpc/_shutdown.py).
void Shutdown(bool graceful, double timeout, py::object on_wait) {
  std::shared_ptr<Worker> w = RequireWorker();
  absl::Time deadline = timeout > 0 ? absl::Now() + absl::Seconds(timeout) : absl::InfiniteFuture();
  absl::Status status;
  Future<Unit> done(nullptr);
  {
    ScopedGilRelease release;
    done = w->runtime->agent()->Shutdown(graceful);
  }
  bool finished;
  if (on_wait.is_none() || InSimulatedWorker()) {
    finished = WaitInterruptibly(done, deadline, sim::WaitKind::kShutdown);
  } else {
    absl::Time start = absl::Now();
    while (!(finished = WaitInterruptibly(
                 done, std::min(deadline, absl::Now() + absl::Milliseconds(100)))) &&
           absl::Now() < deadline) {
      try {
        on_wait(absl::ToDoubleSeconds(absl::Now() - start));
      } catch (py::error_already_set& e) {
        // A report never breaks the shutdown (Ctrl-C still does).
        if (e.matches(PyExc_KeyboardInterrupt)) throw;
        e.discard_as_unraisable("tether: reporting a waiting shutdown");
      }
    }
  }
  absl::Status barrier =
      finished ? done.result().status()
               : absl::DeadlineExceededError(absl::StrCat(
                     "the graceful shutdown barrier did not complete within ", timeout, " s"));
  status = barrier;
  if (graceful && finished && status.ok()) {
    // After a clean graceful shutdown no reference may remain (a leak).
    std::vector<LeakedRRef> leaks;
    {
      ScopedGilRelease release;  // py_ownership.h rule 5: the RRef context's lock without the GIL
      leaks = w->runtime->rrefs()->Leaks();
    }
    if (!leaks.empty()) {
      std::string text = absl::StrCat("RRef leak on worker '", w->self.name, "': ", leaks.size(),
                                      " reference(s) alive after a graceful shutdown:");
      for (const LeakedRRef& l : leaks) absl::StrAppend(&text, "\n  ", l.ToString());
      if (InSimulatedWorker()) {
        status = RRefLeakError(text);  // Raised as tether._C.RRefLeakError (errors.h).
      } else {
        PySys_WriteStderr("tether: %s\n", text.substr(0, 4000).c_str());
      }
    }
  }
  LastFailedSends() = w->runtime->failed_sends();
  SetCurrentWorker(nullptr);
  bool left_behind;
  {
    ScopedGilRelease release;
    left_behind = !w->runtime->Stop().empty();
    if (!left_behind) w->runtime.reset();
  }
  if (left_behind) {
    // Handler threads stuck in user code were left behind (runtime.h): when they return they may
    // still use the Worker and its Runtime, so both are kept for the life of the process.
    KeepForever(w);
  }
  if (!status.ok() && graceful) {
    // The kind stays data: a barrier past its timeout is a timeout error, a lost peer kUnavailable.
    std::string text = absl::StrCat("RPC shutdown was not graceful: ", status.message());
    // kCancelled would read "RPC is shut down: RPC shutdown was not graceful": a plain error.
    Raise(absl::IsDeadlineExceeded(status) ? RpcTimeoutError(text)
          : absl::IsCancelled(status)      ? absl::UnknownError(text)
          : IsRRefLeak(status)             ? RRefLeakError(text)
                                           : absl::Status(status.code(), text));
  }
}

py::dict ToDict(const std::map<std::string, int64_t>& info, const std::string& prefix) {
  py::dict out;
  for (const auto& [key, value] : info) out[py::str(prefix + key)] = py::str(std::to_string(value));
  return out;
}

// What the graceful barrier waits for, with names: {"pending", "leader", "joined", "aborting",
// "not_joined", "busy"} (agent.h's ShutdownProgress; the last three only on the leader).
py::dict ShutdownProgressInfo() {
  std::shared_ptr<Worker> w = RequireWorker();
  ShutdownProgress p;
  {
    ScopedGilRelease release;
    p = w->runtime->agent()->GetShutdownProgress();
  }
  auto name = [&w](WorkerId id) {
    absl::StatusOr<WorkerInfo> info = w->runtime->agent()->GetWorker(id);
    return info.ok() ? info->name : absl::StrCat("worker id ", id);
  };
  py::dict out;
  out["pending"] = p.pending;
  out["leader"] = name(p.leader);
  out["joined"] = p.joined;
  out["aborting"] = p.aborting;
  py::list not_joined, busy;
  for (WorkerId id : p.not_joined) not_joined.append(name(id));
  for (WorkerId id : p.busy) busy.append(name(id));
  out["not_joined"] = not_joined;
  out["busy"] = busy;
  return out;
}

py::dict AgentDebugInfo() {
  std::shared_ptr<Worker> w = RequireWorker();
  std::map<std::string, int64_t> info;
  {
    ScopedGilRelease release;
    info = w->runtime->agent()->GetDebugInfo();
  }
  info["server_active_async_calls"] = w->server_active_async_calls.load();
  info["thread_pool_size"] = w->runtime->num_worker_threads();
  info["num_idle_threads"] = w->runtime->num_idle_threads();
  if (GilProfiling()) info["gil_average_wait_time_us"] = GilAverageWaitMicros();
  return ToDict(info, "agent.");
}

// PyTorch's _delete_all_user_and_unforked_owner_rrefs: deletes this worker's user RRefs and its
// owners nobody else knows of (rref_context.h), waiting for the owners' acknowledgements within
// `timeout_seconds` (<= 0: no bound).
void DeleteAllUsersAndUnforkedOwners(double timeout_seconds) {
  std::shared_ptr<Worker> w = RequireWorker();
  absl::Duration timeout =
      timeout_seconds <= 0 ? absl::ZeroDuration() : absl::Seconds(timeout_seconds);
  Future<Unit> done = [&] {
    ScopedGilRelease release;  // py_ownership.h rule 5
    return w->runtime->rrefs()->DeleteAllUsersAndUnforkedOwners(timeout, /*then_resume=*/true);
  }();
  WaitInterruptibly(done);
  absl::Status status = done.result().status();
  if (!status.ok()) {
    Raise(absl::Status(status.code(), absl::StrCat("_delete_all_user_and_unforked_owner_rrefs: ",
                                                   status.message())));
  }
}

// PyTorch's _destroy_rref_context: closes the RRef context (from now on RRefs do nothing when
// dropped and RRef messages are refused); unless `ignore_leak`, fails listing the references still
// alive.
void DestroyRRefContext(bool ignore_leak) {
  std::shared_ptr<Worker> w = RequireWorker();
  absl::Status status;
  {
    ScopedGilRelease release;
    status = w->runtime->rrefs()->Close(ignore_leak);
  }
  if (!status.ok()) {
    Raise(RRefLeakError(
        absl::StrCat("Leaking RRef(s) on destroying the RRef context: ", status.message())));
  }
}

py::dict RRefDebugInfo() {
  std::shared_ptr<Worker> w = RequireWorker();
  std::map<std::string, int64_t> info;
  {
    ScopedGilRelease release;
    info = w->runtime->rrefs()->GetDebugInfo();
  }
  return ToDict(info, "");
}

}  // namespace

void RegisterLifecycleBindings(py::module_& m) {
  m.def(
      "_set_hooks",
      [](py::object run_python_call, py::object decode_reply, py::object serialize_value,
         py::object timeout_error) {
        SetHooks(std::move(run_python_call), std::move(decode_reply), std::move(serialize_value),
                 std::move(timeout_error));
      },
      "Installs tether.rpc's Python hooks (once, at import).");
  m.def("listen", &Listen, py::arg("name"), py::arg("rank"), py::arg("num_worker_threads"),
        py::arg("rpc_timeout"), py::arg("auth_token"), py::arg("listen_host"),
        py::arg("fail_types") = std::vector<std::string>(), py::arg("num_fail_sends") = 0,
        py::arg("delays") = std::map<std::string, double>());
  m.def("abandon_listen", &AbandonListen);
  m.def("sim_listen", &SimListen, py::arg("name"), py::arg("rank"), py::arg("world_size"),
        py::arg("num_worker_threads"), py::arg("rpc_timeout"));
  m.def("connect", &Connect, py::arg("workers"));
  m.def("start", &Start);
  m.def("shutdown_progress", &ShutdownProgressInfo);
  m.def("shutdown", &Shutdown, py::arg("graceful"), py::arg("timeout"),
        py::arg("on_wait") = py::none());
  m.def("is_initialized", [] { return CurrentWorker() != nullptr; });
  m.def("workers", [] { return Workers(*RequireWorker()); });
  m.def("self_id", [] { return RequireWorker()->self.id; });
  m.def("get_rpc_timeout",
        [] { return absl::ToDoubleSeconds(RequireWorker()->runtime->agent()->default_timeout()); });
  m.def("set_rpc_timeout", [](double seconds) {
    RequireWorker()->runtime->agent()->set_default_timeout(seconds <= 0 ? absl::ZeroDuration()
                                                                        : absl::Seconds(seconds));
  });
  m.def(
      "failed_sends",
      [] {
        std::shared_ptr<Worker> w = CurrentWorker();
        return w != nullptr ? w->runtime->failed_sends() : LastFailedSends();
      },
      "Sends the FAULTY_TENSORPIPE backend failed on purpose, by message type: the current "
      "worker's, or after shutdown() the last worker's of this process.");
  m.def("agent_debug_info", &AgentDebugInfo);
  m.def("agent_summary", [] {
    std::shared_ptr<Worker> w = RequireWorker();
    ScopedGilRelease release;
    return w->runtime->agent()->Summary();
  });
  m.def("rref_debug_info", &RRefDebugInfo);
  m.def("delete_all_user_and_unforked_owner_rrefs", &DeleteAllUsersAndUnforkedOwners,
        py::arg("timeout_seconds"));
  m.def("destroy_rref_context", &DestroyRRefContext, py::arg("ignore_leak"));
  m.def(
      "set_profiler_node_id", [](int node_id) { pycall::SetNodeId(node_id); }, py::arg("node_id"));
  m.def(
      "enable_server_process_global_profiler",
      [](const torch::profiler::impl::ProfilerConfig& config) {
        pycall::EnableServerProfiler(config);
      },
      py::arg("config"));
  m.def("disable_server_process_global_profiler",
        [] { return ValueOrRaise(pycall::DisableServerProfiler()); });
  m.def("enable_gil_profiling", [](bool on) { SetGilProfiling(on); });
  // Both the hook above and the core's planted branches (core/rref_context.h).
  m.def("planted_bugs_enabled", [] {
#ifdef TETHER_PLANTED_BUGS
    return RRefPlantedBugsCompiledIn();
#else
    return false;
#endif
  });
}

}  // namespace tether
