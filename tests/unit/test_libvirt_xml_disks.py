"""Libvirt domain XML for CD drives, the cloud-init seed, boot order and disk hot-plug
(pure functions: no libvirt connection)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from yun.node.hypervisor.base import SEED_DISK_ID, ResolvedDisk
from yun.node.hypervisor.libvirt.xml import (
    attached_disks,
    backup_xml,
    build_domain_xml,
    cdrom_image,
    disk_target,
    disk_targets,
    media_xml,
    new_disk_xml,
    next_disk_target,
    parse_domain_xml,
    with_disk,
    with_media,
    without_disk,
)
from yun.proto.messages import DomainSpec, QosSpec

UUID = "6b1f0b2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
IMAGE = "9d2c1b4e-0000-4000-8000-00000000abcd"
ROOT = ResolvedDisk("root", Path("/srv/vol/root.qcow2"), "qcow2")
ISO = ResolvedDisk("cdrom", Path(f"/srv/images/{IMAGE}.iso"), "raw", device="cdrom",
                   read_only=True)
SEED = ResolvedDisk(SEED_DISK_ID, Path("/srv/vms/seed.iso"), "raw", device="cdrom",
                    read_only=True)


def xml_of(disks: list[ResolvedDisk], **fields: object) -> str:
    values: dict[str, object] = {"uuid": UUID, "name": "web-1", "vcpus": 1, "memory_mb": 256}
    values.update(fields)
    return build_domain_xml(DomainSpec(**values), disks, [], accel="tcg",  # type: ignore[arg-type]
                            console_log=Path("/tmp/c.log"))


def by_target(xml: str) -> dict[str, ET.Element]:
    return {d.find("target").get("dev"): d  # type: ignore[union-attr]
            for d in ET.fromstring(xml).findall("devices/disk")}


def test_cd_drives_are_read_only_ide_with_the_iso_first() -> None:
    # The seed given first still comes after the ISO drive: BIOS boots the first CD.
    xml = xml_of([ROOT, SEED, ISO])
    disks = by_target(xml)
    assert list(disks) == ["vda", "hdc", "hdd"]
    iso, seed = disks["hdc"], disks["hdd"]
    for el in (iso, seed):
        assert el.get("device") == "cdrom" and el.find("readonly") is not None
        assert el.find("target").get("bus") == "ide"  # type: ignore[union-attr]
        assert el.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert iso.find("source").get("file") == str(ISO.path)  # type: ignore[union-attr]
    assert seed.find("source").get("file") == str(SEED.path)  # type: ignore[union-attr]
    parsed = parse_domain_xml(xml)
    assert parsed is not None
    assert parsed.disks == {"root": "vda", "cdrom": "hdc", SEED_DISK_ID: "hdd"}
    assert attached_disks(parsed) == ["root"] and cdrom_image(parsed) == IMAGE


def test_empty_cd_drive_has_no_source_and_no_image() -> None:
    xml = xml_of([ROOT, ResolvedDisk("cdrom", None, "raw", device="cdrom"), SEED])
    assert by_target(xml)["hdc"].find("source") is None
    parsed = parse_domain_xml(xml)
    assert parsed is not None and cdrom_image(parsed) is None  # the seed is no image


def test_ide_disks_keep_their_targets_beside_cd_drives() -> None:
    ide = ResolvedDisk("old", Path("/x.raw"), "raw", bus="ide")
    assert disk_targets([ide, ISO, SEED]) == [("hda", "ide"), ("hdc", "ide"), ("hdd", "ide")]
    many = [ResolvedDisk(f"i{n}", Path("/x"), "raw", bus="ide") for n in range(3)]
    with pytest.raises(ValueError, match="IDE bus has room for 4"):
        disk_targets([*many, ISO, SEED])


def test_boot_order_follows_spec_boot() -> None:
    def boots(xml: str) -> list[str | None]:
        return [b.get("dev") for b in ET.fromstring(xml).findall("os/boot")]

    assert boots(xml_of([ROOT, ISO])) == ["hd"]
    assert boots(xml_of([ROOT, ISO], boot="cdrom")) == ["cdrom", "hd"]
    with pytest.raises(ValueError, match="needs a CD drive"):
        xml_of([ROOT, SEED], boot="cdrom")  # the seed is no boot medium


def test_read_only_and_shared_disks() -> None:
    ro = ResolvedDisk("base", Path("/b.qcow2"), "qcow2", read_only=True)
    shared = ResolvedDisk("sh", Path("/mnt/shared/v.qcow2"), "qcow2", shared=True)
    disks = by_target(xml_of([ROOT, ro, shared]))
    assert disks["vdb"].find("readonly") is not None
    # QEMU's image locking is what keeps another node off a shared volume: nothing may
    # lift it (<shareable/> would), and a writable disk is not read-only.
    for el in disks.values():
        assert el.find("shareable") is None
    assert disks["vdc"].find("readonly") is None
    with pytest.raises(ValueError, match="only a CD drive may be empty"):
        xml_of([ResolvedDisk("root", None, "qcow2")])


def test_hot_plugged_disk_takes_the_next_free_target_and_is_recorded() -> None:
    xml = xml_of([ROOT, ISO], qos=QosSpec(read_iops_sec=500))
    assert next_disk_target([xml]) == "vdb"
    data = ResolvedDisk("vol-1", Path("/srv/vol/v1.qcow2"), "qcow2")
    plugged = with_disk(xml, data, "vdb", cache="none")
    assert with_disk(plugged, data, "vdb", cache="none").count("v1.qcow2") == 1  # idempotent
    el = by_target(plugged)["vdb"]
    assert el.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert el.findtext("iotune/read_iops_sec") == "500"  # the domain's disk limits
    parsed = parse_domain_xml(plugged)
    assert parsed is not None and attached_disks(parsed) == ["root", "vol-1"]
    assert disk_target(plugged, "vol-1") == "vdb"
    # A target recorded in the live XML only (plugged live, definition not yet written)
    # is not reused.
    assert next_disk_target([xml, plugged]) == "vdc"
    device = ET.fromstring(new_disk_xml(data, "vdc", cache="writeback", qos=QosSpec()))
    assert device.find("driver").get("cache") == "writeback"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="CD drive"):
        new_disk_xml(ISO, "vdc", cache="none", qos=QosSpec())
    unplugged = without_disk(plugged, "vol-1")
    assert "vdb" not in by_target(unplugged) and disk_target(unplugged, "vol-1") is None
    assert next_disk_target([unplugged]) == "vdb"  # a freed target is taken again


def test_media_change_and_eject() -> None:
    xml = xml_of([ROOT, ISO, SEED])
    ejected = ET.fromstring(media_xml(xml, "cdrom", None))
    assert ejected.find("source") is None and ejected.find("target").get("dev") == "hdc"  # type: ignore[union-attr]
    defined = with_media(xml, "cdrom", Path("/srv/images/other.iso"))
    parsed = parse_domain_xml(defined)
    assert parsed is not None and cdrom_image(parsed) == "other"
    assert by_target(defined)["hdd"].find("source").get("file") == str(SEED.path)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not a CD drive"):
        media_xml(xml, "root", None)
    with pytest.raises(ValueError, match="no CD drive 'nope'"):
        media_xml(xml, "nope", None)


def test_backup_copies_only_the_asked_disk() -> None:
    data = ResolvedDisk("vol", Path("/v.qcow2"), "qcow2")
    doc = ET.fromstring(backup_xml(xml_of([ROOT, data, ISO]), "vdb", Path("/out/c.qcow2")))
    assert doc.get("mode") == "push"
    disks = {d.get("name"): d for d in doc.findall("disks/disk")}
    assert disks["vdb"].get("backup") == "yes"
    assert disks["vdb"].find("target").get("file") == "/out/c.qcow2"  # type: ignore[union-attr]
    assert disks["vdb"].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks["vda"].get("backup") == "no" and disks["hdc"].get("backup") == "no"
