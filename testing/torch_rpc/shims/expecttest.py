"""A stand-in for the `expecttest` package, which PyTorch's test utilities import
(torch/testing/_internal/common_utils.py) and Debian does not package.

Only used when the real package is missing (this directory goes last on the path). The RPC tests
never call `assertExpectedInline`; it is here so a test that does fails clearly rather than with
an AttributeError.
"""
import unittest

ACCEPT = False


class TestCase(unittest.TestCase):
    def assertExpectedInline(self, actual, expect, skip=0):  # noqa: N802 (expecttest's name)
        raise NotImplementedError("expecttest is not installed: assertExpectedInline is unavailable")
