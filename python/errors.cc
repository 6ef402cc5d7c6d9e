#include "python/errors.h"

#include <Python.h>

#include <stdexcept>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "python/process_state.h"
#include "python/py_ownership.h"

namespace py = pybind11;

namespace tether {

absl::Status RRefLeakError(absl::string_view message) {
  absl::Status s = absl::DataLossError(message);
  s.SetPayload(kRRefLeakPayloadUrl, absl::Cord("1"));
  return s;
}

bool IsRRefLeak(const absl::Status& s) {
  return s.code() == absl::StatusCode::kDataLoss && s.GetPayload(kRRefLeakPayloadUrl).has_value();
}

void RegisterErrorBindings(py::module_& m) {
  // Kept as an attribute of the module only (no process-wide pointer): MakeException looks it up.
  PyObject* cls = PyErr_NewExceptionWithDoc(
      "tether._C.RRefLeakError",
      "References still alive after a graceful rpc.shutdown() of a simulated worker "
      "(tether.sim reports it as a leak). A RuntimeError.",
      PyExc_RuntimeError, nullptr);
  if (cls == nullptr) throw py::error_already_set();
  m.attr("RRefLeakError") = py::reinterpret_steal<py::object>(cls);
}

namespace {

// tether._C.RRefLeakError, or RuntimeError if the module is not importable (never expected).
py::object RRefLeakErrorClass() {
  try {
    return py::module_::import("tether._C").attr("RRefLeakError");
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable("tether: looking up tether._C.RRefLeakError");
    return py::reinterpret_borrow<py::object>(PyExc_RuntimeError);
  }
}

}  // namespace

py::object MakeException(const absl::Status& status, const CallContext* ctx) {
  std::string detail(status.message());
  if (IsRRefLeak(status)) return RRefLeakErrorClass()(detail);
  PyObject* type = PyExc_RuntimeError;
  std::string text;
  switch (status.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      type = GetHooks().timeout_error != nullptr ? GetHooks().timeout_error : PyExc_TimeoutError;
      if (IsRpcTimeout(status)) {
        // The agent's own timeout: its text (PyTorch's wording) already says what happened.
        text = ctx != nullptr ? absl::StrCat(detail, " (call to worker '", ctx->to_name, "')")
                              : detail;
      } else if (ctx != nullptr) {
        text = absl::StrCat("RPC ran for more than set timeout (",
                            absl::ToInt64Milliseconds(ctx->timeout),
                            " ms) and will now be marked with an error (", detail, ")");
      } else {
        text =
            absl::StrCat("RPC ran for more than set timeout and will now be marked with an error (",
                         detail, ")");
      }
      break;
    case absl::StatusCode::kCancelled:
      text = absl::StrCat("RPC is shut down: ", detail);
      break;
    case absl::StatusCode::kUnavailable:
      text = ctx != nullptr ? absl::StrCat("RPC to worker '", ctx->to_name, "' failed: ", detail)
                            : detail;
      break;
    default:
      text = detail;
      break;
  }
  py::object cls = py::reinterpret_borrow<py::object>(type);
  return cls(text);
}

void Raise(const absl::Status& status, const CallContext* ctx) {
  py::object exc = MakeException(status, ctx);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

std::exception_ptr RemoteErrorAsTorch(const py::error_already_set& e) {
  if (e.matches(PyExc_ValueError)) return std::make_exception_ptr(py::value_error(e.what()));
  if (e.matches(PyExc_TypeError)) return std::make_exception_ptr(py::type_error(e.what()));
  return std::make_exception_ptr(std::runtime_error(e.what()));
}

}  // namespace tether
