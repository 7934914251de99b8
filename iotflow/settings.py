"""The one place that reads ``IOTFLOW_*`` environment variables.

``Settings.from_env()`` builds one frozen object that the app, the CLI and every client take
their configuration from. Defaults point at the local stack (``iotflow stack up``). A bad value
raises :class:`~iotflow.errors.SettingsError` naming the variable, the value and what was
expected, so a worker refuses to start instead of running half-configured.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iotflow.auth import KeyRing
from iotflow.errors import SettingsError

PREFIX = "IOTFLOW_"

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_STORES = ("rocksdb", "memory")


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0 or str(value) != raw.strip():
        raise SettingsError(name, raw, "a positive integer")
    return value


def _count(name: str, raw: str) -> int:
    value = int(raw) if raw.strip().isdigit() else -1
    if value < 0 or str(value) != raw.strip():
        raise SettingsError(name, raw, "a whole number (0 or more)")
    return value


def _port(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, raw, "a TCP port number (1-65535)") from None
    if not 1 <= value <= 65535:
        raise SettingsError(name, raw, "a TCP port number (1-65535)")
    return value


def _positive_number(what: str) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if not value > 0 or value != value or value == float("inf"):
            raise SettingsError(name, raw, f"a positive number of {what}")
        return value

    return parse


_positive_seconds = _positive_number("seconds")


def _ratio(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise SettingsError(name, raw, "a ratio from 0 to 1")
    return value


def _topic_prefix(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,100}", raw):
        raise SettingsError(name, raw, "letters, digits, '.', '_' or '-' (a Kafka topic name prefix)")
    return raw


def _non_empty(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(name, raw, "a non-empty string")
    return raw.strip()


def _host_ports(name: str, raw: str) -> str:
    """A comma-separated ``host:port`` list, as Kafka clients take it."""
    parts = [p.strip() for p in raw.split(",")]
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingsError(name, raw, "comma-separated host:port pairs, e.g. 127.0.0.1:19092")
    return ",".join(parts)


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        try:
            parts = urlsplit(raw.strip())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in schemes or not parts.hostname:
            raise SettingsError(name, raw, f"a URL with scheme {' or '.join(schemes)} and a host")
        return raw.strip()

    return parse


def _redis_url(name: str, raw: str) -> str:
    """redis://, rediss://, or redis+sentinel:// (rediss+sentinel://) with the sentinels' host:port
    list and the master's name in the path."""
    parts = urlsplit(raw.strip())
    if parts.scheme in ("redis", "rediss"):
        return _url("redis", "rediss")(name, raw)
    hosts = parts.netloc.rpartition("@")[2]
    segments = [s for s in parts.path.split("/") if s]
    valid = (parts.scheme in ("redis+sentinel", "rediss+sentinel") and bool(hosts) and 1 <= len(segments) <= 2
             and (len(segments) == 1 or segments[1].isdigit()))
    for host in hosts.split(",") if valid else ():
        hostname, _, port = host.rpartition(":")
        if not hostname or not (port.isdigit() and 1 <= int(port) <= 65535):
            valid = False
    if not valid:
        raise SettingsError(name, raw, "a redis:// URL, or redis+sentinel://host:port,…/<master name>[/<db>]")
    return raw.strip()


def _pg_dsn(name: str, raw: str) -> str:
    """A PostgreSQL URL with one host or several (``host1:5432,host2:5432``: libpq and asyncpg try
    them in order; with ``target_session_attrs=read-write`` they pick the primary after a failover)."""
    parts = urlsplit(raw.strip())
    hosts = parts.netloc.rpartition("@")[2]
    valid = parts.scheme in ("postgresql", "postgres") and bool(hosts)
    for host in hosts.split(",") if valid else ():
        hostname, sep, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if not hostname or (sep and not (port.isdigit() and 1 <= int(port) <= 65535)):
            valid = False
    if not valid:
        raise SettingsError(name, raw, "a postgresql:// URL with a host (or host:port,host:port,… for failover)")
    return raw.strip()


