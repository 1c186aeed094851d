"""Outbound HTTP for jobs: `guard` decides which addresses a request may reach, `client` sends it to exactly those.

The errors live here so that the guard and the client raise the same ones.
"""

from __future__ import annotations

from jobs.executors.base import ExecutorError, OutcomeUnknown

__all__ = ["AnswerLost", "BlockedAddress", "HttpRequestError"]


class HttpRequestError(ExecutorError):
    """The request failed: connection, timeout, redirect or status."""


class BlockedAddress(HttpRequestError):
    """The URL leads to an address that jobs may not reach."""


class AnswerLost(HttpRequestError, OutcomeUnknown):
    """The request may have reached the receiver, but no whole answer came back."""
