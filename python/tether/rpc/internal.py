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
import io
import pickle
import sys
import threading
import traceback

import torch

from tether import _C

_tls = threading.local()


class RemoteException:
    """An exception raised by a remote function, as it travels back: its type (by reference)
    and a message with the remote worker and traceback. `reraise()` raises it as its type."""

    __slots__ = ("msg", "exception_type")

    def __init__(self, msg, exception_type):
        self.msg = msg
        self.exception_type = exception_type

    def __reduce__(self):
        return (RemoteException, (self.msg, self.exception_type))

    def make(self):
        try:
            exc = self.exception_type(self.msg)
            if not isinstance(exc, BaseException):
                raise TypeError
            return exc
        except Exception:
            return RuntimeError(f"{getattr(self.exception_type, '__name__', '?')}: {self.msg}")

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


def _reduce_rref(rref):
    return (_rref_from_descriptor, (rref._fork(_send_peer()),))


def _serialize_rref(rref):
    """RRef._serialize(): forks `rref` for the worker the value being pickled goes to and returns
    the fork as PyTorch's tuple (owner, rref id's worker and counter, fork id's worker and
    counter, parent, type name). Only while pickling for an RPC (a reducer of a custom class)."""
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


def serialize(obj, peer):
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


def _remote_exception(exc):
    msg = f"On {_worker_text()}:\n{exc!r}\n{''.join(traceback.format_exception(exc))}"
    return RemoteException(msg, type(exc))


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
        return _finish(responder, _remote_exception(e), True, caller)
    if not async_execution:
        return _finish(responder, result, False, caller)
    if not isinstance(result, torch._C.Future):
        return _finish(
            responder,
            _remote_exception(
                TypeError(
                    "Functions decorated with @rpc.functions.async_execution must return a "
                    f"torch.futures.Future object, but got {type(result)}"
                )
            ),
            True,
            caller,
        )

    def done(fut):
        try:
            value = fut.wait()
        except Exception as e:
            return _finish(responder, _remote_exception(e), True, caller)
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
        return _finish(responder, _remote_exception(err), True, caller)
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
        value.reraise()
    return value


def _serialize_value(value, is_exception, peer):
    """An owner value as a fetch by worker `peer` gets it: RRefs inside it are forked for `peer`."""
    return serialize(value, peer)
