#include "python/sim_bindings.h"

#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "sim/fault_spec.h"
#include "sim/process/child.h"
#include "sim/process/host.h"

namespace py = pybind11;

namespace tether {
namespace {

// Process-wide state, listed in python/process_state.h: the simulated worker's runtime, one per
// forked tether.sim process; set once by sim_child_create (GIL held), never reset (the process
// ends with os._exit).
std::unique_ptr<sim::ChildRuntime> g_child;

sim::ChildRuntime& RequireChild() {
  if (g_child == nullptr) {
    throw std::runtime_error("this process is not a tether.sim worker");
  }
  return *g_child;
}

sim::FaultSpec ParseFaults(const std::string& spec) {
  absl::StatusOr<sim::FaultSpec> f = sim::FaultSpec::Parse(spec);
  if (!f.ok()) {
    throw py::value_error(absl::StrCat("bad fault spec '", spec, "': ", f.status().message()));
  }
  return *std::move(f);
}

py::dict RunHost(std::vector<int> fds, uint64_t seed, const std::string& faults,
                 double time_limit_s, uint64_t max_events, bool fifo, bool record_trace) {
  sim::ProcessHostOptions o;
  o.num_workers = static_cast<int>(fds.size());
  o.seed = seed;
  o.faults = ParseFaults(faults);
  absl::Status valid = o.faults.Validate(o.num_workers);
  if (!valid.ok()) throw py::value_error(std::string(valid.message()));
  o.time_limit = absl::Seconds(time_limit_s);
  o.max_events = max_events;
  o.order = fifo ? sim::RunOrder::kFifo : sim::RunOrder::kRandom;
  o.record_trace = record_trace;
  sim::ProcessRunResult r;
  {
    py::gil_scoped_release release;
    sim::ProcessHost host(o, fds);
    r = host.Run();
  }
  py::list workers;
  for (const sim::WorkerOutcome& w : r.workers) {
    py::dict d;
    d["name"] = w.name;
    d["main_done"] = w.main_done;
    d["ok"] = w.ok;
    d["error"] = w.error;
    d["error_kind"] = w.error_kind;
    d["crashed"] = w.crashed;
    d["lost"] = w.lost;
    d["blocked"] = w.blocked;
    d["blocked_in_shutdown"] = w.blocked_in_shutdown;
    workers.append(d);
  }
  py::list trace;
  for (const sim::TraceEvent& e : r.trace) trace.append(py::make_tuple(e.worker, e.json));
  py::dict out;
  out["workers"] = workers;
  out["hang"] = r.hang;
  out["trace_hash"] = r.trace_hash;
  out["elapsed"] = absl::ToDoubleSeconds(r.elapsed);
  out["events"] = r.events;
  out["plan"] = r.plan;
  out["trace"] = trace;
  return out;
}

}  // namespace

bool InSimulatedWorker() { return g_child != nullptr; }
void SetSimWorkerThreads(int n) { RequireChild().set_max_task_threads(n); }
Clock* SimWorkerClock() { return RequireChild().clock(); }
Executor* SimWorkerExecutor() { return RequireChild().executor(); }
Network* SimWorkerNetwork() { return RequireChild().network(); }

bool SimWaitUntil(const std::function<bool()>& ready, absl::Time deadline,
                  const std::string& where, sim::WaitKind kind) {
  sim::ChildRuntime& rt = RequireChild();
  if (ready()) return true;
  bool expired = false;
  std::optional<TimerId> timer;
  if (deadline != absl::InfiniteFuture()) {
    timer = rt.clock()->Schedule(deadline, [&expired] { expired = true; });
  }
  absl::Status s = rt.BlockUntil([&] { return expired || ready(); }, where, kind);
  if (timer && !expired) rt.clock()->Cancel(*timer);
  if (!s.ok()) throw std::runtime_error(std::string(s.message()));
  return ready();
}

void RegisterSimBindings(py::module& m) {
  m.def(
      "sim_parse_faults", [](const std::string& spec) { return ParseFaults(spec).ToString(); },
      py::arg("spec"), "Canonical text of a fault spec; ValueError naming a bad token.");
  m.def("sim_host_run", &RunHost, py::arg("fds"), py::arg("seed"), py::arg("faults"),
        py::arg("time_limit"), py::arg("max_events"), py::arg("fifo") = false,
        py::arg("record_trace") = false,
        "Runs the simulated world over worker processes linked by `fds` (closed by the host).");
  m.def("sim_in_worker", &InSimulatedWorker);
  m.def(
      "sim_child_create",
      [](int fd, int rank, int threads) {
        if (g_child != nullptr) throw std::runtime_error("already a tether.sim worker");
        g_child = sim::ChildRuntime::Create(fd, rank, threads).value();
      },
      py::arg("fd"), py::arg("rank"), py::arg("max_task_threads"));
  m.def("sim_child_wait_for_start", [] {
    sim::ChildRuntime& rt = RequireChild();
    py::gil_scoped_release release;
    rt.WaitForStart();
  });
  m.def(
      "sim_child_main_done",
      [](bool ok, const std::string& text, const std::string& error_kind) {
        sim::ChildRuntime& rt = RequireChild();
        py::gil_scoped_release release;
        rt.MainDone(ok, text, error_kind);
      },
      py::arg("ok"), py::arg("text"), py::arg("error_kind") = "",
      "Reports how the worker's main ended: `error_kind` is the kind of failure as data (what "
      "tether.sim classifies by), `text` the report.");
  m.def(
      "sim_register",
      [](const std::string& name) {
        sim::ChildRuntime& rt = RequireChild();
        absl::StatusOr<std::vector<std::string>> names;
        {
          py::gil_scoped_release release;
          names = rt.Register(name);
        }
        if (!names.ok()) throw std::runtime_error(std::string(names.status().message()));
        return *names;
      },
      py::arg("name"));
  m.def(
      "sim_block_until",
      [](py::object ready, const std::string& where, double timeout) {
        RequireChild();
        // ready() also runs on the simulator's controller thread: what it raises is kept and
        // raised here, on the waiting thread (an exception must not leave the controller).
        std::optional<py::error_already_set> error;
        auto check = [&ready, &error] {
          py::gil_scoped_acquire gil;
          if (error) return true;
          try {
            return ready().cast<bool>();
          } catch (py::error_already_set& e) {
            error.emplace(std::move(e));
          } catch (const py::cast_error&) {
            PyErr_SetString(PyExc_TypeError, "sim_block_until: ready() must return a bool");
            error.emplace();
          }
          return true;
        };
        absl::Time deadline =
            timeout < 0 ? absl::InfiniteFuture() : SimWorkerClock()->Now() + absl::Seconds(timeout);
        bool done;
        {
          py::gil_scoped_release release;
          done = SimWaitUntil(check, deadline, where);
        }
        if (error) throw std::move(*error);
        return done;
      },
      py::arg("ready"), py::arg("where"), py::arg("timeout") = -1.0,
      "Yields to the simulator until ready() is true (or `timeout` virtual seconds pass).");
  m.def(
      "sim_sleep",
      [](double seconds) {
        Clock* clock = SimWorkerClock();
        absl::Time until = clock->Now() + absl::Seconds(std::max(0.0, seconds));
        py::gil_scoped_release release;
        SimWaitUntil([] { return false; }, until, absl::StrCat("time.sleep(", seconds, ")"));
      },
      py::arg("seconds"));
  m.def("sim_now",
        [] { return absl::ToDoubleSeconds(SimWorkerClock()->Now() - absl::UnixEpoch()); });
  m.def(
      "sim_trace", [](const std::string& json) { RequireChild().Trace(json); }, py::arg("json"));
}

}  // namespace tether
