"""docker/: the images and the compose stack, checked without a container engine.

hadolint lints the Dockerfiles and check-jsonschema validates compose.yaml against the compose
specification (both from the test extra). The rest reads the files the way the engine would and
catches what linters cannot: a COPY of a file that is not in the build context, an edge image that
pulls torch, a service whose image nothing builds, a config the edge would reject. The last test
runs the compose stack's own pieces (the secrets step, the broker's configuration as the broker
image lays it out, the edge with docker/edge.toml, the wearable's command) on this machine, each
container path mapped to a directory, against a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import aiomqtt
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from edge import mosquitto as broker_process
from edge.cli import _parser as edge_cli_parser
from edge.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["edge.Dockerfile", "trainer.Dockerfile", "broker.Dockerfile"]
PROJECT = "ecg-anonymizer"


# ---------------------------------------------------------------------------------------------
# Tools


def tool(name: str) -> str:
    """A linter from the test extra: beside this interpreter (a venv run without activating it) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra (pip install -e '.[test]')")
    return found


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    print(f"$ {shlex.join(args)}\n{out.stdout}{out.stderr}")  # shown by pytest when the test fails
    return out


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run_tool(tool("hadolint"), "--no-color", str(path))


def compose_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))


# ---------------------------------------------------------------------------------------------
# Reading Dockerfiles, .dockerignore files and compose.yaml


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs are used)."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path}: ends inside a continued line"
    return out


def stage_names(instructions: list[Instruction]) -> set[str]:
    names = set()
    for i in instructions:
        if i.keyword == "FROM":
            words = i.args.split()
            if len(words) == 3 and words[1].upper() == "AS":
                names.add(words[2])
    return names


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


@dataclass
class Copy:
    sources: list[str]
    dest: str
    flags: dict[str, str]
    stage: int


def copies(instructions: list[Instruction]) -> list[Copy]:
    out = []
    for i in instructions:
        if i.keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(i.args) if i.args.startswith("[") else shlex.split(i.args)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        out.append(Copy(words[:-1], words[-1], flags, i.stage))
    return out


def exec_form(instructions: list[Instruction], keyword: str) -> list[str] | None:
    """The last ENTRYPOINT/CMD/... in JSON form, or None when there is none."""
    found = [i for i in instructions if i.keyword == keyword]
    return json.loads(found[-1].args) if found else None


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    """BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile before the context's .dockerignore."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore} is missing: without it the whole checkout (.venv, runs, secrets) is sent"
    return [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match as the engine uses it: * and ? stop at /, ** crosses directories."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether the engine leaves ``path`` (relative to the context) out: the last matching pattern
    decides, and a pattern that matches a parent directory matches everything under it."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


def load_compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def service_image_builds(compose: dict) -> dict[str, str]:
    """Image name -> Dockerfile (relative to the repository) for every service that builds one."""
    out = {}
    for service in compose["services"].values():
        build = service.get("build")
        if build and "image" in service:
            out[service["image"]] = str((DOCKER / build["context"] / build["dockerfile"]).resolve().relative_to(REPO))
    return out


def mounts(service: dict) -> list[tuple[str, str, str, bool]]:
    """(type, source, target, read_only) of each volume of a service, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "$")) else "volume"
            out.append((kind, source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v["type"], v["source"], v["target"], bool(v.get("read_only", False))))
    return out


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env.get(m["name"], m["default"] or ""), text).replace("$$", "$")


