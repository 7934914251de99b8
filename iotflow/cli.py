"""The ``iotflow`` command: one click group, one subcommand per operator task."""
from __future__ import annotations

import asyncio
import json
import sys

import click

from iotflow.errors import IotflowError, SettingsError
from iotflow.settings import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _print_json(result: object) -> None:
    """A benchmark's figures, as indented JSON on stdout."""
    click.echo(json.dumps(result, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """iotflow: IoT telemetry pipeline and device-management plane on Faust.

    Run a worker with `faust -A iotflow worker -l info`.
    """


@main.group()
def stack() -> None:
    """The local stack: Apache Kafka (KRaft), PostgreSQL, Redis and Mosquitto on loopback."""


def _selected(names: tuple[str, ...]) -> dict:
    from iotflow.stack import services

    available = services(_settings())
    unknown = [n for n in names if n not in available]
    if unknown:
        raise click.BadParameter(f"unknown service {unknown[0]!r}; choose from {', '.join(available)}")
    return {n: s for n, s in available.items() if not names or n in names}


@stack.command("up")
@click.argument("names", nargs=-1)
def stack_up(names: tuple[str, ...]) -> None:
    """Install what is missing, start each service (all by default) and wait until it answers."""
    for name, service in _selected(names).items():
        click.echo(f"starting {name} …", err=True)
        try:
            service.start()
        except IotflowError as exc:
            raise click.ClickException(f"{name}: {exc}") from None
        click.echo(service.status().line())


@stack.command("down")
@click.argument("names", nargs=-1)
def stack_down(names: tuple[str, ...]) -> None:
    """Stop each service (all by default), keeping its data."""
    for name, service in reversed(list(_selected(names).items())):
        try:
            service.stop()
        except IotflowError as exc:
            raise click.ClickException(f"{name}: {exc}") from None
        click.echo(f"{name:<10} stopped")


@stack.command("status")
def stack_status() -> None:
    """Say what is up; exit 1 when any service is down."""
    statuses = [service.status() for service in _selected(()).values()]
    for status in statuses:
        click.echo(status.line())
    if not all(s.up for s in statuses):
        sys.exit(1)


@main.group()
def topics() -> None:
    """Kafka topics of iotflow."""


@topics.command("create")
def topics_create() -> None:
    """Create iotflow's missing topics (partitions, replication, min.insync.replicas from settings);
    report how existing ones differ from the settings."""
    from iotflow.kafka_admin import drift, ensure_topics

    from iotflow import topics as topic_names

    settings = _settings()
    created = asyncio.run(ensure_topics(settings))
    click.echo(f"created: {', '.join(created)}" if created else "all topics exist")
    # Only topics that existed before: the broker's metadata may not list a new one yet.
    existing = tuple(t for t in topic_names.ALL if topic_names.name(settings, t) not in created)
    for difference in asyncio.run(drift(settings, existing)) if existing else []:
        click.echo(f"drift: {difference.line()}", err=True)


@topics.command("check")
def topics_check() -> None:
    """Report how iotflow's topics differ from the settings; exit 1 on any difference."""
    from iotflow.kafka_admin import drift

    differences = asyncio.run(drift(_settings()))
    for difference in differences:
        click.echo(f"drift: {difference.line()}")
    if differences:
        sys.exit(1)
    click.echo("topics match the settings")


@main.group()
def migrate() -> None:
    """Schema migrations of the time-series database (schema/NNNN_name.{up,down}.sql)."""


def _migrate(step: str, target: int | None, verb: str, nothing: str) -> None:
    """Run ``Migrator.up`` or ``Migrator.down`` and say what it did."""
    from iotflow.migrate import migrator

    try:
        done = asyncio.run(getattr(migrator(_settings()), step)(target))
    except IotflowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(f"{verb} {m.version:04d} {m.name}" for m in done) or nothing)


@migrate.command("up")
@click.option("--to", "target", type=int, default=None, help="stop after this version (default: all)")
def migrate_up(target: int | None) -> None:
    """Apply pending migrations, each in its own transaction; a second run does nothing."""
    _migrate("up", target, "applied", "nothing to apply")


@migrate.command("down")
@click.option("--to", "target", type=int, required=True, help="roll back every migration newer than this (0 = all)")
def migrate_down(target: int) -> None:
    """Roll back applied migrations newer than --to, newest first."""
    _migrate("down", target, "rolled back", "nothing to roll back")


@migrate.command("status")
def migrate_status() -> None:
    """List every migration as applied or pending; exit 1 if any is pending or changed."""
    from iotflow.migrate import migrator

    states = asyncio.run(migrator(_settings()).status())
    for state in states:
        click.echo(state.line())
    if not all(s.applied and not s.changed for s in states):
        sys.exit(1)


@main.command()
def bridge() -> None:
    """Move device messages from MQTT to Kafka, acknowledging each only after Kafka has it."""
    from iotflow.bridge import run_bridge

    run_bridge(_settings())


@main.command()
@click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True, help="simulated devices")
@click.option("--count", type=click.IntRange(min=1), default=None, help="messages per device (default 100 unless --duration)")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="seconds to run instead of a count")
@click.option("--rate", type=click.FloatRange(min=0.01), default=10.0, show_default=True, help="messages/s per device")
@click.option("--duplicates", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="share sent twice (same msg_id)")
@click.option("--malformed", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="share of extra malformed payloads")
@click.option("--seed", type=int, default=0, show_default=True, help="makes every random choice reproducible")
@click.option("--prefix", default="sim", show_default=True, help="device ids are PREFIX-00000, PREFIX-00001, …")
@click.option("--summary", type=click.Path(dir_okay=False, writable=True), default=None, help="write the JSON summary here (default: stdout)")
@click.option("--register/--no-register", default=True, show_default=True,
              help="provision the fleet in the device registry first (unregistered devices' telemetry waits, then goes to the DLQ)")
