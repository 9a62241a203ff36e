"""`yun login`, `yun logout`, `yun whoami` and `yun profile …`: who the CLI is."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from yun.cli import context
from yun.cli.common import Output
from yun.cli.config import (
    DEFAULT_PROFILE,
    ConfigError,
    Connection,
    Profile,
    check_profile_name,
    default_url,
    load_profiles,
    save_profiles,
)
from yun.cli.context import client, make_client, state
from yun.cli.output import emit, note
from yun.client import ApiError, Client, KeyPairAuth, gateway_url

profile_app = typer.Typer(help="Stored logins (~/.config/yun/config.toml).",
                          no_args_is_help=True)

ProfileOpt = Annotated[str | None, typer.Option(
    help="profile name; default: the global --profile, else 'default'")]


def login(
    url: Annotated[str | None, typer.Option(
        help="the gateway; default: YUN_API_URL, the profile's, or /etc/yun/yun.toml's")]
    = None,
    username: Annotated[str | None, typer.Option(help="prompted for when absent")] = None,
    password: Annotated[str | None, typer.Option(
        help="prompted for (hidden) when absent")] = None,
    project: Annotated[str | None, typer.Option(
        help="project to scope the token to; default: your first")] = None,
    profile: ProfileOpt = None,
    access_key: Annotated[str | None, typer.Option(
        help="store this API key pair instead of logging in with a password")] = None,
    secret_key: Annotated[str | None, typer.Option(help="the key pair's secret")] = None,
    ttl: Annotated[float | None, typer.Option(help="token lifetime in seconds")] = None,
) -> None:
    """Log in and store the token (or a key pair) in a profile."""
    name = check_profile_name(profile or state().profile or DEFAULT_PROFILE)
    url = url or default_url(name)
    if not url:
        raise ConfigError("no gateway known: give --url http://<gateway>:8080")
    url = gateway_url(url)
    if access_key or secret_key:
        if not (access_key and secret_key):
            raise typer.BadParameter("give both --access-key and --secret-key")
        with make_client(Connection(url, KeyPairAuth(access_key, secret_key), "login")) as c:
            me = c.auth.whoami()  # a key pair that does not work is not stored
        stored = Profile(url=url, access_key=access_key, secret_key=secret_key,
                         project=me.project_name or me.project_uuid, user=me.user_name)
    else:
        username = username or str(typer.prompt("Username", err=True))
        if password is None:
            password = str(typer.prompt("Password", hide_input=True, err=True))
        session, issued = Client.login(url, username, password, project, ttl=ttl,
                                       transport=context.TRANSPORT)
        session.close()
        stored = Profile(url=url, token=issued.token, token_uuid=issued.uuid,
                         project=issued.project_name or issued.project_uuid,
                         user=issued.user_name, expires_at=issued.expires_at.isoformat())
    config = load_profiles()
    config.profiles[name] = stored
    config.current = config.current or name
    path = save_profiles(config)
    scope = f" (project {stored.project})" if stored.project else ""
    how = ("" if config.current == name
           else f"; use it with --profile {name} or `yun profile use {name}`")
    note(f"logged in to {url} as {stored.user}{scope}: profile {name!r} in {path}{how}")


def logout(profile: ProfileOpt = None) -> None:
    """Revoke the profile's token and forget the profile."""
    config = load_profiles()
    name = profile or state().profile or config.current
    if not name or name not in config.profiles:
        raise ConfigError(f"no profile {name!r} to log out of" if name else "not logged in")
    stored = config.profiles.pop(name)
    auth = stored.auth()
    if stored.token and stored.token_uuid and auth is not None and not stored.expired():
        try:
            with make_client(Connection(stored.url, auth, f"profile {name!r}")) as c:
                c.auth.revoke(stored.token_uuid)
        except ApiError as exc:  # forgetting it locally is still what the user asked for
            note(f"warning: the token could not be revoked: {exc}")
    if config.current == name:
        config.current = None
    save_profiles(config)
    note(f"logged out: profile {name!r} forgotten")


def whoami(output: Output = None) -> None:
    """Show the user, project and roles behind your credential."""
    emit(client().auth.whoami(), output)


def _listing(name: str, stored: Profile, current: str | None) -> dict[str, Any]:
    return {"name": name, "current": name == current, "url": stored.url, "user": stored.user,
            "project": stored.project, "auth": "token" if stored.token else "key pair",
            "expires_at": stored.expires_at}


@profile_app.command("list")
def profile_list(output: Output = None) -> None:
    """List the stored profiles (never their secrets)."""
    config = load_profiles()
    rows = [_listing(name, p, config.current) for name, p in config.profiles.items()]
    emit(rows, output, columns=["name", "current", "url", "user", "project", "auth",
                                "expires_at"], title="Profiles")


@profile_app.command("use")
def profile_use(name: Annotated[str, typer.Argument(help="profile name")]) -> None:
    """Make a profile the default one."""
    config = load_profiles()
    if name not in config.profiles:
        raise ConfigError(f"no profile {name!r}: run `yun login --profile {name}`")
    config.current = name
    save_profiles(config)
    note(f"profile {name!r} is now the default")