def _archive_url(name: str, raw: str) -> str:
    """empty, ``none``, ``file:///absolute/folder`` or ``s3://bucket[/prefix]``."""
    raw = raw.strip()
    if raw in ("", "none"):
        return raw
    parts = urlsplit(raw)
    if parts.scheme == "file" and not parts.netloc and parts.path.startswith("/") and parts.path != "/":
        return raw.rstrip("/")
    if parts.scheme == "s3" and re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc or "") \
            and not parts.query and not parts.fragment:
        return raw.rstrip("/")
    raise SettingsError(name, raw, "none, file:///an/absolute/folder or s3://bucket[/prefix]")


_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _kid(name: str, raw: str) -> str:
    if not _KID.fullmatch(raw.strip()):
        raise SettingsError(name, raw, "a key id: 1-64 letters, digits, '.', '_' or '-'")
    return raw.strip()


def _previous_keys(name: str, raw: str) -> str:
    """``kid=secret,kid=secret`` (each secret 32+ characters); the value is never shown in errors."""
    seen = set()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        kid, sep, secret = item.partition("=")
        if not sep or not _KID.fullmatch(kid) or len(secret) < 32 or kid in seen:
            raise SettingsError(name, "<hidden>", "comma-separated kid=secret pairs: distinct key ids, "
                                                 "secrets of at least 32 characters")
        seen.add(kid)
    return raw.strip()


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _optional_url(*schemes: str) -> Callable[[str, str], str]:
    parse = _url(*schemes)
    return lambda name, raw: raw.strip() if not raw.strip() else parse(name, raw)


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise SettingsError(name, raw, "true or false")
    return value == "true"


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(name, raw, f"one of {', '.join(choices)}")
        return value

    return parse


def _path(name: str, raw: str) -> Path:
    return Path(_non_empty(name, raw))


DEV_JWT_SECRET = "iotflow-development-secret-not-for-production"
# The local stack's MQTT platform accounts (iotflow/mqtt_auth.py); set your own outside development.
DEV_MQTT_PASSWORDS = {
    "admin": "iotflow-development-mqtt-admin-password",
    "bridge": "iotflow-development-mqtt-bridge-password",
    "platform": "iotflow-development-mqtt-platform-password",
}


def _secret(name: str, raw: str) -> str:
    if len(raw) < 32:
        raise SettingsError(name, "<hidden>", "a secret of at least 32 characters")
    return raw


