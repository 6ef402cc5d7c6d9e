#include "python/py_ownership.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>

namespace py = pybind11;

namespace tether {
namespace {

// Process-wide (python/process_state.h lists them): the interpreter's one GIL, measured from any
// thread.
std::atomic<bool> g_gil_profiling{false};
std::atomic<int64_t> g_gil_wait_ns{0};
std::atomic<int64_t> g_gil_acquisitions{0};

bool Finalizing() { return !Py_IsInitialized() || _Py_IsFinalizing(); }

}  // namespace

void CheckGilHeld(const char* where) {
#ifndef NDEBUG
  if (!Finalizing() && PyGILState_Check() == 0) {
    std::fprintf(stderr, "tether: a Python reference was touched without the GIL (%s)\n", where);
    std::abort();
  }
#else
  (void)where;
#endif
}

PyRef::PyRef(py::object o) : obj_(o.release().ptr()) { CheckGilHeld("PyRef()"); }

PyRef::~PyRef() {
  if (obj_ == nullptr || Finalizing()) return;
  try {
    if (PyGILState_Check() != 0) {
      Py_DECREF(obj_);
    } else {
      py::gil_scoped_acquire gil;
      Py_DECREF(obj_);
    }
  } catch (const std::exception& e) {
    // A deallocation that threw (pybind11 does for a corrupted instance): never past here.
    std::fprintf(stderr, "tether: error while dropping a Python reference: %s\n", e.what());
  }
}

py::object PyRef::get() const {
  CheckGilHeld("PyRef::get()");
  return py::reinterpret_borrow<py::object>(obj_);
}

Gil::Gil() {
  if (!g_gil_profiling.load(std::memory_order_relaxed)) {
    gil_.emplace();
    return;
  }
  auto start = std::chrono::steady_clock::now();
  gil_.emplace();
  auto waited = std::chrono::steady_clock::now() - start;
  g_gil_wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count();
  ++g_gil_acquisitions;
}

ReleaseGilIfLarge::ReleaseGilIfLarge(const std::string& bytes, const std::vector<Buffer>& buffers) {
  size_t total = bytes.size();
  for (const Buffer& b : buffers) total += b.size();
  if (total > kLargeSend) release_.emplace();
}

void SetGilProfiling(bool on) { g_gil_profiling = on; }
bool GilProfiling() { return g_gil_profiling.load(); }
int64_t GilAverageWaitMicros() {
  int64_t n = g_gil_acquisitions.load();
  return n == 0 ? 0 : g_gil_wait_ns.load() / n / 1000;
}

}  // namespace tether
