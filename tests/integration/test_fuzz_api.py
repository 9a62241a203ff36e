"""Schemathesis against the running gateway's own OpenAPI document, with a real token:
every route, generated valid and invalid input; no answer may be a 5xx, and every answer
must be a status, media type and body the document promises.

The cluster runs on its own event loop in a thread, because schemathesis calls the API
synchronously from the test's thread.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode, checks

from yun.testing.cluster import SimCluster

MAX_EXAMPLES = 25
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]


class ThreadedCluster:
    """A SimCluster on an event loop of its own thread."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.cluster = SimCluster(root, nodes=2)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self, image: Path) -> None:
        self.thread.start()
        self.run(self.cluster.start())
        # Something to find: an image and a VM of the admin's project.
        self.run(self._seed(image))

    async def _seed(self, image: Path) -> None:
        api = self.cluster.api
        assert api is not None
        data = await asyncio.to_thread(image.read_bytes)
        resp = await api.post("/api/v1/images", params={"name": "fuzz-img"}, content=data,
                              headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.text
        resp = await api.post("/api/v1/vms", params={"wait": 30},
                              json={"name": "fuzz-vm", "image": "fuzz-img"})
        assert resp.status_code == 202, resp.text

    def stop(self) -> None:
        try:
            self.run(self.cluster.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedCluster]:
    root = tmp_path_factory.mktemp("fuzz")
    image = root / "fuzz.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    threaded = ThreadedCluster(root)
    threaded.start(image)
    try:
        yield threaded
    finally:
        threaded.stop()


SENT: list[int] = []


def _fuzz(operation: Any, mode: Any, url: str, token: str) -> str | None:
    """Run generated cases of one operation; the first failure's description, or None."""
    failures: list[str] = []

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def run(case: Any) -> None:
        if failures:
            return
        SENT.append(1)
        try:
            case.call_and_validate(base_url=url, checks=CHECKS, timeout=60,
                                   headers={"Authorization": f"Bearer {token}"})
        except Exception as exc:  # every check failure, described with its request
            failures.append(f"{operation.label} [{mode.value}]: {exc}"[:3000])

    run()
    return failures[0] if failures else None


def test_every_route_answers_as_documented(running: ThreadedCluster) -> None:
    cluster = running.cluster
    assert cluster.gateway is not None
    url = cluster.gateway.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # Invalid data may also be refused as too large: a generated string far past its
    # max_length can make the body exceed the gateway's 1 MiB limit before validation.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 50, [op.label for op in operations]
    failures = [failure for op in operations for mode in GenerationMode
                if (failure := _fuzz(op, mode, url, cluster.token))]
    assert not failures, "\n\n".join(failures)
    # Most operations get many distinct cases (some have only a few possible inputs).
    assert len(SENT) >= 10 * len(operations), len(SENT)
