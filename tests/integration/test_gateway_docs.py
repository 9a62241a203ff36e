"""The gateway's API documentation."""

from __future__ import annotations

import httpx

from yun.testing.cluster import SimCluster


async def test_api_docs_are_served_without_a_cdn(cluster: SimCluster) -> None:
    assert cluster.gateway is not None
    async with httpx.AsyncClient(base_url=cluster.gateway.url) as http:
        page = (await http.get("/docs")).text
        assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        assert (await http.get("/docs-assets/swagger-ui-bundle.js")).status_code == 200
        spec = (await http.get("/openapi.json")).json()
        assert "/api/v1/vms" in spec["paths"]
