"""Waiting for a condition instead of sleeping for a guessed time before a check."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.01) -> T:
    """Poll ``condition()`` until it returns something true, and return that; fail the test after
    ``timeout`` seconds (generous: it only bounds a hang, a healthy run waits milliseconds)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:g} s: {condition.__doc__ or condition}")
        time.sleep(interval)
    return value
