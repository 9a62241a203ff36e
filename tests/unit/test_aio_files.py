"""What `yun aio up` writes: each secret in a 0600 file of its own, a settings file with
no secret in it, and the CLI's token in the user's profiles file (0600) only."""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from yun.cli import config as cfg
from yun.cli.aio import save_aio_profile, write_config
from yun.config import ControlSettings, DomainSettings, NodeSettings, load_settings
from yun.proto.identity import IssuedToken


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def etc(tmp_path: Path) -> Iterator[Path]:
    old = os.umask(0o022)  # a root shell's usual umask
    try:
        yield tmp_path / "etc-yun"
    finally:
        os.umask(old)


def write(etc: Path) -> dict:
    return write_config(etc / "yun.toml", secret_file=etc / "domain-secret",
                        password_file=etc / "admin-password")


def test_each_secret_has_its_own_private_file(etc: Path) -> None:
    write(etc)
    secret = (etc / "domain-secret").read_text().strip()
    password = (etc / "admin-password").read_text().strip()
    assert secret and password
    assert mode(etc / "domain-secret") == 0o600 and mode(etc / "admin-password") == 0o600
    text = (etc / "yun.toml").read_text()
    assert secret not in text and password not in text
    assert "domain_secret =" not in text and "token" not in tomllib.loads(text)["cli"]
    assert mode(etc / "yun.toml") == 0o644  # holds no secret: the CLI may read [cli]
    # Every service reads the secret through the setting.
    for cls, section in ((DomainSettings, "domain"), (ControlSettings, "control"),
                         (NodeSettings, "node")):
        assert load_settings(cls, section, etc / "yun.toml").domain_secret == secret


def test_running_it_again_keeps_the_secrets(etc: Path) -> None:
    write(etc)
    before = {name: (etc / name).read_text() for name in ("domain-secret", "admin-password")}
    (etc / "yun.toml").write_text((etc / "yun.toml").read_text().replace(
        'accel = "auto"', 'accel = "tcg"'))  # an operator's edit
    write(etc)
    after = {name: (etc / name).read_text() for name in ("domain-secret", "admin-password")}
    assert after == before
    assert 'accel = "tcg"' in (etc / "yun.toml").read_text()


def test_an_older_settings_file_gives_up_its_secret(etc: Path) -> None:
    etc.mkdir()
    (etc / "yun.toml").write_text('[common]\ndomain_name = "aio"\ndomain_secret = "OLD-SECRET"\n'
                                  '[gateway]\nadmin_token = "OLD-TOKEN"\n')
    (etc / "yun.toml").chmod(0o600)
    write(etc)
    assert (etc / "domain-secret").read_text().strip() == "OLD-SECRET"  # VMs' nodes keep it
    text = (etc / "yun.toml").read_text()
    assert "OLD-SECRET" not in text and "OLD-TOKEN" not in text
    assert load_settings(NodeSettings, "node", etc / "yun.toml").domain_secret == "OLD-SECRET"


def test_a_secret_file_left_open_is_closed_again(etc: Path) -> None:
    write(etc)
    (etc / "domain-secret").chmod(0o644)
    write(etc)
    assert mode(etc / "domain-secret") == 0o600


def test_the_cli_token_goes_to_the_profiles_file_only(etc: Path, tmp_path: Path) -> None:
    write(etc)
    issued = IssuedToken(uuid="tok-1", token="ADMIN-TOKEN", user_uuid="u", user_name="admin",
                         project_uuid="p", project_name="default",
                         created_at=datetime.now(UTC),
                         expires_at=datetime.now(UTC) + timedelta(hours=1))
    profiles = tmp_path / "home" / ".config" / "yun" / "config.toml"
    assert save_aio_profile("http://127.0.0.1:8080", issued, profiles) == profiles
    assert mode(profiles) == 0o600 and mode(profiles.parent) == 0o700
    stored = cfg.load_profiles(profiles)
    assert stored.current == "aio" and stored.profiles["aio"].token == "ADMIN-TOKEN"
    for name in ("yun.toml", "domain-secret", "admin-password"):
        assert "ADMIN-TOKEN" not in (etc / name).read_text()
    # The domain secret is not in the profiles file either.
    assert (etc / "domain-secret").read_text().strip() not in profiles.read_text()
