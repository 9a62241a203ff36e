"""``domain_secret_file``: the domain secret kept in a file of its own, readable by the
services alone, so that the settings file holds no secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from yun.config import ConfigError, ControlSettings, NodeSettings, load_settings


def settings_file(tmp_path: Path, secret_file: Path) -> Path:
    path = tmp_path / "yun.toml"
    path.write_text(f'[common]\ndomain_name = "d"\ndomain_secret_file = "{secret_file}"\n'
                    '[node]\nhypervisor = "sim"\n')
    return path


def secret_file(tmp_path: Path, text: str = "s3cret-value\n", mode: int = 0o600) -> Path:
    path = tmp_path / "domain-secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_secret_is_read_from_its_file(tmp_path: Path) -> None:
    config = settings_file(tmp_path, secret_file(tmp_path))
    settings = load_settings(NodeSettings, "node", config)
    assert settings.domain_secret == "s3cret-value"  # the trailing newline is not part of it
    assert "s3cret" not in config.read_text()


def test_a_secret_given_directly_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings_file(tmp_path, secret_file(tmp_path))
    monkeypatch.setenv("YUN_DOMAIN_SECRET", "from-env")
    assert load_settings(ControlSettings, "control", config).domain_secret == "from-env"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as info:
        load_settings(NodeSettings, "node", settings_file(tmp_path, path))
    message = str(info.value)
    assert "[node] domain_secret_file" in message and str(path) in message
    assert f"{mode:04o}" in message and "chmod 600" in message


def test_a_missing_or_empty_secret_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"domain_secret_file: {missing} does not exist"):
        load_settings(NodeSettings, "node", settings_file(tmp_path, missing))
    empty = secret_file(tmp_path, text=" \n")
    with pytest.raises(ConfigError, match=rf"domain_secret_file: {empty} is empty"):
        load_settings(NodeSettings, "node", settings_file(tmp_path, empty))
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_settings(NodeSettings, "node", settings_file(tmp_path, tmp_path))


def test_the_file_can_come_from_the_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = secret_file(tmp_path)
    monkeypatch.setenv("YUN_DOMAIN_SECRET_FILE", str(path))
    settings = load_settings(NodeSettings, "node", tmp_path / "absent.toml")
    assert settings.domain_secret == "s3cret-value" and settings.domain_secret_file == path
