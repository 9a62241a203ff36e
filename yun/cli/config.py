"""Where and as whom the CLI connects: the profiles file and the resolution order.

Profiles live in ``~/.config/yun/config.toml`` (``$XDG_CONFIG_HOME`` is honoured)::

    current = "default"

    [profiles.default]
    url = "http://gateway:8080"
    token = "…"
    ...

The file holds secrets: it is written atomically with mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from yun.client import KeyPairAuth, TokenAuth
from yun.config import DEFAULT_CONFIG
from yun.util.files import write_atomic

PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
DEFAULT_PROFILE = "default"


class ConfigError(Exception):
    """The CLI cannot tell where or as whom to connect; the message says what to do."""


class Profile(BaseModel):
    """One stored login: a token (with its uuid, to revoke it) or a key pair."""

    model_config = ConfigDict(extra="ignore")

    url: str
    token: str | None = None
    token_uuid: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    project: str | None = None
    user: str | None = None
    expires_at: str | None = None

    def auth(self) -> httpx.Auth | None:
        """The credential of this profile, if it holds one."""
        if self.token:
            return TokenAuth(self.token)
        if self.access_key and self.secret_key:
            return KeyPairAuth(self.access_key, self.secret_key)
        return None

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the stored token's expiry has passed (key pairs do not expire)."""
        if not self.token or not self.expires_at:
            return False
        try:
            expires = datetime.fromisoformat(self.expires_at)
        except ValueError:
            return False
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return expires <= (now or datetime.now(UTC))


@dataclass
class Profiles:
    """The profiles file in memory."""

    current: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)


def profiles_path() -> Path:
    """``$XDG_CONFIG_HOME/yun/config.toml``, by default ``~/.config/yun/config.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "yun" / "config.toml"


def system_config_path() -> Path:
    """The platform's settings file, whose ``[cli]`` table may name the gateway."""
    return Path(os.environ.get("YUN_CONFIG") or DEFAULT_CONFIG)


def check_profile_name(name: str) -> str:
    """``name`` if it can be a profile's name (letters, digits, ``_`` and ``-``)."""
    if not PROFILE_NAME.match(name):
        raise ConfigError(f"profile name {name!r}: use letters, digits, '_' and '-' "
                          "(at most 63)")
    return name


def load_profiles(path: Path | None = None) -> Profiles:
    """The profiles file, empty when there is none."""
    path = path or profiles_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Profiles()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        profiles = {name: Profile.model_validate(table)
                    for name, table in data.get("profiles", {}).items()}
    except (ValidationError, AttributeError) as exc:
        raise ConfigError(f"{path}: a profile is not valid: {exc}") from exc
    current = data.get("current")
    return Profiles(current if isinstance(current, str) else None, profiles)


def _toml_string(value: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for ch in value:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dump_profiles(config: Profiles) -> str:
    """The TOML text of the profiles file."""
    lines = ["# Yun CLI profiles, written by `yun login`: it holds secrets, keep it 0600.", ""]
    if config.current:
        lines += [f"current = {_toml_string(config.current)}", ""]
    for name, profile in config.profiles.items():
        lines.append(f"[profiles.{check_profile_name(name)}]")
        for key, value in profile.model_dump(exclude_none=True).items():
            lines.append(f"{key} = {_toml_string(str(value))}")
        lines.append("")
    return "\n".join(lines)


def save_profiles(config: Profiles, path: Path | None = None) -> Path:
    """Write the profiles file; returns its path."""
    path = path or profiles_path()
    write_atomic(path, dump_profiles(config), dir_mode=0o700)
    return path


def system_cli_settings() -> dict[str, Any]:
    """The ``[cli]`` table of the platform's settings file (``api_url``); empty when the
    file is absent or not readable by this user. It names the gateway, never a login:
    that file is the services' and may be readable by every user."""
    try:
        data = tomllib.loads(system_config_path().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    cli = data.get("cli", {})
    return cli if isinstance(cli, dict) else {}


@dataclass(frozen=True)
class Connection:
    """Where to connect, with which credential, and where that came from."""

    url: str
    auth: httpx.Auth | None
    source: str
    profile: str | None = None


def _env_auth(env: Mapping[str, str]) -> httpx.Auth | None:
    if env.get("YUN_API_TOKEN"):
        return TokenAuth(env["YUN_API_TOKEN"])
    if env.get("YUN_ACCESS_KEY") and env.get("YUN_SECRET_KEY"):
        return KeyPairAuth(env["YUN_ACCESS_KEY"], env["YUN_SECRET_KEY"])
    return None


def resolve(profile: str | None = None, env: Mapping[str, str] | None = None,
            path: Path | None = None) -> Connection:
    """Where and as whom to connect, first found wins:

    1. ``YUN_API_TOKEN`` (or ``YUN_ACCESS_KEY`` + ``YUN_SECRET_KEY``) with ``YUN_API_URL``;
    2. the profile named by ``profile`` (``--profile`` / ``YUN_PROFILE``);
    3. the current profile of the profiles file;
    ``YUN_API_URL`` also overrides the URL of the others; the ``[cli]`` table of
    ``/etc/yun/yun.toml`` (or ``$YUN_CONFIG``) gives only the URL for ``yun login`` and
    for credentials from the environment. A token is never read from that file (it is
    the services' settings file): the CLI's tokens live in the 0600 profiles file."""
    env = os.environ if env is None else env
    env_url = env.get("YUN_API_URL")
    config = load_profiles(path)
    if profile is not None and profile not in config.profiles:
        raise ConfigError(f"no profile {profile!r} in {path or profiles_path()}: run "
                          f"`yun login --profile {profile}`")
    name = profile or config.current
    stored = config.profiles.get(name) if name else None
    system = system_cli_settings()
    env_auth = _env_auth(env)
    if env_auth is not None:
        url = env_url or (stored.url if stored else None) or system.get("api_url")
        if not url:
            raise ConfigError("credentials are set in the environment but no gateway: "
                              "set YUN_API_URL")
        return Connection(url, env_auth, "environment")
    if stored is not None and name is not None:
        if stored.expired():
            raise ConfigError(f"the token of profile {name!r} expired at {stored.expires_at}: "
                              f"run `yun login --profile {name}`")
        auth = stored.auth()
        if auth is None:
            raise ConfigError(f"profile {name!r} holds no credential: run "
                              f"`yun login --profile {name}`")
        return Connection(env_url or stored.url, auth, f"profile {name!r}", name)
    if system.get("token"):
        raise ConfigError(f"not logged in: {system_config_path()} holds a token in [cli], "
                          "which the CLI no longer reads (a token belongs in the 0600 "
                          "profiles file): remove it and run `yun login`")
    raise ConfigError("not logged in: run `yun login` (or set YUN_API_URL and YUN_API_TOKEN)")


def default_url(profile: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The gateway ``yun login`` uses when given no ``--url``."""
    env = os.environ if env is None else env
    if env.get("YUN_API_URL"):
        return env["YUN_API_URL"]
    config = load_profiles()
    stored = config.profiles.get(profile or config.current or DEFAULT_PROFILE)
    if stored is not None:
        return stored.url
    url = system_cli_settings().get("api_url")
    return str(url) if url else None
