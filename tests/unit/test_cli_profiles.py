"""The CLI's profiles: the file (modes, atomic replacement, TOML escaping), login and
logout, and which gateway and credential a command uses. The API is an
httpx.MockTransport: what is under test is the CLI's own handling."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from yun.cli import config as cfg
from yun.cli import context
from yun.cli.main import app
from yun.client import KeyPairAuth, TokenAuth

NOW = "2026-01-01T00:00:00Z"
ENV_VARS = ("YUN_API_URL", "YUN_API_TOKEN", "YUN_ACCESS_KEY", "YUN_SECRET_KEY", "YUN_PROFILE",
            "YUN_OUTPUT")


class Gateway:
    """A fake API: logs in, tells who is asking (the credential and host it saw), and
    revokes tokens."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        route = (request.method, request.url.path)
        if route == ("POST", "/api/v1/auth/tokens"):
            body = json.loads(request.content)
            if body["password"] != "right":
                return httpx.Response(401, json={"title": "Unauthorized", "status": 401,
                                                 "detail": "wrong user name or password"})
            return httpx.Response(201, json={
                "uuid": f"tok-{body['username']}", "user_uuid": "u1", "created_at": NOW,
                "expires_at": "2099-01-01T00:00:00Z", "token": f"T-{body['username']}",
                "user_name": body["username"], "project_name": body.get("project") or "dev"})
        if route == ("GET", "/api/v1/auth/whoami"):
            auth = request.headers.get("Authorization", "")
            seen = "key" if auth.startswith("YUN1") else auth
            return httpx.Response(200, json={
                "user_uuid": "u1", "user_name": f"{seen}@{request.url.host}",
                "department_uuid": None, "project_uuid": "p1", "project_name": "dev",
                "roles": ["member"], "auth": "token"})
        if request.method == "DELETE" and request.url.path.startswith("/api/v1/auth/tokens/"):
            return httpx.Response(204)
        return httpx.Response(404, json={"title": "Not found", "status": 404, "detail": "?"})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home: no profiles, no platform settings, no YUN_* variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("YUN_CONFIG", str(tmp_path / "etc-yun.toml"))
    monkeypatch.setenv("COLUMNS", "200")
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Gateway:
    fake = Gateway()
    monkeypatch.setattr(context, "TRANSPORT", httpx.MockTransport(fake))
    return fake


def yun(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def whoami(*args: str) -> str:
    """Who the fake gateway saw, as ``<credential>@<host>``."""
    result = yun(*args, "whoami", "-o", "json")
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["user_name"])


# --- the file ---------------------------------------------------------------------------


def test_the_file_is_0600_in_a_0700_directory_and_replaced_atomically(home: Path) -> None:
    config = cfg.Profiles("a", {"a": cfg.Profile(url="http://gw", token="t1")})
    path = cfg.save_profiles(config)
    assert path == home / "config" / "yun" / "config.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    inode = path.stat().st_ino
    os.chmod(path.parent, 0o755)  # loosened by hand: the next write tightens it again
    config.profiles["b"] = cfg.Profile(url="http://other", token="t2")
    cfg.save_profiles(config)
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]  # no temp left


