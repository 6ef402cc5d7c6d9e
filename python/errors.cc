#include "python/errors.h"

#include <Python.h>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "python/process_state.h"
#include "python/py_ownership.h"

namespace py = pybind11;

namespace tether {

py::object MakeException(const absl::Status& status, const CallContext* ctx) {
  std::string detail(status.message());
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

}  // namespace tether
