"""The pickling of Python calls and the callee's side of them.

A Python call travels as a pickle (functions and classes by reference, as `pickle` does) plus a
list of tensors that travel out of band: the pickler replaces every tensor by its index in that
list, and the extension turns the list into buffers that alias the tensors' storage. RRefs inside
arguments or results are replaced by fork descriptors for the worker they go to.

Hooks called by the extension (tether._C), on its thread pool, with the GIL:
- _run_python_call(responder, pickle, tensors, async_execution, caller)
- _decode_reply(pickle, tensors, is_exception, sender)
- _serialize_value(value, is_exception, peer)
"""
import collections
import copyreg
import enum
import io
import pickle
import re
import sys
import threading
import traceback

import torch

from tether import _C

_tls = threading.local()


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[ntr\\'\"])")


def _unescape(text):
    """Undoes the backslash escapes of a repr (as PyTorch's unicode_escape decoding does for
    ASCII), leaving every other character as it is: unlike that decoding, non-ASCII text
    survives."""
    def one(m):
        e = m.group(1)
        return _ESCAPES[e] if len(e) == 1 else chr(int(e[1:], 16))
    return _ESCAPE.sub(one, text)


class RemoteException:
    """An exception raised by a remote function, as it travels back: its type (by reference)
    and a message with the remote worker and traceback (escapes in it, such as the ``\\n`` of
    the exception's repr, are undone when it is raised, as PyTorch undoes them). `reraise()`
    raises it as its type."""

    __slots__ = ("msg", "exception_type")

    def __init__(self, msg, exception_type):
        self.msg = msg
        self.exception_type = exception_type

    def __reduce__(self):
        return (RemoteException, (self.msg, self.exception_type))

    def make(self):
        msg = _unescape(self.msg)
        try:
            exc = self.exception_type(msg)
            if not isinstance(exc, BaseException):
                raise TypeError
            return exc
        except Exception:
            # A type that cannot be made from a message (PyTorch raises the constructor's error,
            # losing the remote one).
            return RuntimeError(f"{getattr(self.exception_type, '__name__', '?')}: {msg}")

    def reraise(self):
        raise self.make()


# A Python call travels as the plain tuple (func, args, kwargs): cheaper to pickle than a class.
PythonUDF = collections.namedtuple("PythonUDF", ["func", "args", "kwargs"])


def _tensor_from_table(index):
    return _tls.recv_tensors[index]


def _reduce_tensor(tensor):
    table = _tls.send_tensors
    table.append(tensor)
    return (_tensor_from_table, (len(table) - 1,))


def _rref_from_descriptor(descriptor):
    sender = getattr(_tls, "recv_peer", None)
    if sender is None:
        raise RuntimeError("an RRef can only be received inside an RPC")
    rref = _C.receive_rref(descriptor, sender)
    _tls.recv_rrefs.append(rref)
    return rref


def _send_peer():
    peer = getattr(_tls, "send_peer", None)
    if peer is None:
        raise RuntimeError(
            "Can not pickle rref in python pickler, rref can only be pickled when using RPC"
        )
    return peer


def _check_created(rref):
    """Raises the creation error of a user RRef whose rpc.remote() failed: forking it (as an
    argument, or by _serialize()) fails with it first, as in PyTorch ("RRef creation ...")."""
    if rref.is_owner() or rref.confirmed_by_owner():
        return
    settled = []
    _C.on_confirmed([rref], settled.append)  # called at once if the creation has settled
    if settled and settled[0] is not None:
        raise settled[0]


def _reduce_rref(rref):
    _check_created(rref)
    return (_rref_from_descriptor, (rref._fork(_send_peer()),))


def _serialize_rref(rref):
    """RRef._serialize(): forks `rref` for the worker the value being pickled goes to and returns
    the fork as PyTorch's tuple (owner, rref id's worker and counter, fork id's worker and
    counter, parent, type name). Only while pickling for an RPC (a reducer of a custom class)."""
    _check_created(rref)
    return rref._fork_fields(_send_peer())


def _deserialize_rref(fields):
    """RRef._deserialize(fields): the RRef that _serialize() forked for this worker, while
    unpickling what the sender sent."""
    sender = getattr(_tls, "recv_peer", None)
    if sender is None:
        raise RuntimeError("an RRef can only be received inside an RPC")
    rref = _C.receive_rref_fields(tuple(fields), sender)
    _tls.recv_rrefs.append(rref)
    return rref


_dispatch_table = copyreg.dispatch_table.copy()
_dispatch_table[torch.Tensor] = _reduce_tensor
_dispatch_table[_C.RRef] = _reduce_rref


class _Pickler(pickle.Pickler):
    dispatch_table = _dispatch_table


def serialize(obj, peer=None):
    """Returns (pickle, tensors) for sending `obj` to worker `peer` (None: no RRefs allowed)."""
    # A fresh Pickler per call: pool threads get a new Python thread state each time they take the
    # GIL, so per-thread caches would not survive anyway (and reusing a Pickler across them
    # crashed the interpreter).
    old_tensors = getattr(_tls, "send_tensors", None)
    old_peer = getattr(_tls, "send_peer", None)
    tensors = _tls.send_tensors = []
    _tls.send_peer = peer
    try:
        f = io.BytesIO()
        _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return f.getvalue(), tensors
    finally:
        _tls.send_tensors = old_tensors
        _tls.send_peer = old_peer


def deserialize(data, tensors, peer):
    """Returns (obj, rrefs received) from what `peer` sent."""
    old = (
        getattr(_tls, "recv_tensors", None),
        getattr(_tls, "recv_peer", None),
        getattr(_tls, "recv_rrefs", None),
    )
    _tls.recv_tensors = tensors
    _tls.recv_peer = peer
    _tls.recv_rrefs = []
    try:
        obj = pickle.loads(data)
        return obj, _tls.recv_rrefs
    finally:
        _tls.recv_tensors, _tls.recv_peer, _tls.recv_rrefs = old


_self_name = None


def _worker_text():
    from . import api

    try:
        return repr(api.get_worker_info())
    except Exception:
        return "WorkerInfo(?)"


def _remote_exception(exc, log=False):
    msg = f"On {_worker_text()}:\n{exc!r}\n{''.join(traceback.format_exception(exc))}"
    if log:  # a function's own exception is logged where it ran, as PyTorch logs it
        print(msg, file=sys.stderr)
    return RemoteException(msg, type(exc))


def _reply_error(responder, text):
    """Answers with a failure that the caller raises as RuntimeError(text), not naming this
    worker (PyTorch's way for an async_execution function's wrong result or failed future); a
    remote()'s value is created, holding it (its to_here() raises it)."""
    if responder.is_remote:
        # Escaped, so that the unescaping of RemoteException.make() gives the text back.
        responder.set_value(
            RemoteException(text.encode("unicode_escape").decode("ascii"), RuntimeError), True
        )
    else:
        responder.fail(text, on_worker=False)


def _finish(responder, value, is_exception, caller):
    if responder.is_remote:
        responder.set_value(value, is_exception)
        return
    try:
        data, tensors = serialize(value, caller)
    except Exception as e:
        if is_exception:
            # The exception's type cannot be pickled (a local class): send it as RuntimeError.
            value = RemoteException(
                f"{value.exception_type.__qualname__}: {value.msg}", RuntimeError
            )
        else:
            value = _remote_exception(e)
        is_exception = True
        data, tensors = serialize(value, caller)
    responder.reply(data, tensors, is_exception)


def _run_udf(responder, udf, async_execution, caller, error):
    try:
        if error is not None:
            raise error
        func, args, kwargs = udf
        result = func(*args, **kwargs)
    except Exception as e:
        return _finish(responder, _remote_exception(e, log=True), True, caller)
    if not async_execution:
        return _finish(responder, result, False, caller)
    if not isinstance(result, torch._C.Future):
        kind = type(result)
        return _reply_error(
            responder,
            "Functions decorated with @rpc.async_function must return a torch.futures.Future "
            f"object, but got {kind.__module__}.{kind.__qualname__}",
        )

    def done(fut):
        text = _C.future_error_text(fut)
        if text is not None:
            # Failed as a future fails (a failed call, a raising then() callback): PyTorch
            # replies with the error's text.
            return _reply_error(responder, text)
        try:
            value = fut.wait()
        except Exception as e:  # set_exception(): PyTorch would reply with e as the value
            return _finish(responder, _remote_exception(e, log=True), True, caller)
        _finish(responder, value, False, caller)

    result.add_done_callback(done)


def _run_python_call(responder, data, tensors, async_execution, caller):
    try:
        udf, rrefs = deserialize(data, tensors, caller)
    except AttributeError as e:
        err = AttributeError(
            f"{e} Default RPC pickler does not serialize function code. Ensure that UDFs are "
            "defined on both caller and callee modules."
        )
        return _finish(responder, _remote_exception(err, log=True), True, caller)
    except Exception as e:
        return _finish(responder, _remote_exception(e), True, caller)
    if rrefs:
        # Run the function only once every RRef argument is confirmed by its owner.
        _C.on_confirmed(rrefs, lambda error: _run_udf(responder, udf, async_execution, caller, error))
    else:
        _run_udf(responder, udf, async_execution, caller, None)


def _decode_reply(data, tensors, is_exception, sender):
    value, _ = deserialize(data, tensors, sender)
    if is_exception:
        # Raised here, in the hook itself: the caller's future carries it as PyTorch carries it
        # (python/errors.h RemoteErrorAsTorch), with this frame as its "At:".
        raise value.make()
    return value


def _serialize_value(value, is_exception, peer):
    """An owner value as a fetch by worker `peer` gets it: RRefs inside it are forked for `peer`."""
    return serialize(value, peer)


# --- PyTorch's internal names (torch.distributed.rpc.internal) ----------------------------------

class RPCExecMode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    ASYNC_JIT = "async_jit"
    REMOTE = "remote"


def _build_rpc_profiling_key(exec_type, func_name, current_worker_name, dst_worker_name):
    """The name of a call's profiler event: ``rpc_sync#func(worker0 -> worker1)``."""
    return f"rpc_{exec_type.value}#{func_name}({current_worker_name} -> {dst_worker_name})"


class _InternalRPCPickler:
    r"""torch.distributed.rpc's pickler interface over Tether's pickling: ``serialize(obj)``
    returns ``(pickle, tensors)`` with the tensors out of band, ``deserialize(pickle, tensors)``
    the object. Subclass it (override ``_tensor_reducer``, ``_rref_reducer``, or
    ``_register_reducer(cls, reducer)``) and pass an instance to ``api._use_rpc_pickler`` to pickle
    Python calls with it; what it makes is unpickled on the callee as usual, so its reducers must
    name functions the callee can import. RRefs pickle only while a call is being sent (the
    fork is made for its destination)."""

    def __init__(self):
        self._dispatch_table = copyreg.dispatch_table.copy()
        self._dispatch_table[torch.Tensor] = self._tensor_reducer
        self._class_reducer_dict = {}

    def _register_reducer(self, obj_class, reducer):
        # As PyTorch: the first reducer registered for a class stays.
        if obj_class not in self._class_reducer_dict:
            self._class_reducer_dict[obj_class] = reducer

    @classmethod
    def _tensor_receiver(cls, tensor_index):
        return _tensor_from_table(tensor_index)

    def _tensor_reducer(self, tensor):
        return _reduce_tensor(tensor)

    @classmethod
    def _py_rref_receiver(cls, rref_fork_data):
        return _rref_from_descriptor(rref_fork_data)

    def _py_rref_reducer(self, py_rref):
        return _reduce_rref(py_rref)

    def _rref_reducer(self, rref):
        return self._py_rref_reducer(rref)

    @classmethod
    def _script_module_receiver(cls, script_module_serialized):
        return torch.jit.load(io.BytesIO(script_module_serialized))

    def _script_module_reducer(self, script_module):
        f = io.BytesIO()
        torch.jit.save(script_module, f)
        return (_InternalRPCPickler._script_module_receiver, (f.getvalue(),))

    def serialize(self, obj):
        table = self._dispatch_table.copy()
        table[_C.RRef] = self._rref_reducer
        if isinstance(obj, torch.jit.ScriptModule):
            table[obj.__class__] = self._script_module_reducer
        table.update(self._class_reducer_dict)
        old_tensors = getattr(_tls, "send_tensors", None)
        tensors = _tls.send_tensors = []
        try:
            f = io.BytesIO()
            p = pickle.Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
            p.dispatch_table = table
            p.dump(obj)
            return f.getvalue(), tensors
        finally:
            _tls.send_tensors = old_tensors

    def deserialize(self, binary_data, tensor_table):
        """The object; RRefs in it are received from the worker whose call is being received
        (outside one they cannot be). A function or class the unpickler cannot find comes back
        as an AttributeError (returned, not raised), as in PyTorch."""
        old = (getattr(_tls, "recv_tensors", None), getattr(_tls, "recv_rrefs", None))
        _tls.recv_tensors = tensor_table
        if old[1] is None:
            _tls.recv_rrefs = []
        try:
            return pickle.loads(binary_data)
        except AttributeError as e:
            err = AttributeError(
                f"{e} Default RPC pickler does not serialize function code. Ensure that UDFs "
                "are defined on both caller and callee modules."
            )
            err.__cause__ = e
            return err
        finally:
            _tls.recv_tensors, _tls.recv_rrefs = old


# Made once, as in PyTorch (api._default_pickler is this one outside _use_rpc_pickler).
_internal_rpc_pickler = _InternalRPCPickler()


def _serialize_with(pickler, obj, peer):
    """(pickle, tensors) of `obj` for worker `peer` made by a program's pickler (_use_rpc_pickler):
    RRefs in it are forked for `peer`."""
    old_peer = getattr(_tls, "send_peer", None)
    _tls.send_peer = peer
    try:
        data, tensors = pickler.serialize(obj)
    finally:
        _tls.send_peer = old_peer
    return data, list(tensors)
