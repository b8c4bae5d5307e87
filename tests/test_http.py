"""How errors of the HTTP stack are classified: retried, or reported at once."""

from __future__ import annotations

import socket

import pytest
import requests

from ckpt_tools.errors import HubError
from ckpt_tools.http import RetryPolicy, Transient, as_transient, with_retries


def _unresolved() -> requests.ConnectionError:
    """What requests raises for a host name that does not resolve (the gaierror down its chain)."""
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as inner:
            raise requests.ConnectionError("Max retries exceeded") from inner
    except requests.ConnectionError as outer:
        return outer


def test_a_host_name_that_does_not_resolve_is_not_retried():
    calls = []

    def call():
        calls.append(1)
        raise _unresolved()

    with pytest.raises(HubError):
        with_retries(call, RetryPolicy(attempts=5, base_delay=0), "GET")
    assert len(calls) == 1


def test_a_host_name_that_does_not_resolve_names_hf_endpoint():
    with pytest.raises(HubError, match="HF_ENDPOINT"):
        as_transient(_unresolved())


def test_a_refused_connection_is_retried():
    assert isinstance(as_transient(requests.ConnectionError("Connection refused")), Transient)
