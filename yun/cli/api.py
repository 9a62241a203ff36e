"""The CLI's client of the public REST API."""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from yun.config import DEFAULT_CONFIG

CLI_CONFIG = Path(os.environ.get("YUN_CONFIG", DEFAULT_CONFIG))


class ApiError(RuntimeError):
    """The API refused a request; the message is the problem's detail."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")
        self.status = status


def api_settings() -> tuple[str, str]:
    """(url, token) from YUN_API_URL/YUN_API_TOKEN or the [cli] table of the config file."""
    url = os.environ.get("YUN_API_URL")
    token = os.environ.get("YUN_API_TOKEN")
    if (url is None or token is None) and CLI_CONFIG.exists():
        cli = tomllib.loads(CLI_CONFIG.read_text()).get("cli", {})
        url = url or cli.get("api_url")
        token = token or cli.get("token")
    return (url or "http://127.0.0.1:8080").rstrip("/"), token or ""


class Api:
    def __init__(self, url: str | None = None, token: str | None = None,
                 timeout: float = 60.0) -> None:
        default_url, default_token = api_settings()
        self.url = (url or default_url).rstrip("/")
        self.token = token if token is not None else default_token
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.token}"})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, f"/api/v1{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, "Gateway unreachable", f"{self.url}: {exc}") from exc
        if resp.is_success:
            if resp.headers.get("content-type", "").startswith("text/plain"):
                return resp.text
            if resp.status_code == 204 or not resp.content:
                return None
            return resp.json()
        try:
            problem = resp.json()
            raise ApiError(resp.status_code, problem.get("title", "Error"),
                           problem.get("detail", ""))
        except ValueError:
            raise ApiError(resp.status_code, "Error", resp.text[:300]) from None

    def wait_task(self, task_uuid: str, timeout: float = 600.0,
                  on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow a task until it ends; return its last state."""
        deadline = time.monotonic() + timeout
        while True:
            task: dict[str, Any] = self.request("GET", f"/tasks/{task_uuid}",
                                                params={"wait": 2})
            if on_update is not None:
                on_update(task)
            if task["state"] in ("succeeded", "failed"):
                return task
            if time.monotonic() > deadline:
                raise ApiError(0, "Timeout", f"task {task_uuid} still {task['state']}")

    def upload(self, path: Path, name: str, fmt: str | None,
               progress: Callable[[int], None]) -> Any:
        """Stream ``path`` to the API as the body of an image upload."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    progress(len(chunk))
                    yield chunk

        params = {"name": name}
        if fmt:
            params["format"] = fmt
        return self.request("POST", "/images", params=params, content=chunks(),
                            headers={"Content-Type": "application/octet-stream"},
                            timeout=httpx.Timeout(60.0, read=3600.0, write=3600.0))
