"""The storage server process (C-STO): image store, internal API, reports to the control servers."""

from __future__ import annotations

import asyncio
import logging

from yun.config import StorageSettings
from yun.proto.components import ComponentType
from yun.proto.errors import Unavailable, YunError
from yun.proto.membership import Membership
from yun.proto.messages import Peer, StorageImageReport
from yun.storage.api import create_storage_app
from yun.storage.store import ImageStore
from yun.util.lifecycle import wait_set
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.storage")


class StorageService:
    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        if settings.mode == "shared":
            # On the shared mount itself, so that publishing an image for the nodes is a
            # hard link, not a copy (F-STO-MODEL: copies stay inside shared storage).
            assert settings.shared_storage is not None  # checked by StorageSettings
            self.store = ImageStore(settings.shared_storage / "storage-server",
                                    publish_dir=settings.shared_storage / "images")
        else:
            self.store = ImageStore(settings.state_dir / "storage")
        self.membership = Membership(settings, ComponentType.STORAGE, url="")
        app = create_storage_app(self.store, self.membership.verifier, self._report_stored,
                                 settings.max_upload_bytes, mode=settings.mode)
        self.server = AppServer(app, settings.listen_host, settings.listen_port)
        self.url = self.membership.url = service_url(settings, self.server.port)

    async def _control_peers(self) -> list[Peer]:
        """The control servers this server knows; when it knows none yet (it joined the
        domain before any control server did, and learns of them at its next heartbeat),
        wait up to two heartbeats for one rather than refuse the upload at once."""
        controls = self.membership.peers_of(ComponentType.CONTROL)
        if controls:
            return controls
        learned = asyncio.Event()

        def changed(added: list[Peer], _removed: list[Peer]) -> None:
            if any(p.type == ComponentType.CONTROL for p in added):
                learned.set()

        self.membership.on_peers_changed(changed)
        try:
            await wait_set(learned, 2 * self.settings.heartbeat_interval)
        finally:
            self.membership.remove_peers_callback(changed)
        return self.membership.peers_of(ComponentType.CONTROL)

    async def _report_stored(self, report: StorageImageReport) -> None:
        """Tell a control server the bytes are here, so the image becomes usable."""
        controls = await self._control_peers()
        for peer in controls:
            try:
                await self.membership.client(peer).request(
                    "POST", f"/internal/v1/images/{report.image_id}/stored", body=report)
                return
            except YunError as exc:
                log.warning("control server did not take the image report: %s", exc,
                            extra={"image": report.image_id, "control": peer.component_id})
        raise Unavailable(f"no control server recorded image {report.image_id}")

    async def start(self) -> None:
        await self.membership.start()
        await self.server.start(self.membership.serving_tls())
        log.info("storage server ready", extra={"url": self.url, "mode": self.settings.mode,
                                                "component": self.membership.component_id})

    async def stop(self) -> None:
        await self.server.stop()
        await self.membership.stop()
