"""The two ways a request ends without a result: refused (`ClientError`, with the HTTP
status to answer) or stopped because nobody wants it any more (`Stopped`)."""

from __future__ import annotations


class ClientError(Exception):
    """A request the server refuses or stops: `status` (4xx; 503 when busy, 504 past the
    request timeout), a message for the client and, for 503, a Retry-After."""

    def __init__(self, message: str, status: int = 422, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class Stopped(Exception):
    """A generation stopped because none of its requests is still wanted."""
