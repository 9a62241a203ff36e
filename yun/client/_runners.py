"""The two executors of calls and ops: one over ``httpx.Client``, one over
``httpx.AsyncClient``. Everything but the waiting is shared."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

from yun.client._core import Call, Sleep, Step
from yun.client.errors import ApiError
from yun.proto import REQUEST_ID_HEADER
from yun.proto.resources import Page

T = TypeVar("T")
M = TypeVar("M")


def error_from_response(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` of a failed answer: its problem document when it is one, else
    a clear account of what came back instead (a proxy's HTML page, say)."""
    request_id = response.headers.get(REQUEST_ID_HEADER)
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("title"), str):
        errors = doc.get("errors")
        return ApiError(response.status_code, doc["title"], str(doc.get("detail") or ""),
                        errors if isinstance(errors, list) else None,
                        request_id or doc.get("request_id"))
    kind = response.headers.get("content-type", "no content type")
    snippet = " ".join(response.text.split())[:300]
    detail = f"the server answered {kind}, not a problem document" + (
        f": {snippet}" if snippet else "")
    return ApiError(response.status_code, response.reason_phrase or "Error", detail,
                    request_id=request_id)


class _Runner:
    """What both runners share: building the request and reading the answer."""

    def __init__(self, base_url: str) -> None:
        # Errors name the gateway as the user knows it, without the API prefix.
        self.base_url = base_url.rstrip("/").removesuffix("/api/v1")

    @staticmethod
    def _request_args(call: Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {
            "params": [(k, v) for k, v in call.params.items() if v is not None],
            "headers": dict(call.headers),
        }
        if call.body is not None:
            # Only what the caller set: a PATCH must not reset the fields it left out.
            args["json"] = call.body.model_dump(mode="json", exclude_unset=True)
        elif call.content is not None:
            args["content"] = call.content
        if call.timeout is not None:
            args["timeout"] = call.timeout
        return args

    @staticmethod
    def _answer(call: Call[T], response: httpx.Response) -> T:
        if not response.is_success:
            raise error_from_response(response)
        return call.decode(response)

    def _unreachable(self, exc: httpx.HTTPError) -> ApiError:
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(0, "Timeout", f"{self.base_url}: no answer in time "
                                          f"({type(exc).__name__})")
        return ApiError(0, "Gateway unreachable", f"{self.base_url}: {exc or type(exc).__name__}")


class SyncRunner(_Runner):
    """Runs calls and ops on an ``httpx.Client``."""

    def __init__(self, http: httpx.Client) -> None:
        super().__init__(str(http.base_url))
        self.http = http

    def send(self, call: Call[T]) -> T:
        """Send one call and decode its answer; raise :class:`ApiError` on failure."""
        try:
            response = self.http.request(call.method, call.path, **self._request_args(call))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(call, response)

    def run(self, step: Step[T]) -> T:
        """The result of a call, or of an op driven to its end."""
        if isinstance(step, Call):
            return self.send(step)
        try:
            request = next(step)
            while True:
                if isinstance(request, Sleep):
                    time.sleep(request.seconds)
                    request = step.send(None)
                else:
                    request = step.send(self.send(request))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            step.close()

    def items(self, call: Call[Page[M]]) -> Iterator[M]:
        """Every item of a list, page after page."""
        while True:
            page = self.send(call)
            yield from page.items
            if not page.next_cursor:
                return
            call = call.with_params(cursor=page.next_cursor, offset=None)


async def _async_chunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    # A file is read in a worker thread so that a slow disk does not stall the event loop.
    iterator = iter(chunks)
    while (chunk := await anyio.to_thread.run_sync(next, iterator, None)) is not None:
        yield chunk


class AsyncRunner(_Runner):
    """Runs calls and ops on an ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        super().__init__(str(http.base_url))
        self.http = http

    async def send(self, call: Call[T]) -> T:
        """Send one call and decode its answer; raise :class:`ApiError` on failure."""
        args = self._request_args(call)
        content = args.get("content")
        if content is not None and not isinstance(content, bytes):
            args["content"] = _async_chunks(content)
        try:
            response = await self.http.request(call.method, call.path, **args)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(call, response)

    async def run(self, step: Step[T]) -> T:
        """The result of a call, or of an op driven to its end."""
        if isinstance(step, Call):
            return await self.send(step)
        try:
            request = next(step)
            while True:
                if isinstance(request, Sleep):
                    await anyio.sleep(request.seconds)
                    request = step.send(None)
                else:
                    request = step.send(await self.send(request))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            step.close()

    async def items(self, call: Call[Page[M]]) -> AsyncIterator[M]:
        """Every item of a list, page after page."""
        while True:
            page = await self.send(call)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            call = call.with_params(cursor=page.next_cursor, offset=None)
