"""How a request ends without a result: refused (`ClientError`, with the HTTP status to
answer), stopped because nobody wants it any more (`Stopped`), or failed on the server
(`ServerError`: a fixed message that says what failed, never the exception's own text,
which is logged on the replica and travels as `__cause__`)."""

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


class ServerError(Exception):
    """A request that failed on the server; `message` is what the client is told."""

    message = "the request failed on the server"
    status = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message is not None:
            self.message = message


class SamplingFailed(ServerError):
    """This request's own denoising step (its forward pass, its commit, its callback)
    raised; the other requests it shared the step with go on."""

    message = "the request's sampling failed"


class DecodingFailed(ServerError):
    """Turning this request's finished ids into text, image or speech raised."""

    message = "decoding the request's output failed"


class SchedulerStopped(ServerError):
    """The replica's step scheduler is not running (it failed, or the replica is
    shutting down): retry, another replica (or this one, replaced) will serve it."""

    message = "this replica's scheduler stopped; retry"
    status = 503