@click.option("--firmware", "firmware_version", default=None,
              help="answer firmware commands, starting at this version (e.g. 1.0.0); without it commands are ignored")
@click.option("--fail-updates", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of updates that fail (checksum mismatch)")
@click.option("--stall-updates", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of updates after which the device goes silent mid-update (times out)")
@click.option("--silent-after-update", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of updates reported SUCCEEDED after which the device never heartbeats again")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="seconds between heartbeats")
def simulate(devices: int, count: int | None, duration: float | None, rate: float, duplicates: float,
             malformed: float, seed: int, prefix: str, summary: str | None, register: bool,
             firmware_version: str | None, fail_updates: float, stall_updates: float, silent_after_update: float,
             heartbeat_s: float) -> None:
    """Run a fleet of simulated devices publishing telemetry over MQTT (QoS 1); print what each sent."""
    from iotflow.simulator import FirmwareBehaviour, Fleet, FleetConfig

    if fail_updates + stall_updates + silent_after_update > 1:
        raise click.BadParameter("--fail-updates, --stall-updates and --silent-after-update add up to more than 1")

    config = FleetConfig(
        devices=devices,
        messages_per_device=None if duration is not None and count is None else (count or 100),
        duration_s=duration,
        rate_per_device=rate,
        duplicate_ratio=duplicates,
        malformed_ratio=malformed,
        seed=seed,
        prefix=prefix,
        progress=sys.stderr.isatty() or summary is not None,
        register=register,
        heartbeat_s=heartbeat_s,
        firmware=FirmwareBehaviour(version=firmware_version, fail_ratio=fail_updates, timeout_ratio=stall_updates,
                                   silent_ratio=silent_after_update) if firmware_version else None,
    )
    fleet = Fleet(_settings(), config)
    result = fleet.run()
    if register:
        click.echo(f"registered {fleet.registered} new device(s) of {devices}", err=True)
    text = json.dumps(result, indent=2)
    if summary:
        with open(summary, "w") as out:
            out.write(text)
        click.echo(json.dumps(result["totals"]), err=True)
    else:
        click.echo(text)


@main.group()
def devices() -> None:
    """Provision devices in the registry (the API does one at a time: POST /api/v1/devices)."""


@devices.command("register")
@click.option("--prefix", required=True, help="device ids are PREFIX-00000, PREFIX-00001, … (as the simulator names them)")
@click.option("--count", type=click.IntRange(min=1, max=1_000_000), required=True, help="how many devices")
@click.option("--type", "device_type", default="simulated", show_default=True, help="the devices' type")
@click.option("--tag", "tags", multiple=True, help="a tag of every device (repeatable)")
def devices_register(prefix: str, count: int, device_type: str, tags: tuple[str, ...]) -> None:
    """Register a fleet in one go; devices that exist are left as they are."""
    from iotflow.registry import provision
    from iotflow.simulator import device_ids

    try:
        created = asyncio.run(provision(_settings(), device_ids(prefix, count), device_type=device_type, tags=tags))
    except IotflowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"registered {created} new device(s) of {count}")


@devices.command("credentials")
@click.option("--prefix", required=True, help="device ids are PREFIX-00000, PREFIX-00001, …")
@click.option("--count", type=click.IntRange(min=1, max=1_000_000), required=True, help="how many devices")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), required=True,
              help="JSON file {device id: password} written here (mode 0600); the passwords are shown nowhere else")