# ---------------------------------------------------------------------------------------------
# Requirements, resolved from pyproject and the installed distributions


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def extra_requirements(extras: list[str]) -> list[Requirement]:
    """The project's core and extra requirements, with its self-referencing extras expanded."""
    optional = pyproject()["project"]["optional-dependencies"]
    out = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"extra {extra!r} is not in pyproject.toml"
        for text in optional[extra]:
            req = Requirement(text)
            if req.name == PROJECT:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def transitive_names(reqs: list[Requirement]) -> set[str]:
    """Every distribution those requirements install here, read from the installed metadata."""
    names: set[str] = set()
    todo: list[tuple[Requirement, frozenset[str]]] = [(r, frozenset()) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        if name in names:
            continue
        names.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed here, so what it pulls in cannot be checked")
        for text in dist.requires or []:
            todo.append((Requirement(text), frozenset(req.extras)))
    return names


# ---------------------------------------------------------------------------------------------
# The linters, and proof that they can fail


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    out = hadolint(DOCKER / name)
    assert out.returncode == 0, f"hadolint {name}:\n{out.stdout}{out.stderr}"


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "broken.Dockerfile"
    broken.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y gcc\n"
        "RUN pip install torch\n"
        "CMD ecg-edge run\n"
    )
    out = hadolint(broken)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3042", "DL3025"):  # latest, apt pins, pip pins, cache, CMD form
        assert rule in out.stdout, rule


def test_compose_file_matches_the_compose_specification() -> None:
    out = compose_schema_check(DOCKER / "compose.yaml")
    assert out.returncode == 0, f"compose.yaml:\n{out.stdout}{out.stderr}"


def test_compose_schema_check_fails_on_a_broken_file(tmp_path: Path) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace("    restart: unless-stopped\n", "    restart_policy: unless-stopped\n", 1))
    out = compose_schema_check(broken)
    assert out.returncode != 0 and "restart_policy" in out.stdout + out.stderr
    broken.write_text(text.replace("      interval: 30s\n", "      interval: [30s]\n", 1))
    out = compose_schema_check(broken)
    assert out.returncode != 0 and "interval" in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# The images


def test_base_images_are_pinned_and_match_the_project() -> None:
    bases = {}
    for name in DOCKERFILES:
        instructions = parse_dockerfile(DOCKER / name)
        stages = stage_names(instructions)
        for i in instructions:
            if i.keyword != "FROM" or i.args.split()[0] in stages:
                continue
            image = i.args.split()[0]
            repo, _, tag = image.partition(":")
            assert re.match(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"
            bases.setdefault(name, set()).add((repo, tag))
    [(python, python_tag)] = bases["edge.Dockerfile"]  # builder and final stage: the same base
    assert python == "python" and re.fullmatch(r"3\.\d+\.\d+-slim-\w+", python_tag)
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python_tag.split("-")[0])
    [(torch_repo, torch_tag)] = bases["trainer.Dockerfile"]
    [torch_pin] = [r for r in extra_requirements(["train"]) if r.name == "torch"]
    # The base must carry the torch the train extra pins, or the install step cannot resolve.
    assert torch_repo == "pytorch/pytorch" and str(torch_pin.specifier) == f"=={torch_tag.split('-')[0]}"
    assert re.fullmatch(r"[\d.]+-cuda[\d.]+-cudnn\d+-runtime", torch_tag)
    [(mosquitto, mosquitto_tag)] = bases["broker.Dockerfile"]
    assert mosquitto == "eclipse-mosquitto" and mosquitto_tag.startswith("2.")


