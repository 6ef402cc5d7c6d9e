"""`async_execution`: a function that returns a Future, whose value is the reply."""
import functools


def async_execution(fn):
    r"""Marks ``fn`` as returning a :class:`torch.futures.Future`: the callee replies when that
    future completes, without holding a thread while it waits (so nested RPCs cannot exhaust the
    thread pool). Use it as the innermost decorator under ``@staticmethod``/``@classmethod``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper._wrapped_async_rpc_function = fn  # type: ignore[attr-defined]
    return wrapper
