"""Errors as RFC 9457 problem documents, shared by the REST API and the internal protocol."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """An error answer: what went wrong, in words an operator understands."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class YunError(Exception):
    """An error with an HTTP status and a clear message; raised anywhere, answered as a problem."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors

    def problem(self, instance: str | None = None) -> Problem:
        """This error as a problem document."""
        return Problem(
            type=f"https://yun.dev/problems/{self.title.lower().replace(' ', '-')}",
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
        )


class BadRequest(YunError):
    status = 400
    title = "Bad request"


class Unauthorized(YunError):
    status = 401
    title = "Unauthorized"


class Forbidden(YunError):
    status = 403
    title = "Forbidden"


class NotFound(YunError):
    status = 404
    title = "Not found"


class Conflict(YunError):
    status = 409
    title = "Conflict"


class Unprocessable(YunError):
    status = 422
    title = "Invalid request"


class PayloadTooLarge(YunError):
    """A body (an image upload) larger than the receiver's limit."""

    status = 413
    title = "Payload too large"


class InsufficientCapacity(YunError):
    status = 409
    title = "Insufficient capacity"


class Unavailable(YunError):
    status = 503
    title = "Service unavailable"


class PeerError(YunError):
    """Another component answered with an error or could not be reached."""

    status = 502
    title = "Peer error"

    def __init__(
        self, detail: str, *, peer_status: int | None = None, problem: Problem | None = None
    ):
        super().__init__(detail)
        self.peer_status = peer_status
        self.peer_problem = problem


_BY_STATUS: dict[int, type[YunError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    503: Unavailable,
}


def error_from_problem(problem: Problem) -> YunError:
    """Rebuild the error a peer raised, so it travels through a chain of services unchanged."""
    cls = _BY_STATUS.get(problem.status)
    if cls is None:
        return PeerError(
            problem.detail or problem.title, peer_status=problem.status, problem=problem
        )
    err = cls(problem.detail or problem.title, errors=problem.errors)
    # Keep the peer's own title ("Quota exceeded", not the generic "Conflict").
    err.title = problem.title or err.title
    return err