def devices_credentials(prefix: str, count: int, out: str) -> None:
    """Give a fleet's devices new MQTT passwords (accounts made where missing; old passwords stop working)."""
    import os

    from iotflow.mqtt_auth import DynamicSecurity
    from iotflow.simulator import device_ids

    try:
        with DynamicSecurity(_settings(), timeout_s=120.0) as control:
            passwords = control.issue(device_ids(prefix, count))
    except IotflowError as exc:
        raise click.ClickException(str(exc)) from None
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(passwords, handle, indent=1)
    click.echo(f"issued {len(passwords)} MQTT password(s) into {out}")


@main.group()
def mqtt() -> None:
    """The MQTT broker's accounts and device ACLs (Mosquitto dynamic security; docs/security.md)."""


@mqtt.command("setup")
def mqtt_setup() -> None:
    """Create or update the platform's roles and the bridge and platform accounts (idempotent);
    ``iotflow stack up`` does it for the local broker."""
    from iotflow.mqtt_auth import DynamicSecurity

    try:
        with DynamicSecurity(_settings()) as control:
            control.ensure_platform_accounts()
    except IotflowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("MQTT roles and platform accounts are set up")


@mqtt.command("acl-file")
def mqtt_acl_file() -> None:
    """Print the broker's acl_file: each device's own topics, by username."""
    from iotflow.mqtt_auth import acl_file_text

    click.echo(acl_file_text(), nl=False)


@main.command()
@click.option("--messages", type=click.IntRange(min=1000), default=1_000_000, show_default=True,
              help="messages preloaded into a fresh topic")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="also run Quix Streams and the two Faust floors (--no-peers: the raw baseline and iotflow only)")
def bench(messages: int, peers: bool) -> None:
    """Measure the worker's ingest path against a bare aiokafka + COPY baseline in the same run."""
    from iotflow.bench import run

    _print_json(run(_settings(), messages, peers=peers))


@main.group()
def dlq() -> None:
    """Triage sensor-data-dlq and replay what can now be stored (docs/runbooks/dlq.md)."""


_KIND = click.Choice(["invalid", "rejected", "unknown_device", "deleted_device", "identity_mismatch"])


@dlq.command("inspect")
@click.option("--kind", "kinds", type=_KIND, multiple=True, help="only records of this kind (repeatable)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="print at most this many records")
def dlq_inspect(kinds: tuple[str, ...], limit: int | None) -> None:
    """Print the DLQ's records as JSON lines (original bytes, kind, field, reason, source); counts by kind on stderr."""
    from collections import Counter

    from iotflow.dlq import inspect

    async def main_() -> Counter:
        counts: Counter = Counter()
        async for record in inspect(_settings(), kinds=kinds):
            counts[record.kind] += 1
            if limit is None or sum(counts.values()) <= limit:
                click.echo(json.dumps(record.as_json()))
        return counts

    click.echo(json.dumps({"records_by_kind": dict(asyncio.run(main_()))}), err=True)


@dlq.command("replay")
@click.option("--kind", "kinds", type=_KIND, multiple=True, required=True,
              help="replay records of this kind (repeatable), e.g. unknown_device once the devices are registered")
@click.option("--device", default=None, help="only this device's records")
@click.option("--dry-run", is_flag=True, help="count what would be replayed; send and commit nothing")
def dlq_replay(kinds: tuple[str, ...], device: str | None, dry_run: bool) -> None:
    """Send DLQ records back to sensor-data (original key and bytes); progress is committed, so a second run goes on."""
    from iotflow.dlq import replay

    counts = asyncio.run(replay(_settings(), kinds=kinds, device=device, dry_run=dry_run))
    click.echo(json.dumps({"dry_run": dry_run, **counts}))


@main.group()
def cache() -> None:
    """The Redis cache of device reads (docs/runbooks/redis-cache.md)."""


@cache.command("flush")
def cache_flush() -> None:
    """Delete every cached device record (reads refill from PostgreSQL); other Redis keys stay."""
    from iotflow.cache import DeviceCache, client_for

    settings = _settings()

    async def flush() -> int:
        cache = DeviceCache(client_for(settings.redis_url, timeout_s=max(settings.redis_timeout_s, 5.0)),
                            timeout_s=settings.redis_timeout_s, ttl_s=settings.cache_ttl_s)
        try:
            return await cache.flush()
        finally:
            await cache.close()

    click.echo(f"removed {asyncio.run(flush())} cached device record(s)")


@main.group()
def archive() -> None:
    """The cold tier: days past the hot window as Parquet in object storage (docs/archive.md)."""


def _day(_ctx: click.Context, _param: click.Parameter, value: str | None):
    from datetime import date

    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD, UTC)") from None


