"""Start a throwaway Eclipse Mosquitto on a free loopback port (tests and benchmarks).

Deployments run mosquitto as a service with the configuration in broker/; this is for runs that
need a real broker for a few minutes and nothing left behind.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MosquittoError(RuntimeError):
    """mosquitto is missing or did not start; the message says what to do."""


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def run_mosquitto(workdir: Path, extra_conf: str = "", listener_opts: str = "",
                  port: int | None = None) -> Iterator[tuple[str, int]]:
    """Start mosquitto with a generated config in ``workdir``; yield ``(host, port)``; stop it.

    ``extra_conf`` lines go after the defaults (TLS, password and ACL variants add theirs);
    ``listener_opts`` follow the ``listener`` line.
    """
    binary = mosquitto_binary()
    if binary is None:
        raise MosquittoError(
            "mosquitto is not installed (looked on PATH and in /usr/sbin): install it with "
            "`apt-get install mosquitto` (Debian/Ubuntu) or `brew install mosquitto`"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    host, port = "127.0.0.1", port or free_port()
    log_file = workdir / "mosquitto.log"
    lines = [
        f"listener {port} {host}",
        listener_opts,
        "allow_anonymous true",
        "persistence false",
        # mosquitto 2 drops messages for a subscriber once 1000 are queued for it (QoS 0 included);
        # fleet-sized runs (hundreds of wearables into one subscriber) need a deeper queue, as
        # deployments do (docs/mqtt.md, "Delivery").
        "max_queued_messages 100000",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if os.geteuid() == 0:  # as root mosquitto would switch to user "mosquitto", who cannot write workdir
        lines.append(f"user {getpass.getuser()}")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(line for line in lines if line) + "\n" + extra_conf + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                raise MosquittoError(f"mosquitto exited with {proc.returncode} at start:\n{out}\n{log}")
            try:
                socket.create_connection((host, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise MosquittoError(f"mosquitto did not accept connections on {host}:{port} within 10 s") from None
                time.sleep(0.02)
        yield host, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
