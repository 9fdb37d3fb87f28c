#!/usr/bin/env python3
"""Hand the development broker's secrets to the compose services, each only what it needs.

    install-secrets.py --from DIR --broker B --edge E --wearable W [--wearable-name strap-1]

DIR is what ``broker/run-dev DIR PORT TLS_PORT --generate-only --hostname broker`` wrote on the host:
its files belong to whoever ran it and are 0600, so the containers, which run as their own users,
cannot read them in place. docker/compose.yaml runs this once as root before anything else starts
and copies into one volume per service, owned by that service's user:

    B (broker, uid 1883)  passwd, certs/{ca.crt,server.crt,server.key}, health.password
    E (edge, uid 10001)   ca.crt, edge.password
    W (wearable, 10002)   ca.crt, <wearable-name>.password

The CA key and the other accounts' passwords stay on the host. health.password is the read-only
`subscriber` account's: the broker's healthcheck logs in with it over TLS. Every run replaces what
the volumes held, so regenerating DIR and restarting the stack is enough to rotate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

BROKER_UID = 1883  # the `mosquitto` user of the eclipse-mosquitto image
EDGE_UID = 10001  # docker/edge.Dockerfile's user
WEARABLE_UID = 10002  # the compose wearable runs the edge image as this user
BROKER_HOSTNAME = "broker"  # the compose service name: the server certificate must cover it
GENERATE = "broker/run-dev DIR 1883 8883 --generate-only --hostname broker"


class SecretsError(Exception):
    """Something is missing or wrong in DIR; the message says how to fix it."""


def _source(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise SecretsError(f"{path} is missing: generate the secrets with `{GENERATE}`")
    return path


def _install(source: Path, target: Path, mode: int, uid: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, mode)
    if os.geteuid() == 0:
        os.chown(tmp, uid, uid)
    os.replace(tmp, target)


def _own_dir(path: Path, uid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if os.geteuid() == 0:
        os.chown(path, uid, uid)


def check_server_names(cert_file: Path, hostname: str) -> None:
    """The broker's certificate must name the host the clients dial, or TLS verification fails."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if hostname not in names:
        raise SecretsError(
            f"{cert_file} is for {', '.join(names) or 'no DNS name'}, not {hostname!r}, the name the edge and "
            f"the wearable connect to: run `{GENERATE}` again (the CA and passwords are kept)"
        )


def install(src: Path, broker: Path, edge: Path, wearable: Path, wearable_name: str) -> list[Path]:
    """Copy the files each service needs; return what was written."""
    plan = [
        (_source(src, "broker/passwd"), broker / "passwd", 0o600, BROKER_UID),
        (_source(src, "broker/certs/ca.crt"), broker / "certs/ca.crt", 0o644, BROKER_UID),
        (_source(src, "broker/certs/server.crt"), broker / "certs/server.crt", 0o644, BROKER_UID),
        (_source(src, "broker/certs/server.key"), broker / "certs/server.key", 0o600, BROKER_UID),
        (_source(src, "clients/subscriber.password"), broker / "health.password", 0o600, BROKER_UID),
        (_source(src, "ca/ca.crt"), edge / "ca.crt", 0o644, EDGE_UID),
        (_source(src, "clients/edge.password"), edge / "edge.password", 0o600, EDGE_UID),
        (_source(src, "ca/ca.crt"), wearable / "ca.crt", 0o644, WEARABLE_UID),
        (_source(src, f"clients/{wearable_name}.password"), wearable / f"{wearable_name}.password", 0o600,
         WEARABLE_UID),
    ]
    check_server_names(src / "broker/certs/server.crt", BROKER_HOSTNAME)
    for directory, uid in ((broker, BROKER_UID), (broker / "certs", BROKER_UID), (edge, EDGE_UID),
                           (wearable, WEARABLE_UID)):
        _own_dir(directory, uid)
    for source, target, mode, uid in plan:
        _install(source, target, mode, uid)
    return [target for _, target, _, _ in plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install-secrets.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", type=Path, required=True, help="what broker/run-dev wrote")
    parser.add_argument("--broker", type=Path, required=True, help="the broker's secrets volume")
    parser.add_argument("--edge", type=Path, required=True, help="the edge's secrets volume")
    parser.add_argument("--wearable", type=Path, required=True, help="the simulated wearable's secrets volume")
    parser.add_argument("--wearable-name", default="strap-1", help="its account (a run-dev --wearable; default strap-1)")
    args = parser.parse_args(argv)
    try:
        written = install(args.src, args.broker, args.edge, args.wearable, args.wearable_name)
    except (SecretsError, OSError, ValueError) as exc:
        print(f"install-secrets: {exc}", file=sys.stderr)
        return 1
    print(f"install-secrets: {len(written)} files from {args.src} into {args.broker}, {args.edge}, {args.wearable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
