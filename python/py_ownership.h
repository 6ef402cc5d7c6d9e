// The extension's one rule for Python objects, in one place.
//
//   1. Every Python reference is created, copied and dropped with the GIL held. C++ code that
//      keeps a Python object beyond a call (in a future's callback, an RRef value, a queue) keeps
//      it as a PyRef, never as a py::object: a PyRef can be dropped on any thread (it takes the
//      GIL to drop its reference if the thread does not hold it).
//   2. A reference is stolen or borrowed exactly once: PyRef steals the reference of the
//      py::object it is made from; get() returns a new reference.
//   3. Destructors of C++ objects that Python instances own (RRef, Responder, Pending) and of
//      PyRef never release the GIL, never block and never throw: they run inside
//      pybind11_object_dealloc, where releasing the GIL lets other threads run in the middle of
//      an interpreter deallocation, and where a C++ exception would unwind through the
//      interpreter's frames (skipping every `with` block's exit: a user's lock stays held).
//   4. The GIL is released around blocking waits and C++-heavy calls into the agent or the RRef
//      context, only in bound functions (never in destructors), with ScopedGilRelease, and taken
//      on pool threads only to run Python, with Gil. Short, non-blocking calls keep it (a small
//      send, GetWorker, set_default_timeout, a Responder's reply), which is safe
//      because of 5.
//   5. No C++ lock (the agent's, the RRef context's, the transport's, a queue's here) is held
//      while taking the GIL: the GIL always comes first. Core and transport never call back
//      into this layer with a lock held, and this layer takes the GIL only outside its own
//      locks. A PyRef dropped on a thread without the GIL takes it, so a PyRef must not be
//      dropped under a C++ lock either (keep the captures of callbacks that core may destroy
//      under its lock free of PyRefs, or drop them after unlocking).
//
// CheckGilHeld() enforces 1 in debug builds (the suite's), at the points where references are
// made, copied or dropped.
#ifndef TETHER_PYTHON_PY_OWNERSHIP_H_
#define TETHER_PYTHON_PY_OWNERSHIP_H_

#include <Python.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/buffer.h"

namespace tether {

// Aborts with `where` if the calling thread does not hold the GIL (debug builds; a no-op with
// NDEBUG).
void CheckGilHeld(const char* where);

// One owned reference to a Python object, safe to drop on any thread.
//
//   auto target = std::make_shared<PyRef>(std::move(fut));   // GIL held
//   future.Then([target](...) { Gil gil; target->get().attr("set_result")(...); });
class PyRef {
 public:
  // Steals `o`'s reference. GIL held.
  explicit PyRef(pybind11::object o);
  // Drops the reference: directly if this thread holds the GIL, else with the GIL taken for
  // it. Leaks it once the interpreter is finalizing. Never throws.
  ~PyRef();
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;

  // A new reference. GIL held.
  pybind11::object get() const;

 private:
  PyObject* obj_;
};

// Takes the GIL on a pool thread (reentrant), recording the wait when GIL profiling is on.
class Gil {
 public:
  Gil();

 private:
  std::optional<pybind11::gil_scoped_acquire> gil_;
};

// Releases the GIL for a blocking or C++-heavy section of a bound function. Not for
// destructors (rule 3).
using ScopedGilRelease = pybind11::gil_scoped_release;

// Releases the GIL only around sends big enough that writing them may take a while. A small
// send only queues or writes a few bytes; releasing the GIL there would hand it to any thread
// waiting for it (a pool thread delivering results) and cost two context switches per call.
class ReleaseGilIfLarge {
 public:
  static constexpr size_t kLargeSend = 256 << 10;
  ReleaseGilIfLarge(const std::string& bytes, const std::vector<Buffer>& buffers);

 private:
  std::optional<pybind11::gil_scoped_release> release_;
};

// GIL profiling (tether.rpc.enable_gil_profiling): pool threads' waits for the GIL.
void SetGilProfiling(bool on);
bool GilProfiling();
// Average wait per acquisition since profiling was first enabled, in microseconds.
int64_t GilAverageWaitMicros();

}  // namespace tether

#endif  // TETHER_PYTHON_PY_OWNERSHIP_H_
