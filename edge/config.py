"""``edge.toml``: what a gateway operator configures, validated before anything starts.

Unknown keys are errors (a typo must not silently fall back to a default), paths are checked to
exist, and every error names the key it is about. ``ecg-edge run --validate-config`` runs only
this. docs/edge-config.md documents every key; ``examples/edge.toml`` is a working example.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Strict):
    """The MQTT broker the edge connects to (sources and sinks share it)."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None  # CA that signed the broker's certificate (TLS)
    cert_file: Path | None = None  # client certificate (mutual TLS), with key_file
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None  # first line is the password (kept out of the config)
    client_id: str | None = None
    keepalive: int = Field(30, ge=3, le=3600)  # a crashed worker's shards move after 1.5 x keepalive

    @model_validator(mode="after")
    def _files_exist(self) -> BrokerSettings:
        for name in ("ca_file", "cert_file", "key_file", "password_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"broker.{name}: {path} is not a file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("broker.cert_file and broker.key_file go together")
        if self.password_file is not None and self.username is None:
            raise ValueError("broker.password_file needs broker.username")
        if self.password_file is not None:
            try:
                first = Path(self.password_file).read_text().splitlines()[:1]
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"broker.password_file: cannot read {self.password_file}: {exc}") from None
            if not first or not first[0].strip():
                raise ValueError(f"broker.password_file: {self.password_file} is empty (the first line is the password)")
        return self

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return Path(self.password_file).read_text().splitlines()[0].strip()


class ModelSettings(_Strict):
    generator: Path | None = None  # default: the generator shipped with the package
    classifier: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> ModelSettings:
        for name in ("generator", "classifier"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"models.{name}: {path} is not a file")
        return self


class PipelineConfig(_Strict):
    seed: int | None = None
    persona_spread: float = Field(1.0, ge=0.0, le=3.0)
    beat_spread: float = Field(1.0, ge=0.0, le=3.0)
    redraw: int = Field(0, ge=0, le=64)  # classifier-guided redraw tries per surrogate (0: off)
    redraw_classes: tuple[Literal["N", "S", "V", "F", "Q"], ...] = ("S", "V", "F", "Q")
    pseudonym: Literal["random", "keyed"] = "random"
    pseudonym_secret_file: Path | None = None  # keyed pseudonyms: the site secret (>= 16 bytes)
    lost_s: float = Field(3.0, gt=0.5, le=60.0)
    max_gap_s: float = Field(10.0, gt=0.0, le=600.0)
    max_frame_s: float = Field(10.0, gt=0.0, le=120.0)
    tick_s: float = Field(0.02, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _secret(self) -> PipelineConfig:
        if self.pseudonym == "keyed":
            if self.pseudonym_secret_file is None:
                raise ValueError("pipeline.pseudonym = 'keyed' needs pipeline.pseudonym_secret_file")
            if not Path(self.pseudonym_secret_file).is_file():
                raise ValueError(f"pipeline.pseudonym_secret_file: {self.pseudonym_secret_file} is not a file")
            if len(Path(self.pseudonym_secret_file).read_bytes().strip()) < 16:
                raise ValueError("pipeline.pseudonym_secret_file: the secret must be at least 16 bytes")
        return self

    def secret(self) -> bytes | None:
        if self.pseudonym != "keyed" or self.pseudonym_secret_file is None:
            return None
        return Path(self.pseudonym_secret_file).read_bytes().strip()


class MqttSourceConfig(_Strict):
    topic_prefix: str = "ecg/raw"  # devices publish on <prefix>/<device> (or <prefix>/<shard>/<device>)
    # this worker owns <prefix>/<shard>/# for each; empty: all of <prefix>/#; "auto": the shards it wins
    # among the live workers, moving as workers come and go (edge/cluster.py, docs/scale-out.md)
    shards: list[str] | Literal["auto"] = []
    shard_count: int | None = Field(None, ge=1, le=4096, validate_default=True)  # the fleet's, with "auto"
    handover_timeout_s: float = Field(10.0, gt=0.0, le=300.0)  # "auto": longest wait for takeover at a stop
    # subscribe $share/<group>/<prefix>/# instead: only on a broker that keeps a topic on one member
    # (EMQX's hash_topic strategy, docs/scale-out.md); round-robin would split each device's stream
    shared_group: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_frame_samples: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _one_way_to_split(self) -> MqttSourceConfig:
        if self.shared_group is not None and self.shards:
            raise ValueError("shared_group and shards are two ways to split a fleet between workers: use one")
        return self

    @field_validator("shards", mode="before")
    @classmethod
    def _auto_or_list(cls, value: object) -> object:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f'must be "auto" or a list of shard names, got {value!r}')
        return value

    @field_validator("shard_count")
    @classmethod
    def _count_with_auto(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "shards" not in info.data:  # shards itself is wrong: that error says enough
            return value
        auto = info.data["shards"] == "auto"
        if auto and value is None:
            raise ValueError('required with shards = "auto": the number of shards the wearables hash their '
                             "device names into (the same on every worker and wearable)")
        if not auto and value is not None:
            raise ValueError('only with shards = "auto"')
        return value


class BleSourceConfig(_Strict):
    address: str | None = None  # connect to this strap; None: the first one advertising name_prefix
    name_prefix: str = "Polar H10"
    reconnect_initial_s: float = Field(1.0, gt=0.0)
    reconnect_max_s: float = Field(60.0, gt=0.0)


class ReplaySourceConfig(_Strict):
    record: Path  # a WFDB record path without suffix, played as a wearable
    channel: int = Field(0, ge=0)
    speed: float = Field(1.0, ge=0.0)  # 1 = real time, 0 = as fast as possible
    frame_s: float = Field(0.25, gt=0.0, le=10.0)
    device: str | None = None  # device key (default: the record name)

    @model_validator(mode="after")
    def _exists(self) -> ReplaySourceConfig:
        if not Path(f"{self.record}.hea").is_file():
            raise ValueError(f"sources.replay.record: {self.record}.hea does not exist")
        return self


class Sources(_Strict):
    mqtt: list[MqttSourceConfig] = []
    ble: list[BleSourceConfig] = []
    replay: list[ReplaySourceConfig] = []


class MqttSinkConfig(_Strict):
    topic_prefix: str = "ecg/anon"
    edge_id: str | None = None  # names the edge's own status topic; default: a random id per start


class WfdbSinkConfig(_Strict):
    directory: Path  # one WFDB record per session, named by its pseudonym


class Sinks(_Strict):
    mqtt: MqttSinkConfig | None = None
    wfdb: WfdbSinkConfig | None = None


class MetricsConfig(_Strict):
    port: int = Field(9108, ge=0, le=65535)  # 0: no endpoint
    address: str = "127.0.0.1"


class RefreshConfig(_Strict):
    """Signed model refresh while running (docs/model-refresh.md); off unless keys are given."""

    public_keys: list[Path] = []  # trusted Ed25519 public keys (PEM, ecg-trainer keygen)
    topic_prefix: str = "ecg/models"  # announcements are retained on <prefix>/generator and <prefix>/classifier
    max_model_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    @model_validator(mode="after")
    def _keys(self) -> RefreshConfig:
        from edge.announce import load_public_key

        for path in self.public_keys:
            if not Path(path).is_file():
                raise ValueError(f"refresh.public_keys: {path} is not a file")
            try:
                load_public_key(path)
            except ValueError as exc:
                raise ValueError(f"refresh.public_keys: {exc}") from None
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.public_keys)


