#include "python/process_state.h"

#include <stdexcept>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "python/py_ownership.h"

namespace py = pybind11;

namespace tether {
namespace {

Hooks g_hooks;  // Written once at import, before any worker exists.

absl::Mutex g_worker_mu(absl::kConstInit);
std::shared_ptr<Worker>* g_worker ABSL_GUARDED_BY(g_worker_mu) =
    new std::shared_ptr<Worker>();  // Never freed: pool threads may look late.

std::unique_ptr<Runtime>* g_listening = new std::unique_ptr<Runtime>();  // GIL-guarded.
auto* g_kept = new std::vector<std::shared_ptr<Worker>>();               // GIL-guarded.

}  // namespace

void SetHooks(py::object run_python_call, py::object decode_reply, py::object serialize_value,
              py::object timeout_error) {
  CheckGilHeld("SetHooks");
  g_hooks.run_python_call = run_python_call.release().ptr();
  g_hooks.decode_reply = decode_reply.release().ptr();
  g_hooks.serialize_value = serialize_value.release().ptr();
  g_hooks.timeout_error = timeout_error.release().ptr();
}

const Hooks& GetHooks() { return g_hooks; }

std::shared_ptr<Worker> CurrentWorker() {
  absl::MutexLock lock(&g_worker_mu);
  return *g_worker;
}

void SetCurrentWorker(std::shared_ptr<Worker> w) {
  absl::MutexLock lock(&g_worker_mu);
  *g_worker = std::move(w);
}

std::shared_ptr<Worker> RequireWorker() {
  std::shared_ptr<Worker> w = CurrentWorker();
  if (w == nullptr) {
    throw std::runtime_error("RPC has not been initialized. Call tether.rpc.init_rpc first.");
  }
  return w;
}

std::unique_ptr<Runtime>& ListeningRuntime() {
  CheckGilHeld("ListeningRuntime");
  return *g_listening;
}

void KeepForever(std::shared_ptr<Worker> w) {
  CheckGilHeld("KeepForever");
  g_kept->push_back(std::move(w));
}

std::optional<absl::Duration> ToTimeout(double seconds) {
  if (seconds < 0) return std::nullopt;
  return absl::Seconds(seconds);
}

}  // namespace tether
