"""Building blocks of the namespaces: lists, ``get``, tags, and following tasks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

from yun.client._core import (
    Call,
    Namespace,
    Op,
    R,
    Sleep,
    accepted_or_none,
    endpoint,
    idempotency,
    list_params,
    model,
    pager,
    path,
    tags,
)
from yun.client.errors import TaskFailed, TaskTimeout
from yun.proto.resources import Accepted, Page, TagsReplace, TagsUpdate, Task, TaskState

M = TypeVar("M")

Wait = bool | float
"""``False``: return what the API answered; ``True``: follow the task for up to
:data:`DEFAULT_WAIT` seconds; a number: follow it for up to that many seconds."""

DEFAULT_WAIT = 900.0
POLL = 30.0  # seconds one ``GET /tasks/{uuid}?wait=`` may hold the connection
FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED})
ACCEPTED = model(Accepted)
TASK = model(Task)


def wait_timeout(wait: Wait) -> float | None:
    """Seconds to follow a task for, or None not to follow it."""
    if wait is True:
        return DEFAULT_WAIT
    return float(wait) if wait else None


def follow(task: Task | str, timeout: float, check: bool = True,
           on_update: Callable[[Task], None] | None = None) -> Op[Task]:
    """Follow a task until it ends, asking the API to hold each poll (``?wait=``).

    Raises :class:`TaskTimeout` when ``timeout`` runs out and, when ``check``,
    :class:`TaskFailed` when it failed."""
    deadline = time.monotonic() + timeout
    current = task if isinstance(task, Task) else None
    task_uuid = task.uuid if isinstance(task, Task) else task
    while current is None or current.state not in FINAL_STATES:
        hold = round(max(0.0, min(deadline - time.monotonic(), POLL)), 1)
        asked = time.monotonic()
        current = yield Call("GET", path("/tasks/{}", task_uuid), TASK,
                             params={"wait": hold}, timeout=hold + 30)
        if on_update is not None:
            on_update(current)
        if current.state in FINAL_STATES:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise TaskTimeout(current, timeout)
        if time.monotonic() - asked < 0.5:
            yield Sleep(min(0.5, left))  # a server that does not hold polls is not hammered
    if check and current.state == TaskState.FAILED:
        raise TaskFailed(current)
    return current


def accepted(call: Call[Accepted], wait: Wait) -> Op[Accepted | Task]:
    """Send a long operation; with ``wait``, follow its task and return it when it ended."""
    answer = yield call
    timeout = wait_timeout(wait)
    if timeout is None or answer.task is None:
        return answer  # type: ignore[no-any-return]
    return (yield from follow(answer.task, timeout))


def maybe_accepted(call: Call[Accepted | None], wait: Wait) -> Op[Accepted | Task | None]:
    """As :func:`accepted` for routes that answer 204 when nothing is left to follow."""
    answer = yield call
    timeout = wait_timeout(wait)
    if timeout is None or answer is None or answer.task is None:
        return answer  # type: ignore[no-any-return]
    return (yield from follow(answer.task, timeout))


def maybe_accepted_call(method: str, url: str, params: Mapping[str, str | None],
                        key: str | None) -> Call[Accepted | None]:
    """The call of a delete that answers 204, or 202 with a task."""
    return Call(method, url, accepted_or_none, params=params, headers=idempotency(key))


class Listable(Namespace[R], Generic[R, M]):
    """A namespace with a paged list at ``_path``."""

    _path: str
    _page: type[Page[M]]

    @endpoint
    def list(self, q: str | None = None, sort: str | None = None, limit: int = 100,
             cursor: str | None = None, offset: int | None = None,
             count: bool = False) -> Call[Page[M]]:
        """One page: ``q`` filters (``state=running and tag:env=prod``), ``sort`` orders
        (``-created_at,name``), ``cursor`` continues after a page (its ``next_cursor``),
        ``count`` asks for ``total``."""
        return Call("GET", self._path, model(self._page),
                    params=list_params(q, sort, limit, cursor, offset, count))

    @pager
    def iterate(self, q: str | None = None, sort: str | None = None,
                page_size: int = 100) -> Call[Page[M]]:
        """Every item matching ``q``, in ``sort`` order, fetched ``page_size`` at a time."""
        return Call("GET", self._path, model(self._page),
                    params=list_params(q, sort, page_size, None, None, False))


class Collection(Listable[R, M]):
    """A list whose items are read one by one at ``_path/{ref}``."""

    _model: type[M]

    @endpoint
    def get(self, ref: str) -> Call[M]:
        """One item by uuid or name."""
        return Call("GET", self._item(ref), model(self._model))

    def _item(self, ref: str, suffix: str = "") -> str:
        return path(self._path + "/{}" + suffix, ref)


class Tags(Namespace[R]):
    """The tags of one kind of resource: ``client.vms.tags.set("web1", {"env": "prod"})``."""

    def __init__(self, runner: R, kind: str) -> None:
        super().__init__(runner)
        self._kind = kind

    def _call(self, method: str, ref: str, body: TagsUpdate | TagsReplace | None = None,
              key: str | None = None) -> Call[dict[str, str]]:
        return Call(method, path(f"/{self._kind}/{{}}/tags", ref), tags, body=body,
                    headers=idempotency(key))

    @endpoint
    def get(self, ref: str) -> Call[dict[str, str]]:
        """Every tag of a resource, the platform's ``sys:`` ones included."""
        return self._call("GET", ref)

    @endpoint
    def set(self, ref: str, values: Mapping[str, str], *,
            idempotency_key: str | None = None) -> Call[dict[str, str]]:
        """Add or change some tags, keeping the others; returns every tag."""
        return self._call("PATCH", ref, TagsUpdate(set=dict(values)), idempotency_key)

    @endpoint
    def remove(self, ref: str, keys: Iterable[str], *,
               idempotency_key: str | None = None) -> Call[dict[str, str]]:
        """Delete some tags; returns the remaining ones."""
        return self._call("PATCH", ref, TagsUpdate(remove=[*keys]), idempotency_key)

    @endpoint
    def update(self, ref: str, spec: TagsUpdate, *,
               idempotency_key: str | None = None) -> Call[dict[str, str]]:
        """Add, change and delete tags in one request."""
        return self._call("PATCH", ref, spec, idempotency_key)

    @endpoint
    def replace(self, ref: str, values: Mapping[str, str], *,
                idempotency_key: str | None = None) -> Call[dict[str, str]]:
        """Make ``values`` the resource's only tags (``sys:`` tags are kept)."""
        return self._call("PUT", ref, TagsReplace(tags=dict(values)), idempotency_key)


class TaggedCollection(Collection[R, M]):
    """A collection whose items carry tags (``.tags``)."""

    def __init__(self, runner: R) -> None:
        super().__init__(runner)
        self.tags: Tags[R] = Tags(runner, self._path.strip("/"))