class EdgeConfig(_Strict):
    broker: BrokerSettings = BrokerSettings()
    models: ModelSettings = ModelSettings()
    refresh: RefreshConfig = RefreshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    sources: Sources = Sources()
    sinks: Sinks = Sinks()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _something_to_do(self) -> EdgeConfig:
        if not (self.sources.mqtt or self.sources.ble or self.sources.replay):
            raise ValueError("no sources: add [[sources.mqtt]], [[sources.ble]] or [[sources.replay]]")
        if self.sinks.mqtt is None and self.sinks.wfdb is None:
            raise ValueError("no sinks: add [sinks.mqtt] or [sinks.wfdb]")
        if sum(m.shards == "auto" for m in self.sources.mqtt) > 1:
            raise ValueError('sources.mqtt: only one MQTT source may have shards = "auto" (a worker is one member '
                             "of one cluster)")
        return self


class ConfigError(ValueError):
    """The config file cannot be used; the message lists every problem with its key."""


def load_config(path: str | Path) -> EdgeConfig:
    """Read and validate ``edge.toml``. Relative paths in it are relative to the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = _resolve_paths(raw, path.parent)
    try:
        return EdgeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"  {where}: {message}")
        raise ConfigError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems)) from None


_PATH_KEYS = {"ca_file", "cert_file", "key_file", "password_file", "generator", "classifier",
              "pseudonym_secret_file", "record", "directory", "public_keys"}


def _resolve_path(value: str | list[object], base: Path) -> object:
    if isinstance(value, list):  # a list of paths (refresh.public_keys)
        return [str(base / v) if isinstance(v, str) else v for v in value]
    return str(base / value)


def _resolve_paths(node: object, base: Path) -> object:
    if isinstance(node, dict):
        return {k: (_resolve_path(v, base) if k in _PATH_KEYS and isinstance(v, (str, list)) else _resolve_paths(v, base))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_paths(v, base) for v in node]
    return node
