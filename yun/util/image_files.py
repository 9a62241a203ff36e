"""How an image file is laid out where nodes take it from: ``images/<id>.<format>`` with a
``.sha256`` sidecar holding its checksum.

One layout for the node's image cache, for the images a node fetched onto a shared mount,
and for the images a storage server in shared mode keeps on that mount for the nodes
(F-STO-MODEL): a node finds an image there, already verified, and copies nothing over
the network.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600


def image_file(images_dir: Path, image_id: str, fmt: str) -> Path:
    """The file of image ``image_id`` (format ``fmt``) in ``images_dir``."""
    return images_dir / f"{image_id}.{fmt}"


def sidecar_path(path: Path) -> Path:
    """The checksum sidecar of the image file ``path``."""
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path) -> str | None:
    """The sha256 a sidecar records; None when there is none."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def write_sidecar(path: Path, sha256: str) -> None:
    """Record ``sha256`` in the sidecar ``path`` (atomic: written aside, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(sha256 + "\n")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