def test_edge_image_installs_no_torch_and_builds_nothing() -> None:
    instructions = parse_dockerfile(DOCKER / "edge.Dockerfile")
    [install] = [i for i in instructions if i.keyword == "RUN" and " install " in i.args and "pip" in i.args]
    extras_arg = re.search(r"\.\[([^\]]*)\]", install.args)
    assert extras_arg, f"the edge install line names no extras: {install.args}"
    extras = extras_arg[1]
    if extras.startswith("${"):
        extras = arg_defaults(instructions)[extras.strip("${}")]
    extras_list = [e.strip() for e in extras.split(",") if e.strip()]
    assert set(extras_list) == {"wfdb", "ble"}, extras_list
    pulled = transitive_names(extra_requirements(extras_list))
    assert "torch" not in pulled and {"onnxruntime", "wfdb", "bleak", "numpy"} <= pulled
    # The same resolution does see torch where it is: the check can fail.
    assert "torch" in transitive_names(extra_requirements(["train"]))
    assert "torch" in {r.name for r in extra_requirements(["test"])}
    # Wheels only (nothing compiled), no package manager, no compiler.
    assert "--only-binary=:all:" in install.args and "--no-cache-dir" in install.args
    text = (DOCKER / "edge.Dockerfile").read_text()
    assert not re.search(r"apt-get|apk |gcc|build-essential", text)
    # The final stage takes the venv from the builder, runs unprivileged, and is `ecg-edge`.
    final = max(i.stage for i in instructions)
    assert any(c.flags.get("from") == "builder" and c.stage == final for c in copies(instructions))
    [user] = [i for i in instructions if i.keyword == "USER"]
    assert user.stage == final and user.args.split(":")[0] not in ("root", "0")
    assert exec_form(instructions, "ENTRYPOINT") == ["ecg-edge"]
    assert exec_form(instructions, "CMD") == ["run", "--config", "/etc/ecg-edge/edge.toml"]
    # Models ship inside the package, so the image needs no model files of its own.
    assert "assets/models/*" in pyproject()["tool"]["setuptools"]["package-data"]["edge"]
    assert list((REPO / "edge/assets/models").glob("*.onnx"))


def test_trainer_image_keeps_the_base_torch() -> None:
    instructions = parse_dockerfile(DOCKER / "trainer.Dockerfile")
    [install] = [i for i in instructions if i.keyword == "RUN" and ".[train]" in i.args]
    steps = [s.strip() for s in install.args.split("&&")]
    pip = next(s for s in steps if s.startswith("pip install"))
    constraint = re.search(r"--constraint (\S+)", pip)
    assert constraint, "the train extra is installed without a constraint: pip could replace the base's torch"
    writes = steps[: steps.index(pip)]
    assert any("torch.__version__" in s and s.endswith(f"> {constraint[1]}") for s in writes), writes
    assert any("torch.__version__" in s for s in steps[steps.index(pip) + 1:]), "no check that torch is unchanged"
    assert "--no-cache-dir" in pip and not re.search(r"\btorch\b", pip.replace(constraint[0], ""))
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    data_dir = re.search(r"MITDB_DIR=(\S+)", env)
    assert data_dir, "MITDB_DIR is not set"
    volumes = json.loads(next(i.args for i in instructions if i.keyword == "VOLUME"))
    workdir = [i.args for i in instructions if i.keyword == "WORKDIR"][-1]
    assert data_dir[1] in volumes and f"{workdir}/runs" in volumes  # `--runs-dir` defaults to ./runs
    [user] = [i for i in instructions if i.keyword == "USER"]
    assert user.args.split(":")[0] not in ("root", "0")
    assert exec_form(instructions, "ENTRYPOINT") == ["ecg-trainer"]


