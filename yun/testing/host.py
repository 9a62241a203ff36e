"""Host services the setup script starts: `python -m yun.testing.host libvirtd|postgres`."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from yun.util.run import CommandError, run

PG_USER = "yun"
PG_PASSWORD = "yun"
PG_DATABASE = "yun_test"


@contextmanager
def fresh_postgres_database(url: str, tag: str) -> Iterator[str]:
    """A database made on the PostgreSQL server of ``url`` for one test or run, named
    ``<url's database>_<tag>_<random>``, dropped afterwards (also on failure, with its
    connections cut); yields ``url`` naming it (same driver and role)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from yun.control.db.session import sync_url

    base = make_url(sync_url(url))
    name = f"{base.database}_{tag}_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def ensure_postgres(timeout: float = 60.0) -> None:
    """Start Debian's PostgreSQL cluster and make the test role and database (idempotent)."""
    clusters = run(["pg_lsclusters", "--no-header"], timeout=15).stdout.split()
    if len(clusters) < 4:
        raise RuntimeError("no PostgreSQL cluster found (is the postgresql package installed?)")
    version, name, status = clusters[0], clusters[1], clusters[3]
    if status != "online":
        run(["pg_ctlcluster", version, name, "start"], timeout=timeout)
    deadline = time.monotonic() + timeout

    def psql(sql: str) -> str:
        return run(["runuser", "-u", "postgres", "--", "psql", "-tAc", sql], timeout=30).stdout

    while True:
        try:
            psql("SELECT 1")
            break
        except CommandError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    if not psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{PG_USER}'").strip():
        psql(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}' CREATEDB")
    if not psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'").strip():
        psql(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")
    print(f"postgresql {version}/{name} online; database {PG_DATABASE}")


def main(argv: list[str]) -> int:
    if argv == ["libvirtd"]:
        from yun.node.hypervisor.libvirt.daemons import ensure_libvirt_daemons

        ensure_libvirt_daemons()
        print("libvirtd answering on qemu:///system")
        return 0
    if argv == ["postgres"]:
        ensure_postgres()
        return 0
    print("usage: python -m yun.testing.host libvirtd|postgres", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