def _setting(default: Any, parse: Callable[[str, str], Any], doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Everything iotflow is configured with. Field ``x`` is read from ``IOTFLOW_X``."""

    app_id: str = _setting("iotflow", _non_empty, "Faust app id: consumer group and changelog topic prefix")
    topic_prefix: str = _setting("", _topic_prefix, "prefix of every iotflow topic name (environments sharing a cluster)")
    kafka_bootstrap: str = _setting("127.0.0.1:19092", _host_ports, "Kafka bootstrap servers (host:port,…)")
    pg_dsn: str = _setting(
        "postgresql://iotflow:iotflow@127.0.0.1:15432/iotflow",
        _pg_dsn,
        "PostgreSQL DSN for device metadata, rollouts and the outbox (several hosts for failover)",
    )
    tsdb_dsn: str = _setting(
        "postgresql://iotflow:iotflow@127.0.0.1:15432/iotflow",
        _pg_dsn,
        "PostgreSQL/TimescaleDB DSN for sensor measurements (may be the same database)",
    )
    redis_url: str = _setting("redis://127.0.0.1:16379/0", _redis_url, "Redis URL for the cache (redis+sentinel://h:p,h:p/<master>/<db> under Sentinel)")
    mqtt_url: str = _setting("mqtt://127.0.0.1:11883", _url("mqtt", "mqtts"), "MQTT broker URL")
    mqtt_ca_file: str = _setting("", _text, "CA certificates (PEM) the broker's certificate must chain to, for an mqtts:// URL (empty: the system's)")
    mqtt_require_tls: bool = _setting(False, _flag, "true: refuse an mqtt:// URL — only mqtts:// (the production profile sets it)")
    stack_mqtt_tls_port: int = _setting(11884, _port, "port of the local stack's MQTT-over-TLS listener (certificate from the stack's throwaway CA, <stack>/mosquitto/tls/ca.crt)")
    mqtt_admin_user: str = _setting("iotflow-admin", _non_empty, "MQTT account that manages device credentials (Mosquitto dynamic security's $CONTROL)")
    mqtt_admin_password: str = _setting(DEV_MQTT_PASSWORDS["admin"], _secret, "password of IOTFLOW_MQTT_ADMIN_USER (32+ characters)", secret=True)
    mqtt_bridge_user: str = _setting("iotflow-bridge", _non_empty, "MQTT account of the bridges (subscribes to the devices' topics)")
    mqtt_bridge_password: str = _setting(DEV_MQTT_PASSWORDS["bridge"], _secret, "password of IOTFLOW_MQTT_BRIDGE_USER (32+ characters)", secret=True)
    mqtt_platform_user: str = _setting("iotflow-platform", _non_empty, "MQTT account of the workers' command publisher (publishes to devices' commands)")
    mqtt_platform_password: str = _setting(DEV_MQTT_PASSWORDS["platform"], _secret, "password of IOTFLOW_MQTT_PLATFORM_USER (32+ characters)", secret=True)
    web_host: str = _setting("127.0.0.1", _non_empty, "host the worker's web server binds and advertises")
    web_port: int = _setting(6066, _port, "port of the worker's web server")
    topic_partitions: int = _setting(8, _positive_int, "partitions of iotflow's topics and tables")
    replication_factor: int = _setting(1, _positive_int, "replication factor of iotflow's topics")
    min_insync_replicas: int = _setting(1, _positive_int, "min.insync.replicas of iotflow's topics")
    processing_guarantee: str = _setting(
        "at_least_once", _choice("at_least_once", "exactly_once"), "Faust processing guarantee"
    )
    store: str = _setting("rocksdb", _choice(*_STORES), "table store: rocksdb (durable) or memory (tests)")
    table_standby_replicas: int = _setting(1, _count, "standby copies of each table partition kept by other workers, so a worker taking a partition over has its table already (0: it reads the changelog first)")
    data_dir: Path | None = _setting(
        None, _path, "worker state folder (RocksDB); default .iotflow/worker-<web port>"
    )
    rocksdb_block_cache_mib: int = _setting(8, _positive_int, "RocksDB block cache per table partition (MiB)")
    rocksdb_write_buffer_mib: int = _setting(4, _positive_int, "RocksDB write buffer per table partition (MiB; two of them at most)")
    gc_gen0_threshold: int = _setting(50_000, _positive_int, "allocations between two young-generation collections of Python's garbage collector in the worker (Python's default: 700); objects made at start are frozen out of collections")
    sink_batch_size: int = _setting(2000, _positive_int, "rows per COPY batch into sensor_measurements")
    sink_flush_interval_s: float = _setting(0.5, _positive_seconds, "longest a row waits for its batch")
    pg_pool_size: int = _setting(4, _positive_int, "connections per worker to each database")
    dedup_window_s: float = _setting(3600.0, _positive_seconds, "how long a msg_id is remembered as seen")
    max_clock_skew_s: float = _setting(300.0, _positive_seconds, "how far in the future a device's ts may be")
    retention_days: int = _setting(90, _positive_int, "hot window: measurements older than this are refused; days past it are archived, then dropped")
    archive_url: str = _setting(
        "", _archive_url,
        "cold tier: where days past the hot window go as Parquet before they are dropped "
        "(file:///folder or s3://bucket/prefix; none: drop them unarchived); empty: .iotflow/archive in the working folder")
    archive_keep_days: int = _setting(730, _positive_int, "days the cold tier keeps an archived day before deleting it")
    archive_interval_s: float = _setting(3600.0, _positive_seconds, "pause between the archive job's runs (leader worker)")
    archive_spool_dir: Path | None = _setting(None, _path, "folder the archive job writes a day's Parquet in before it uploads it (default: the system's temporary folder)")
    archive_s3_endpoint: str = _setting("", _optional_url("http", "https"), "S3 API endpoint URL for s3:// archives (empty: AWS's own)")
    archive_s3_region: str = _setting("us-east-1", _non_empty, "region of the s3:// archive's bucket")
    archive_s3_access_key_id: str = _setting("", _text, "access key of the s3:// archive (empty: the AWS default credential chain)")
    archive_s3_secret_access_key: str = _setting("", _text, "secret key of the s3:// archive", secret=True)
    bridge_client_id: str = _setting(
        "iotflow-bridge-1", _non_empty, "MQTT client id of a bridge: stable, and distinct per bridge"
    )
    bridge_group: str = _setting("iotflow-bridge", _non_empty, "shared-subscription group the bridges split load in")
    bridge_subscription: str = _setting("shared", _choice("shared", "exclusive"), "shared: bridges split the load (Mosquitto 2.0 drops what arrives between its restart and their reconnect); exclusive: each bridge takes everything, kept across broker restarts")
    bridge_metrics_port: int = _setting(9108, _port, "port of the bridge's Prometheus /metrics (bound on IOTFLOW_WEB_HOST)")
    bridge_max_in_flight: int = _setting(1000, _positive_int, "MQTT messages a bridge holds unacknowledged (Receive Maximum)")
    bridge_device_rate_per_s: float = _setting(50.0, _positive_number("messages per second"), "messages/s a device may send before the bridge delays it")
    bridge_device_burst: int = _setting(100, _positive_int, "messages a device may burst above its rate")
    loss_threshold: float = _setting(0.001, _ratio, "share of messages missing (seq gaps) that marks the pipeline unhealthy")
    outbox_batch_size: int = _setting(500, _positive_int, "device events the outbox relay publishes per round")
    outbox_interval_s: float = _setting(0.2, _positive_seconds, "pause between the outbox relay's rounds (leader worker)")
    last_seen_flush_s: float = _setting(5.0, _positive_seconds, "how often heartbeats' last_seen are written to PostgreSQL")
    rollout_tick_s: float = _setting(1.0, _positive_seconds, "pause between the rollout orchestrator's ticks (leader worker)")
    unknown_device_wait_s: float = _setting(30.0, _positive_seconds, "how long telemetry of a device the registry does not know waits for its registration before the DLQ (unknown_device)")
    unknown_device_max_parked: int = _setting(10000, _positive_int, "messages of unknown devices a worker holds while they wait; beyond it the longest-waiting device's go to the DLQ")
    offline_after_s: float = _setting(90.0, _positive_seconds, "a device without a heartbeat for this long is offline")
    jwt_secret: str = _setting(DEV_JWT_SECRET, _secret, "HS256 key of the API's bearer tokens (32+ characters; set it outside development)", secret=True)
    jwt_kid: str = _setting("k1", _kid, "key id of IOTFLOW_JWT_SECRET: tokens are signed with it and name it (kid); change both to rotate")
    jwt_previous_keys: str = _setting("", _previous_keys, "keys still accepted after a rotation, as kid=secret,… (remove one to retire it)", secret=True)
    api_max_body_bytes: int = _setting(4 * 1024 * 1024, _positive_int, "largest request body the web server reads (larger: 413)")
    api_write_rate_per_s: float = _setting(50.0, _positive_number("requests per second"), "mutating API requests per second one token subject may make on one worker (ingest aside); beyond its burst: 429 with Retry-After")
    api_write_burst: int = _setting(200, _positive_int, "mutating API requests one token subject may burst above its rate")
    jwt_issuer: str = _setting("iotflow", _non_empty, "issuer (iss) the API's tokens must name")
    jwt_audience: str = _setting("iotflow-api", _non_empty, "audience (aud) the API's tokens must name")
    stack_dir: Path = _setting(Path(".stack"), _path, "folder of the local stack's data and logs (iotflow stack)")
    shutdown_drain_s: float = _setting(5.0, _positive_seconds, "after SIGTERM: seconds the worker answers /health/ready 503 (draining) and keeps serving before it stops")
    log_level: str = _setting("info", _choice(*_LOG_LEVELS), "log level")
    kafka_request_timeout_s: float = _setting(30.0, _positive_seconds, "Kafka request timeout")
    kafka_session_timeout_s: float = _setting(30.0, _positive_seconds, "Kafka consumer session timeout")
    pg_connect_timeout_s: float = _setting(3.0, _positive_seconds, "PostgreSQL connect timeout")
    pg_command_timeout_s: float = _setting(10.0, _positive_seconds, "PostgreSQL statement timeout")
    redis_timeout_s: float = _setting(0.5, _positive_seconds, "Redis connect and command timeout")
    cache_ttl_s: int = _setting(60, _positive_int, "seconds a cached device record lives in Redis")
    mqtt_keepalive_s: float = _setting(30.0, _positive_seconds, "MQTT keepalive interval")

    def __post_init__(self) -> None:
        if self.mqtt_require_tls and urlsplit(self.mqtt_url).scheme != "mqtts":
            raise SettingsError(env_name("mqtt_url"), self.mqtt_url, "an mqtts:// URL (IOTFLOW_MQTT_REQUIRE_TLS is true)")
        if self.jwt_kid in self.jwt_keys.previous:
            raise SettingsError(env_name("jwt_kid"), self.jwt_kid,
                                "a key id IOTFLOW_JWT_PREVIOUS_KEYS does not name too (the current key is not a previous one)")
        if self.min_insync_replicas > self.replication_factor:
            raise SettingsError(
                env_name("min_insync_replicas"),
                str(self.min_insync_replicas),
                f"at most IOTFLOW_REPLICATION_FACTOR ({self.replication_factor})",
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``); raise on the first bad value.
        A secret may come from a file instead: ``IOTFLOW_X_FILE`` names it (as Docker and Kubernetes
        mount secrets); its content, without the trailing newline, is the value."""
        environ = os.environ if environ is None else environ
        fields = dataclasses.fields(cls)
        known = {env_name(f.name) for f in fields} | {env_name(f.name) + "_FILE" for f in fields if not f.repr}
        unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise SettingsError(unknown[0], environ[unknown[0]], "a known IOTFLOW_* variable (see README)")
        values = {}
        for f in fields:
            raw = environ.get(env_name(f.name))
            if not f.repr and env_name(f.name) + "_FILE" in environ:
                raw = _secret_file(env_name(f.name), environ[env_name(f.name) + "_FILE"], raw)
            if raw is not None:
                values[f.name] = f.metadata["parse"](env_name(f.name), raw)
        return cls(**values)

    @property
    def worker_dir(self) -> Path:
        """Where this worker keeps its RocksDB tables; one folder per worker on a host."""
        return self.data_dir or Path(".iotflow") / f"worker-{self.web_port}"

    @property
    def jwt_keys(self) -> KeyRing:
        """The current signing key and the previous ones still accepted, by key id."""
        previous = dict(item.strip().split("=", 1) for item in self.jwt_previous_keys.split(",") if item.strip())
        return KeyRing(self.jwt_kid, self.jwt_secret, previous)

    @property
    def archive_location(self) -> str | None:
        """The cold tier's URL, or None when days past the hot window are dropped unarchived."""
        if self.archive_url == "none":
            return None
        return self.archive_url or f"file://{Path.cwd() / '.iotflow' / 'archive'}"


def _secret_file(name: str, path: str, direct: str | None) -> str:
    if direct is not None:
        raise SettingsError(name + "_FILE", path, f"either {name} or {name}_FILE, not both")
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(name + "_FILE", path, f"a readable file ({exc.strerror})") from None


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def documented() -> list[tuple[str, str, str]]:
    """``(variable, default, meaning)`` for every setting, in declaration order (for the docs)."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = "" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        rows.append((env_name(f.name), default, f.metadata["doc"]))
    return rows