@archive.command("run")
def archive_run() -> None:
    """Archive, verify and drop every day past the hot window; delete archived days past the keep time."""
    import asyncpg

    from iotflow.archive import ArchiveError, Archiver
    from iotflow.objectstore import ObjectStore

    settings = _settings()
    if settings.archive_location is None:
        raise click.ClickException("the archive is switched off (IOTFLOW_ARCHIVE_URL=none): nothing to run")
    try:
        report = asyncio.run(Archiver(settings, ObjectStore.from_settings(settings),
                                      spool=settings.archive_spool_dir).run())
    except ArchiveError as exc:
        raise click.ClickException(f"archive run stopped ({exc.stage}): {exc}") from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"archive run could not reach the database: {exc}") from None
    if report.busy:
        raise click.ClickException("another archive run holds the lock (the leader worker's, or another command's)")
    click.echo(json.dumps(report.as_dict(), indent=2))


@archive.command("restore")
@click.option("--from", "first", required=True, callback=_day, help="first day to restore (YYYY-MM-DD, UTC)")
@click.option("--to", "last", required=True, callback=_day, help="last day to restore, inclusive")
@click.option("--devices", default=None, help="only these devices (comma-separated ids)")
def archive_restore(first, last, devices: str | None) -> None:
    """Load archived days into sensor_measurements_restored (checksums verified; rows already there are kept)."""
    import asyncpg

    from iotflow.archive import ArchiveError, restore
    from iotflow.objectstore import ObjectStore

    settings = _settings()
    if last < first:
        raise click.BadParameter("--to is before --from", param_hint="--to")
    wanted = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    try:
        report = asyncio.run(restore(settings, ObjectStore.from_settings(settings), first, last, wanted))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"restore could not reach the database: {exc}") from None
    click.echo(json.dumps(report.as_dict(), indent=2))


@archive.command("list")
def archive_list() -> None:
    """The archived days: rows, time span, parts and bytes, one JSON line each."""
    from iotflow.archive import Archive
    from iotflow.objectstore import ObjectStore

    store = Archive(ObjectStore.from_settings(_settings()))
    for day in store.days():
        manifest = store.manifest(day)
        if manifest is None:
            click.echo(json.dumps({"day": day.isoformat(), "manifest": None}))
            continue
        click.echo(json.dumps({"day": day.isoformat(), "rows": manifest.rows, "min_time": manifest.min_time.isoformat(),
                               "max_time": manifest.max_time.isoformat(), "parts": len(manifest.parts),
                               "bytes": sum(p.bytes for p in manifest.parts)}))


@main.command()
@click.argument("scenarios", nargs=-1)
@click.option("--no-doc", is_flag=True, help="print the table only; leave docs/reliability.md as it is")
def chaos(scenarios: tuple[str, ...], no_doc: bool) -> None:
    """Run fault-injection scenarios (all by default) against the local stack; print and record the table.

    \b
    Scenarios: worker-kill, worker-kill-exactly-once, postgres-stop, bridge-kill, kafka-restart,
    kafka-broker-kill, thundering-herd, mosquitto-restart, hostile-input-storm, registration-storm,
    duplicate-storm, postgres-failover, redis-stop, redis-sentinel-failover, worker-sigterm,
    rolling-restart, worker-join-leave, rollout-leader-kill, rollout-under-faults.

    Run from a checkout, with `iotflow stack up`.
    """
    from pathlib import Path

    from iotflow.chaos import extras, run, table, write_doc

    root = Path.cwd()
    if not (root / "tests" / "reliability").is_dir():
        raise click.ClickException("run it from an iotflow checkout (tests/reliability/ holds the scenarios)")
    try:
        status, rows = run(root, list(scenarios))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(table(rows))
    if extras(rows):
        click.echo(extras(rows))
    if not no_doc:
        command = "iotflow chaos" + "".join(f" {s}" for s in scenarios)
        click.echo(f"written to {write_doc(root, command, rows)}", err=True)
    sys.exit(status)


