"""What the SDK raises: the API's problem answers, and tasks that failed or did not end."""

from __future__ import annotations

from typing import Any

from yun.proto.resources import Task


class ClientError(Exception):
    """Base of every error the SDK raises on purpose."""


class InvalidReference(ClientError, ValueError):
    """A path parameter that would not name one resource: empty, ``.`` or ``..`` would
    change which route is called once the URL is normalised."""


class ApiError(ClientError):
    """The API refused a request (an RFC 9457 problem answer), answered something that is
    not one, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, title: str, detail: str = "",
                 errors: list[dict[str, Any]] | None = None,
                 request_id: str | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.request_id = request_id
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")


class TaskFailed(ClientError):
    """A long operation the caller waited for ended in failure; ``task`` says why."""

    def __init__(self, task: Task) -> None:
        self.task = task
        super().__init__(f"task {task.uuid} ({task.kind}) failed: {task.error or 'no detail'}")


class TaskTimeout(ClientError):
    """A waited-for task had not ended when the wait ran out; ``task`` is its last state."""

    def __init__(self, task: Task, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task.uuid} ({task.kind}) still {task.state.value} "
                         f"after {timeout:g} s")
