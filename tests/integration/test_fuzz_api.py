"""Schemathesis against the running gateway's own OpenAPI document, with a real token:
every route, generated valid and invalid input; no answer may be a 5xx, and every answer
must be a status, media type and body the document promises.

The cloud runs as separate processes (:class:`~yun.testing.procs.ProcCloud`): its work
goes on the other core while schemathesis generates the next cases in this one. In one
process, on a thread of its own, it shared the interpreter lock with the generator, and
the test took the sum of both (124 s on this machine).

Operations are fuzzed two at a time, each in a worker process of its own. Not threads:
Hypothesis's strategy caches are not thread-safe, and two operations fuzzed on two threads
once failed with a ``KeyError`` inside ``hypothesis/internal/cache.py``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode, checks

from yun.testing.procs import ProcCloud

MAX_EXAMPLES = 25
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]


def _seed(cloud: ProcCloud, image: Path) -> None:
    """Something to find: an image and a VM of the admin's project."""
    with httpx.Client(base_url=cloud.gateway_url, timeout=120,
                      headers={"Authorization": f"Bearer {cloud.token}"}) as api:
        resp = api.post("/api/v1/images", params={"name": "fuzz-img"},
                        content=image.read_bytes(),
                        headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.text
        resp = api.post("/api/v1/vms", params={"wait": 30},
                        json={"name": "fuzz-vm", "image": "fuzz-img"})
        assert resp.status_code == 202, resp.text


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCloud]:
    root = tmp_path_factory.mktemp("fuzz")
    image = root / "fuzz.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    # The presence timings of a real deployment, not the chaos test's short ones: the
    # fuzzer keeps the machine busy, and a node must not be seen gone meanwhile.
    cloud = ProcCloud(nodes=2, root=root / "cloud", heartbeat_interval=1.0, ttl=4.0)
    asyncio.run(cloud.start())
    try:
        _seed(cloud, image)
        yield cloud
    except BaseException:
        print(cloud.logs())
        raise
    finally:
        cloud.close()


class _Worker:
    """What a fuzzing worker process keeps between its jobs: the schema, loaded once."""

    operations: list[Any] = []
    url = ""
    token = ""


def _load_operations(url: str) -> list[Any]:
    """The gateway's operations, with the rejection statuses its size limit adds."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # Invalid data may also be refused as too large: a generated string far past its
    # max_length can make the body exceed the gateway's 1 MiB limit before validation.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return [result.ok() for result in schema.get_all_operations()]


def _start_worker(url: str, token: str) -> None:
    _Worker.operations = _load_operations(url)
    _Worker.url, _Worker.token = url, token


def _fuzz(index: int, mode_value: str) -> tuple[str | None, int]:
    """Run generated cases of one operation (by its index in the document) in a worker:
    the first failure's description or None, and how many cases were sent."""
    operation, mode = _Worker.operations[index], GenerationMode(mode_value)
    failures: list[str] = []
    sent = 0

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    def run(case: Any) -> None:
        nonlocal sent
        if failures:
            return
        sent += 1
        try:
            case.call_and_validate(base_url=_Worker.url, checks=CHECKS, timeout=60,
                                   headers={"Authorization": f"Bearer {_Worker.token}"})
        # Every check failure, described with its request. Several come as a FailureGroup,
        # which is a BaseExceptionGroup and no Exception.
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label} [{mode.value}]: {exc}"[:3000])

    try:
        run()
    except (Exception, BaseExceptionGroup) as exc:  # Hypothesis' own errors, as a string:
        failures.append(f"{operation.label} [{mode.value}]: {exc}"[:3000])  # it pickles
    return (failures[0] if failures else None), sent


def test_every_route_answers_as_documented(running: ProcCloud) -> None:
    url = running.gateway_url
    operations = _load_operations(url)
    assert len(operations) >= 50, [op.label for op in operations]
    jobs = [(index, mode.value) for index in range(len(operations)) for mode in GenerationMode]
    # Spawned, not forked: fresh interpreters share none of this one's state or locks.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(url, running.token)) as pool:
        found = list(pool.map(_fuzz, *zip(*jobs, strict=True)))
    failures = [failure for failure, _ in found if failure]
    assert not failures, "\n\n".join(failures)
    # Most operations get many distinct cases (some have only a few possible inputs).
    sent = sum(count for _, count in found)
    assert sent >= 10 * len(operations), sent