@main.group()
def rollout() -> None:
    """Firmware rollouts (created and steered through /api/v1/firmware/rollouts)."""


@rollout.command("watch")
@click.argument("rollout_id")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="seconds between redraws")
@click.option("--once", is_flag=True, help="draw once and exit")
def rollout_watch(rollout_id: str, interval: float, once: bool) -> None:
    """Live progress of a rollout: a bar per wave and per state, until it ends (exit 1 unless completed)."""
    from iotflow.errors import RolloutNotFound
    from iotflow.rollout_watch import watch

    try:
        final = asyncio.run(watch(_settings(), rollout_id, interval, once))
    except RolloutNotFound as exc:
        raise click.ClickException(str(exc)) from None
    if not once and final["status"] != "completed":
        sys.exit(1)


@main.command("bench-scale")
@click.option("--messages", type=click.IntRange(min=1000), default=1_000_000, show_default=True,
              help="messages preloaded into a fresh topic")
@click.option("--partitions", type=click.IntRange(min=2), default=16, show_default=True,
              help="partitions of the fresh topic (and of the tables)")
def bench_scale(messages: int, partitions: int) -> None:
    """Measure one worker, then two, on the same preloaded topic in one run."""
    from iotflow.bench import run_scaling

    _print_json(run_scaling(_settings(), messages, partitions))


@main.command("bench-soak")
@click.option("--messages", type=click.IntRange(min=1000), default=10_000_000, show_default=True,
              help="messages preloaded into a fresh topic")
@click.option("--dedup-window", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="the worker's IOTFLOW_DEDUP_WINDOW_S: marks expire all along the run")
def bench_soak(messages: int, dedup_window: float) -> None:
    """Measure a worker's RSS over a long run whose dedup window keeps expiring."""
    from iotflow.bench import run_soak

    _print_json(run_soak(_settings(), messages, dedup_window))


@main.command("bench-recovery")
@click.option("--keys", type=click.IntRange(min=1000), default=1_000_000, show_default=True,
              help="messages preloaded, each with its own msg_id: the dedup table's keys")
def bench_recovery(keys: int) -> None:
    """Time a worker getting its tables back: restart after kill -9, a new host, a take-over with and without standbys."""
    from iotflow.bench_recovery import run

    _print_json(run(_settings(), keys))


@main.command("bench-api")
@click.option("--devices", type=click.IntRange(min=1), default=200, show_default=True, help="devices registered and read")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True, help="concurrent clients")
@click.option("--duration", type=click.FloatRange(min=1), default=20.0, show_default=True, help="seconds per measurement")
def bench_api(devices: int, concurrency: int, duration: float) -> None:
    """Measure GET /devices/{id} and /devices/{id}/state from a second process, with Redis up and down."""
    from iotflow.bench_api import run

    _print_json(run(_settings(), devices=devices, concurrency=concurrency, duration_s=duration))


@main.command()
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True,
              help="viewer reads; operator also registers and changes devices; admin also deletes")
@click.option("--subject", default="local-operator", show_default=True, help="who the token names (sub)")
@click.option("--ttl", "ttl_s", type=click.IntRange(min=60), default=3600, show_default=True, help="seconds until it expires")
def token(role: str, subject: str, ttl_s: int) -> None:
    """Print an API bearer token signed with IOTFLOW_JWT_SECRET, naming IOTFLOW_JWT_KID (for local use and scripts)."""
    from iotflow.auth import issue

    settings = _settings()
    click.echo(issue(settings.jwt_secret, role=role, subject=subject, ttl_s=ttl_s,
                     issuer=settings.jwt_issuer, audience=settings.jwt_audience, kid=settings.jwt_kid))