def test_a_failed_write_leaves_the_old_file_whole(home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = cfg.save_profiles(cfg.Profiles("a", {"a": cfg.Profile(url="http://gw", token="1")}))
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cfg.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        cfg.save_profiles(cfg.Profiles("b", {"b": cfg.Profile(url="http://x", token="2")}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]


def test_values_round_trip_through_toml(home: Path) -> None:
    tricky = 'quote " backslash \\ newline \n tab \t bell \x07 del \x7f é 🦊'
    cfg.save_profiles(cfg.Profiles("p", {"p": cfg.Profile(url="http://gw", token=tricky)}))
    assert cfg.load_profiles().profiles["p"].token == tricky
    with pytest.raises(cfg.ConfigError):
        cfg.save_profiles(cfg.Profiles(None, {"bad name]": cfg.Profile(url="http://gw")}))


def test_a_broken_file_is_a_clear_error(home: Path) -> None:
    path = cfg.profiles_path()
    path.parent.mkdir(parents=True)
    path.write_text("current = \n")
    result = yun("vm", "list")
    assert result.exit_code == 1 and f"cannot read {path}" in result.stderr


# --- login, profiles, logout ------------------------------------------------------------


def test_login_stores_the_token_and_commands_use_it(home: Path, gateway: Gateway) -> None:
    result = yun("login", "--url", "http://gw:8080/api/v1", "--username", "alice",
                 "--password", "right", "--project", "web")
    assert result.exit_code == 0, result.output
    assert "logged in to http://gw:8080 as alice (project web)" in result.stderr
    data = tomllib.loads(cfg.profiles_path().read_text())
    assert data["current"] == "default"
    assert data["profiles"]["default"] == {
        "url": "http://gw:8080", "token": "T-alice", "token_uuid": "tok-alice",
        "project": "web", "user": "alice", "expires_at": "2099-01-01T00:00:00+00:00"}
    assert whoami() == "Bearer T-alice@gw"


def test_the_password_is_prompted_without_echo(home: Path, gateway: Gateway) -> None:
    result = CliRunner().invoke(app, ["login", "--url", "http://gw", "--username", "bob"],
                                input="right\n")
    assert result.exit_code == 0, result.output
    assert "right" not in result.output
    assert json.loads(gateway.requests[0].content)["password"] == "right"


def test_a_refused_login_stores_nothing(home: Path, gateway: Gateway) -> None:
    result = yun("login", "--url", "http://gw", "--username", "alice", "--password", "wrong")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Unauthorized (401): wrong user name or password")
    assert not cfg.profiles_path().exists()


def test_profiles_are_chosen_by_option_variable_or_current(
        home: Path, gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    assert yun("login", "--url", "http://one", "--username", "a", "--password",
               "right").exit_code == 0
    result = yun("login", "--url", "http://two", "--username", "b", "--password", "right",
                 "--profile", "second")
    assert result.exit_code == 0 and "yun profile use second" in result.stderr
    assert whoami() == "Bearer T-a@one"  # the first login stays current
    assert whoami("--profile", "second") == "Bearer T-b@two"
    monkeypatch.setenv("YUN_PROFILE", "second")
    assert whoami() == "Bearer T-b@two"
    monkeypatch.delenv("YUN_PROFILE")
    assert yun("profile", "use", "second").exit_code == 0
    assert whoami() == "Bearer T-b@two"
    listed = json.loads(yun("profile", "list", "-o", "json").stdout)
    assert [(p["name"], p["current"]) for p in listed] == [("default", False),
                                                            ("second", True)]
    assert "T-a" not in yun("profile", "list").stdout  # secrets are never listed
    missing = yun("--profile", "nope", "whoami")
    assert missing.exit_code == 1 and "no profile 'nope'" in missing.stderr


def test_logout_revokes_and_forgets(home: Path, gateway: Gateway) -> None:
    yun("login", "--url", "http://gw", "--username", "alice", "--password", "right")
    result = yun("logout")
    assert result.exit_code == 0, result.output
    revoke = gateway.requests[-1]
    assert (revoke.method, revoke.url.path) == ("DELETE", "/api/v1/auth/tokens/tok-alice")
    assert revoke.headers["Authorization"] == "Bearer T-alice"
    assert cfg.load_profiles().profiles == {} and cfg.load_profiles().current is None
    gone = yun("whoami")
    assert gone.exit_code == 1
    assert gone.stderr.startswith("error: not logged in: run `yun login`")


def test_a_key_pair_can_be_stored(home: Path, gateway: Gateway) -> None:
    result = yun("login", "--url", "http://gw", "--access-key", "AKTEST0123456789",
                 "--secret-key", "sekrit")
    assert result.exit_code == 0, result.output
    stored = cfg.load_profiles().profiles["default"]
    assert (stored.access_key, stored.secret_key, stored.token) == (
        "AKTEST0123456789", "sekrit", None)
    assert whoami() == "key@gw"


def test_an_expired_token_says_to_log_in_again(home: Path, gateway: Gateway) -> None:
    cfg.save_profiles(cfg.Profiles("old", {"old": cfg.Profile(
        url="http://gw", token="t", expires_at="2020-01-01T00:00:00+00:00")}))
    result = yun("vm", "list")
    assert result.exit_code == 1
    assert "expired at 2020-01-01" in result.stderr and "yun login --profile old" in result.stderr


# --- resolution order -------------------------------------------------------------------


def write_system(home: Path, text: str) -> None:
    (home / "etc-yun.toml").write_text(text)


def test_resolution_order(home: Path, gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # The platform's settings file names the gateway but is never a login: a token
    # there (as older all-in-ones wrote) is refused with what to do.
    write_system(home, '[cli]\napi_url = "http://aio:8080"\ntoken = "AIO"\n')
    with pytest.raises(cfg.ConfigError, match=r"holds a token in \[cli\].*yun login"):
        cfg.resolve(env={})
    # 3. the current profile wins over it
    cfg.save_profiles(cfg.Profiles("cur", {
        "cur": cfg.Profile(url="http://cur", token="CUR"),
        "other": cfg.Profile(url="http://other", token="OTHER")}))
    assert whoami() == "Bearer CUR@cur"
    # 2. the chosen profile wins over the current one
    assert whoami("--profile", "other") == "Bearer OTHER@other"
    # 1. the environment wins over everything; YUN_API_URL also redirects a profile
    monkeypatch.setenv("YUN_API_URL", "http://env")
    assert whoami() == "Bearer CUR@env"
    monkeypatch.setenv("YUN_API_TOKEN", "ENV")
    assert whoami("--profile", "other") == "Bearer ENV@env"
    monkeypatch.delenv("YUN_API_TOKEN")
    monkeypatch.setenv("YUN_ACCESS_KEY", "AKTEST0123456789")
    monkeypatch.setenv("YUN_SECRET_KEY", "s")
    assert whoami() == "key@env"


def test_resolve_returns_the_credential_and_its_source(home: Path) -> None:
    write_system(home, '[cli]\napi_url = "http://aio:8080"\n')
    with pytest.raises(cfg.ConfigError, match="not logged in"):
        cfg.resolve(env={})  # a gateway without a token is not a login
    assert cfg.default_url(None, env={}) == "http://aio:8080"  # but `yun login` may use it
    connection = cfg.resolve(env={"YUN_API_TOKEN": "t"})
    assert connection.url == "http://aio:8080" and connection.source == "environment"
    assert isinstance(connection.auth, TokenAuth)
    keyed = cfg.resolve(env={"YUN_API_URL": "http://k", "YUN_ACCESS_KEY": "A",
                             "YUN_SECRET_KEY": "S"})
    assert isinstance(keyed.auth, KeyPairAuth) and keyed.url == "http://k"


def test_an_unreadable_platform_file_is_ignored(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write_system(home, "[cli]\napi_url = 'http://aio'\ntoken = 'x'\n")
    real_read = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == home / "etc-yun.toml":  # as for a user other than root: mode 0600
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(cfg.ConfigError, match="not logged in"):
        cfg.resolve(env={})
