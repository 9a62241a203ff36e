"""How the SDK describes a call once for both the sync and the async client.

A namespace method builds a :class:`Call` (one request: method, quoted path, query, body,
how to decode the answer) or an :data:`Op`, a generator that yields calls (and
:class:`Sleep`) and receives their decoded answers, for operations of several requests
such as waiting for a task. The :func:`endpoint` and :func:`pager` decorators turn such a
method into one that runs it on the namespace's runner: the sync runner returns the
result, the async runner a coroutine. Each method is thus written, typed and documented
once, and mypy sees ``T`` on :class:`~yun.client.Client` and ``Awaitable[T]`` on
:class:`~yun.client.AsyncClient`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Self,
    TypeVar,
    overload,
)
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from yun.client.errors import ApiError, InvalidReference
from yun.proto.resources import Accepted, Page

if TYPE_CHECKING:
    from yun.client._runners import AsyncRunner, SyncRunner

T = TypeVar("T")
M = TypeVar("M")
P = ParamSpec("P")
R = TypeVar("R")

QueryValue = str | int | float | bool | None
Decode = Callable[[httpx.Response], T]
Content = bytes | Iterable[bytes]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request of the API and how to read its answer.

    ``path`` is relative to ``/api/v1`` and already quoted (see :func:`path`); ``params``
    whose value is None are not sent; ``body`` is sent as JSON, ``content`` as raw bytes
    (an iterable is streamed)."""

    method: str
    path: str
    decode: Decode[T]
    params: Mapping[str, QueryValue] = field(default_factory=dict)
    body: BaseModel | None = None
    content: Content | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | httpx.Timeout | None = None

    def with_params(self, **params: QueryValue) -> Call[T]:
        """The same call with some query parameters changed (None removes one)."""
        return replace(self, params={**self.params, **params})


@dataclass(frozen=True)
class Sleep:
    """Yielded by an :data:`Op` to pause (``time.sleep`` or ``anyio.sleep``)."""

    seconds: float


Op = Generator["Call[Any] | Sleep", Any, T]
"""A multi-request operation: yields calls and pauses, receives answers, returns ``T``."""

Step = Call[T] | Op[T]


def path(template: str, *values: str) -> str:
    """``template`` with each ``{}`` replaced by a value quoted as one path segment, so a
    ``/`` or ``?`` in a name cannot change which route is called."""
    for value in values:
        if value in ("", ".", ".."):
            raise InvalidReference(f"{value!r} is not a uuid or a name")
    return template.format(*(quote(v, safe="") for v in values))


def idempotency(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` header when a key is given."""
    return {"Idempotency-Key": key} if key is not None else {}


def list_params(q: str | None, sort: str | None, limit: int, cursor: str | None,
                offset: int | None, count: bool) -> dict[str, QueryValue]:
    """The query parameters every list endpoint takes."""
    return {"q": q, "sort": sort, "limit": limit, "cursor": cursor, "offset": offset,
            "count": "true" if count else None}


# --- decoders ------------------------------------------------------------------------


def _validated(response: httpx.Response, read: Callable[[bytes], T]) -> T:
    try:
        return read(response.content)
    except (ValidationError, ValueError) as exc:
        raise ApiError(response.status_code, "Unexpected answer",
                       f"{response.request.method} {response.request.url.path}: {exc}"
                       ) from exc


def model(cls: type[M]) -> Decode[M]:
    """Decode a JSON answer into ``cls`` (a Pydantic model or any type Pydantic knows)."""
    adapter: TypeAdapter[M] | None = _ADAPTERS.get(cls)
    if adapter is None:  # building an adapter costs more than a request's decoding
        adapter = _ADAPTERS.setdefault(cls, TypeAdapter(cls))
    return lambda response: _validated(response, adapter.validate_json)


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def nothing(response: httpx.Response) -> None:
    """An answer without a body (204)."""


def text(response: httpx.Response) -> str:
    """A text/plain answer."""
    return response.text


def any_json(response: httpx.Response) -> Any:
    """Whatever the answer is: JSON decoded, text, or None when empty."""
    if not response.content:
        return None
    if response.headers.get("content-type", "").startswith("text/"):
        return response.text
    return _validated(response, json.loads)


def tags(response: httpx.Response) -> dict[str, str]:
    """The ``{"tags": {...}}`` answer of the tag routes. Read as a plain mapping: it holds
    the platform's ``sys:`` tags too, which the input models refuse."""
    return _validated(response, _TAGS.validate_json)["tags"]


def accepted_or_none(response: httpx.Response) -> Accepted | None:
    """202 ``Accepted`` (work was started) or 204 (done at once)."""
    return None if response.status_code == 204 else _ACCEPTED(response)


_TAGS: TypeAdapter[dict[str, dict[str, str]]] = TypeAdapter(dict[str, dict[str, str]])
_ACCEPTED = model(Accepted)


# --- binding methods to a runner -----------------------------------------------------


class Namespace(Generic[R]):
    """A group of API calls (``client.vms``…) bound to one runner (sync or async)."""

    def __init__(self, runner: R) -> None:
        self._runner = runner


class Endpoint(Generic[P, T]):
    """A namespace method that builds a call or an op; see :func:`endpoint`."""

    def __init__(self, build: Callable[Concatenate[Any, P], Step[T]]) -> None:
        self.build = build
        functools.update_wrapper(self, build)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: Namespace[SyncRunner], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: Namespace[AsyncRunner],
                owner: type) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, obj: Namespace[Any] | None, owner: type) -> Any:
        if obj is None:
            return self
        build, runner = self.build, obj._runner

        @functools.wraps(build)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return runner.run(build(obj, *args, **kwargs))

        return bound


class Pager(Generic[P, M]):
    """A namespace method that builds the call of a list's first page; bound, it yields
    every item of every page, following ``next_cursor``. See :func:`pager`."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[Page[M]]]) -> None:
        self.build = build
        functools.update_wrapper(self, build)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: Namespace[SyncRunner], owner: type) -> Callable[P, Iterator[M]]: ...
    @overload
    def __get__(self, obj: Namespace[AsyncRunner],
                owner: type) -> Callable[P, AsyncIterator[M]]: ...

    def __get__(self, obj: Namespace[Any] | None, owner: type) -> Any:
        if obj is None:
            return self
        build, runner = self.build, obj._runner

        @functools.wraps(build)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return runner.items(build(obj, *args, **kwargs))

        return bound


def endpoint(build: Callable[Concatenate[Any, P], Step[T]]) -> Endpoint[P, T]:
    """Decorate a namespace method returning a :class:`Call` or an :data:`Op` of ``T``:
    on a sync client it returns ``T``, on an async one an awaitable of ``T``."""
    return Endpoint(build)


def pager(build: Callable[Concatenate[Any, P], Call[Page[M]]]) -> Pager[P, M]:
    """Decorate a namespace method returning the call of a list's first page: on a sync
    client it returns an iterator over every item, on an async one an async iterator."""
    return Pager(build)
