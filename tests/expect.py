"""The one check of a refused call that e2e tests share: its gRPC code, stable reason, and words of its message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from memos import MemosError


def expect(call: Callable[[], Any], code: str, reason: str, *words: str) -> MemosError:
    """``call`` raises a MemosError with status ``code`` (its name) and ``reason``, its message holding ``words``."""
    with pytest.raises(MemosError) as caught:
        call()
    error = caught.value
    assert (error.code.name, error.reason) == (code, reason), error
    for word in words:
        assert word in error.message, error.message
    return error