def test_broker_image_provides_every_file_its_configuration_reads() -> None:
    instructions = parse_dockerfile(DOCKER / "broker.Dockerfile")
    image_files = {c.dest: c.sources[0] for c in copies(instructions)}
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    links = {link: target for target, link in re.findall(r"ln -s (\S+) (\S+)", runs)}
    conf = (REPO / image_files["/mosquitto/config/mosquitto.conf"]).read_text()
    read = [w for line in conf.splitlines() if not line.lstrip().startswith("#") for w in line.split()[1:2]
            if w.startswith("/mosquitto/config/")]
    assert read, "broker/mosquitto.conf reads nothing from /mosquitto/config/"
    for path in read:
        provided = path in image_files or any(path == link or path.startswith(link + "/") for link in links)
        assert provided, f"broker/mosquitto.conf reads {path}, which the broker image neither copies nor links"
    # What the links point at is what the secrets volume holds (docker/install-secrets.py).
    assert all(target.startswith("/run/secrets/ecg-broker/") for target in links.values())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_file_is_in_the_build_context(name: str) -> None:
    dockerfile = DOCKER / name
    instructions = parse_dockerfile(dockerfile)
    patterns = dockerignore_patterns(dockerfile)
    for copy in copies(instructions):
        if "from" in copy.flags:
            continue
        for source in copy.sources:
            assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
            assert not excluded(source, patterns), f"{name}: COPY {source}: left out by {name}.dockerignore"
            if (REPO / source).is_dir():
                files = [p for p in (REPO / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files and not any(excluded(str(p.relative_to(REPO)), patterns) for p in files)
    # Nothing private or bulky reaches the engine.
    for path in (".venv/bin/python", "runs/generator/001/model.pt", "docker/secrets/ca/ca.key", ".git/config",
                 "edge/__pycache__/cli.cpython-311.pyc", "tests/test_docker.py"):
        assert excluded(path, patterns), f"{name}: the build context would include {path}"


def test_dockerignore_matching_follows_the_engine() -> None:
    patterns = ["*", "!edge/", "**/__pycache__", "!docker/edge.toml"]
    assert not excluded("edge/assets/models/generator.onnx", patterns)
    assert excluded("edge/__pycache__/x.pyc", patterns) and excluded("trainer/cli.py", patterns)
    assert not excluded("docker/edge.toml", patterns) and excluded("docker/compose.yaml", patterns)
    assert excluded("README.md", patterns) and not excluded("README.md", patterns + ["!README.md"])


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_every_service_has_an_image_that_something_builds() -> None:
    compose = load_compose()
    built = service_image_builds(compose)
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file() and dockerfile.parent == DOCKER, f"{name}: {dockerfile} does not exist"
            assert service.get("image"), f"{name}: builds an image without naming it"
            version = pyproject()["project"]["version"]
            assert service["image"].endswith(f":{version}"), f"{name}: tag the image with the project version"
        else:
            assert service.get("image") in built, f"{name}: image {service.get('image')} is built by no service"
    assert set(built.values()) == {"docker/edge.Dockerfile", "docker/broker.Dockerfile"}


def test_services_restart_wait_for_health_and_mount_what_exists() -> None:
    compose = load_compose()
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    long_running = {n for n, s in services.items() if s.get("restart") != "no"}
    assert long_running == {"broker", "edge", "wearable"}
    for name, service in services.items():
        assert service.get("restart") in ("no", "always", "on-failure", "unless-stopped"), name
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on a service that does not exist: {dependency}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
            if how["condition"] == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} is a one-shot step"
        for kind, source, target, _ in mounts(service):
            if kind == "volume":
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"
            elif "${" not in source:
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist beside compose.yaml"
    for name in ("broker", "edge"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    # Every secret is mounted read-only wherever it is used, and written only by the secrets step.
    for name, service in services.items():
        for kind, source, _, read_only in mounts(service):
            if kind == "volume" and source.endswith("-secrets"):
                assert read_only or name == "secrets", f"{name} can write {source}"
    # Compose interpolates `$`: a literal one must be written `$$`, variables as ${NAME:-default}.
    text = (DOCKER / "compose.yaml").read_text()
    stray = re.findall(r"\$(?!\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})", text.replace("$$", ""))
    assert not stray, "compose.yaml has a `$` that compose would interpolate"


def test_edge_image_commands_in_compose_parse() -> None:
    compose = load_compose()
    edge_image = next(i for i, f in service_image_builds(compose).items() if f == "docker/edge.Dockerfile")
    default_cmd = exec_form(parse_dockerfile(DOCKER / "edge.Dockerfile"), "CMD")
    checked = 0
    for name, service in compose["services"].items():
        if service.get("image") != edge_image or "entrypoint" in service:
            continue
        argv = service.get("command", default_cmd)
        try:
            args = edge_cli_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `ecg-edge {shlex.join(argv)}` is not a valid command line")
        assert args.command in ("run", "simulate")
        checked += 1
    assert checked == 2  # the edge and the wearable


def test_compose_edge_config_fits_the_broker_and_the_healthcheck(tmp_path: Path) -> None:
    compose = load_compose()
    edge = compose["services"]["edge"]
    [config_mount] = [m for m in mounts(edge) if m[2] == edge["command"][-1]]
    raw = tomllib.loads((DOCKER / config_mount[1]).read_text())
    # The image's default config is the same file.
    edge_copies = copies(parse_dockerfile(DOCKER / "edge.Dockerfile"))
    assert any(c.sources == ["docker/edge.toml"] and c.dest == edge["command"][-1] for c in edge_copies)
    assert raw["broker"]["host"] in compose["services"] and raw["broker"]["host"] == "broker"
    conf = (REPO / "broker/mosquitto.conf").read_text()
    tls_listener = re.search(r"^listener (\d+)\s*$", conf, re.M)
    assert tls_listener and raw["broker"]["port"] == int(tls_listener[1]) and raw["broker"]["tls"] is True
    assert re.search(rf"^user {raw['broker']['username']}$", (REPO / "broker/acl").read_text(), re.M)
    port = raw["metrics"]["port"]
    assert raw["metrics"]["address"] == "0.0.0.0"
    assert f":{port}/metrics" in edge["healthcheck"]["test"][-1]
    assert any(p.endswith(f":{port}:{port}") for p in edge["ports"])
    # Every file the config names lives on a volume the edge mounts.
    targets = [m[2] for m in mounts(edge)]
    for key in ("ca_file", "password_file"):
        assert any(raw["broker"][key].startswith(t + "/") for t in targets), key


# ---------------------------------------------------------------------------------------------
# The secrets step


def run_dev_generate(directory: Path, *extra: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "broker/run-dev"), str(directory), "1883", "8883",
                          "--generate-only", *extra], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def install_secrets(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(sys.executable, str(DOCKER / "install-secrets.py"), *args)


def test_secrets_step_gives_each_service_its_own_files(tmp_path: Path) -> None:
    generated = tmp_path / "generated"
    run_dev_generate(generated, "--hostname", "broker")
    vol = tmp_path / "volumes"
    out = install_secrets("--from", str(generated), "--broker", str(vol / "broker"), "--edge", str(vol / "edge"),
                          "--wearable", str(vol / "wearable"))
    assert out.returncode == 0
    listing = {str(p.relative_to(vol)): p.stat().st_mode & 0o777 for p in vol.rglob("*") if p.is_file()}
    assert listing == {
        "broker/passwd": 0o600, "broker/health.password": 0o600, "broker/certs/ca.crt": 0o644,
        "broker/certs/server.crt": 0o644, "broker/certs/server.key": 0o600,
        "edge/ca.crt": 0o644, "edge/edge.password": 0o600,
        "wearable/ca.crt": 0o644, "wearable/strap-1.password": 0o600,
    }
    assert (vol / "edge/edge.password").read_text() == (generated / "clients/edge.password").read_text()
    assert not any("ca.key" in p for p in listing)  # the CA key never leaves the host
    if os.geteuid() == 0:  # the step runs as root in compose; a developer's test run may not
        owners = {(str(p.relative_to(vol)).split("/")[0], p.stat().st_uid) for p in vol.rglob("*")}
        assert owners == {("broker", 1883), ("edge", 10001), ("wearable", 10002)}
    # Every run replaces what was there: regenerated passwords reach the services.
    (generated / "clients/edge.password").write_text("rotated\n")
    assert install_secrets("--from", str(generated), "--broker", str(vol / "broker"), "--edge", str(vol / "edge"),
                           "--wearable", str(vol / "wearable")).returncode == 0
    assert (vol / "edge/edge.password").read_text() == "rotated\n"


def test_secrets_step_explains_what_is_wrong(tmp_path: Path) -> None:
    vol = ["--broker", str(tmp_path / "b"), "--edge", str(tmp_path / "e"), "--wearable", str(tmp_path / "w")]
    out = install_secrets("--from", str(tmp_path / "nothing"), *vol)
    assert out.returncode == 1 and "broker/passwd is missing" in out.stderr
    assert "--generate-only --hostname broker" in out.stderr and "Traceback" not in out.stderr
    generated = tmp_path / "generated"
    run_dev_generate(generated)  # no --hostname broker: the clients could not verify the broker
    out = install_secrets("--from", str(generated), *vol)
    assert out.returncode == 1 and "not 'broker'" in out.stderr and "--hostname broker" in out.stderr
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------
# The stack, without an engine: each container's paths mapped to directories on this machine


@dataclass
class ContainerView:
    """Where a container path of one service lives on this machine."""

    mounts: dict[str, Path] = field(default_factory=dict)  # container directory or file -> host path
    links: dict[str, str] = field(default_factory=dict)  # symlinks the image makes

    def host(self, path: str) -> Path:
        for link, target in self.links.items():
            if path == link or path.startswith(link + "/"):
                path = target + path[len(link):]
        best = max((m for m in self.mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len,
                   default=None)
        assert best is not None, f"{path} is on no mount of this container"
        return Path(str(self.mounts[best]) + path[len(best):])


def view(service: dict, volumes: Path, env: dict[str, str]) -> ContainerView:
    out = ContainerView()
    for kind, source, target, _ in mounts(service):
        out.mounts[target] = volumes / source if kind == "volume" else (DOCKER / interpolate(source, env)).resolve()
    return out


def free_port() -> int:
    return broker_process.free_port()


def to_toml(data: dict) -> str:
    """Enough TOML for edge.toml: tables of scalars and arrays of such tables."""

    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines: list[str] = []

    def table(name: str, body: dict) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, (dict, list))}
        if scalars or not body:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)
            elif isinstance(v, list):
                for item in v:
                    lines.append(f"[[{name}.{k}]]")
                    lines.extend(f"{ik} = {value(iv)}" for ik, iv in item.items())

    for name, body in data.items():
        table(name, body)
    return "\n".join(lines) + "\n"


@contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_compose_stack_carries_the_wearable_to_a_subscriber(tmp_path: Path) -> None:
    compose = load_compose()
    services = compose["services"]
    volumes = tmp_path / "volumes"
    generated = tmp_path / "generated"
    env = {"ECG_SECRETS_DIR": str(generated)}
    # 1. What the README says to run once, then the `secrets` service's own command.
    run_dev_generate(generated, "--hostname", "broker")
    step = services["secrets"]
    step_view = view(step, volumes, env)
    script = step_view.host(step["entrypoint"][-1])
    out = run_tool(sys.executable, str(script),
                   *[str(step_view.host(a)) if a.startswith("/") else a for a in step["command"]])
    assert out.returncode == 0

    # 2. The broker: broker/mosquitto.conf as the image lays it out, listeners moved to free ports.
    instructions = parse_dockerfile(DOCKER / "broker.Dockerfile")
    broker_view = view(services["broker"], volumes, env)
    for c in copies(instructions):
        broker_view.mounts[c.dest] = REPO / c.sources[0]
    for target, link in re.findall(r"ln -s (\S+) (\S+)", " ".join(i.args for i in instructions if i.keyword == "RUN")):
        broker_view.links[link] = target
    tls_port, plain_port = free_port(), free_port()
    lines = []
    for line in broker_view.host("/mosquitto/config/mosquitto.conf").read_text().splitlines():
        words = line.split()
        if words[:1] == ["listener"]:
            line = f"listener {tls_port if words[1] == '8883' else plain_port} 127.0.0.1"
        elif words and not words[0].startswith("#"):
            line = " ".join(str(broker_view.host(w)) + "/" * w.endswith("/") if w.startswith("/") else w
                            for w in words)
        lines.append(line)
    if os.geteuid() == 0:  # the files belong to the image's mosquitto user (1883), not this machine's
        lines.append("user root")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    (volumes / "broker-data").mkdir(parents=True, exist_ok=True)
    binary = broker_process.mosquitto_binary()
    if binary is None:
        pytest.fail("this test needs mosquitto (apt-get install mosquitto; .ci/run installs it)")

    # 3. The edge with docker/edge.toml, its paths on the edge's volumes, the broker on 127.0.0.1.
    edge = services["edge"]
    edge_view = view(edge, volumes, env)
    raw = tomllib.loads(edge_view.host(edge["command"][-1]).read_text())
    for key in ("ca_file", "password_file"):
        raw["broker"][key] = str(edge_view.host(raw["broker"][key]))
    raw["broker"].update(host="127.0.0.1", port=tls_port)
    metrics_port = free_port()
    compose_metrics_port = raw["metrics"]["port"]
    raw["metrics"].update(port=metrics_port, address="127.0.0.1")
    edge_toml = tmp_path / "edge.toml"
    edge_toml.write_text(to_toml(raw))
    cfg = load_config(edge_toml)  # the edge's own validator: every file exists, every key known
    assert cfg.broker.password() == (generated / "clients/edge.password").read_text().strip()
    healthcheck = edge["healthcheck"]["test"]
    assert healthcheck[:2] == ["CMD", "python"]
    probe = [sys.executable, *[a.replace(f":{compose_metrics_port}/", f":{metrics_port}/") for a in healthcheck[2:]]]

    # 4. The wearable's command, pointed at this broker, playing 4 s once at full speed.
    wearable = services["wearable"]
    wearable_view = view(wearable, volumes, env)
    argv = [str(wearable_view.host(a)) if a.startswith("/") else a for a in wearable["command"]]
    argv[argv.index("--broker") + 1] = f"127.0.0.1:{tls_port}"
    argv += ["--passes", "1", "--duration", "4", "--speed", "0"]

    subscriber_password = (generated / "clients/subscriber.password").read_text().strip()
    tls = aiomqtt.TLSParameters(ca_certs=str(generated / "ca/ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
    with running([binary, "-c", str(conf)], tmp_path / "broker.log"), \
            running([sys.executable, "-m", "edge.cli", "run", "--config", str(edge_toml)], tmp_path / "edge.log") as edge_proc:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert edge_proc.poll() is None, (tmp_path / "edge.log").read_text()
            assert time.monotonic() < deadline, "the edge's healthcheck never passed:\n" + (tmp_path / "edge.log").read_text()
            await asyncio.sleep(0.5)
        samples, states = 0, []
        async with aiomqtt.Client("127.0.0.1", tls_port, username="subscriber", password=subscriber_password,
                                  tls_params=tls) as sub:
            await sub.subscribe("ecg/anon/#", qos=1)
            await sub.subscribe("ecg/edge/#", qos=1)

            async def collect() -> None:
                nonlocal samples
                async for msg in sub.messages:
                    body = json.loads(msg.payload)
                    topic = str(msg.topic)
                    if topic.startswith("ecg/anon/") and topic.endswith("/ecg"):
                        samples += len(body["samples"])
                    elif topic.startswith("ecg/anon/") and topic.endswith("/status"):
                        states.append(body["state"])
                        if body["state"] == "ended":
                            return
                    elif topic == f"ecg/edge/{raw['sinks']['mqtt']['edge_id']}/status":
                        states.append(f"edge {body['state']}")

            collector = asyncio.create_task(collect())
            player = await asyncio.create_subprocess_exec(sys.executable, "-m", "edge.cli", *argv,
                                                          stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(60):
                played, errors = await player.communicate()
            if player.returncode != 0:
                collector.cancel()
                pytest.fail(f"the wearable's command failed: {errors.decode()}")
            assert b"played 208 1 time(s) on ecg/raw/strap-1" in played
            try:
                async with asyncio.timeout(30):
                    await collector
            except TimeoutError:
                pytest.fail(f"the subscriber saw {samples} samples and {states}, no ended session; edge log:\n"
                            + (tmp_path / "edge.log").read_text() + "\nbroker log:\n" + (tmp_path / "broker.log").read_text())
    log = (tmp_path / "edge.log").read_text()
    assert "edge online" in states and states[-1] == "ended", (states, log)
    assert samples == 4 * 360, log  # every raw sample of the wearable has its synthetic one
    assert "Denied" not in (tmp_path / "broker.log").read_text()
