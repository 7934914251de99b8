"""Apache Kafka in KRaft mode (one combined broker+controller), resolved from Maven Central.

The jars are resolved once per Kafka version by Maven from ``kafka_runtime/pom.xml`` (the one place the
version is pinned) into ``<stack>/kafka/dist-<version>/libs`` and reused by every later start.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.stack.base import (
    Service,
    ServiceStatus,
    StackPaths,
    log_tail,
    loopback_port,
    read_pid,
    refuse_taken_ports,
    require_binary,
    run,
    stop_pid,
    wait_until,
)

POM = Path(__file__).parent / "kafka_runtime" / "pom.xml"
LOG4J2 = Path(__file__).parent / "kafka_runtime" / "log4j2.properties"
_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pinned in the pom's ``<kafka.version>`` property."""
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", _NS)
    if node is None or not (node.text or "").strip():
        raise StackError(f"{pom} has no <kafka.version> property")
    return node.text.strip()


def new_cluster_id() -> str:
    """A fresh KRaft cluster id: 16 random bytes in URL-safe base64, as Kafka's own ``random-uuid``.

    Like Kafka's, never one that starts with ``-``: the storage tool would read ``-t -abc…`` as an option.
    """
    while (cluster_id := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()).startswith("-"):
        pass
    return cluster_id


def server_properties(*, node_id: int, port: int, controller_port: int, data_dir: Path,
                      voters: dict[int, int] | None = None) -> str:
    """A KRaft combined-mode (broker and controller) config on loopback: a single node, or with
    ``voters`` (node id → controller port, this node's included) one node of a cluster of that
    many, whose internal topics take three replicas (two in sync) when it has three nodes or more."""
    replicas, in_sync = (3, 2) if voters and len(voters) >= 3 else (1, 1)
    quorum = (f"controller.quorum.voters={','.join(f'{n}@127.0.0.1:{p}' for n, p in sorted(voters.items()))}"
              if voters else f"controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}")
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={node_id}",
            quorum,
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={data_dir}",
            # Internal topics: as many replicas as the cluster can hold (one on a single node).
            f"offsets.topic.replication.factor={replicas}",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={in_sync}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={in_sync}",
            f"default.replication.factor={replicas}",
            f"min.insync.replicas={in_sync}",
            # Tests and local runs join groups one after another; no reason to wait 3 s each time.
            "group.initial.rebalance.delay.ms=0",
            # iotflow creates its topics explicitly with their partitions and configs.
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "",
        ]
    )


class Kafka(Service):
    name = "kafka"

    def __init__(self, paths: StackPaths, settings: Settings) -> None:
        self.paths = paths
        self.settings = settings
        self.port = loopback_port("IOTFLOW_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
        self.controller_port = self.port + 1
        self.version = kafka_version()
        self.home = paths.service_dir("kafka")
        self.libs = self.home / f"dist-{self.version}" / "libs"
        self.data = self.home / "data"
        self.config = self.home / "server.properties"
        self.pid_file = self.home / "kafka.pid"
        self.log_dir = paths.logs / "kafka"

    # -- install -------------------------------------------------------------------------
    def ensure_jars(self) -> None:
        """Resolve the broker's jars with Maven unless this version's are already cached."""
        done_marker = self.libs.parent / ".complete"
        if done_marker.exists():
            return
        mvn = require_binary("mvn", "maven")
        build = self.home / "build"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        shutil.copy(POM, build / "pom.xml")
        staging = build / "libs"
        run(
            [mvn, "-q", "-B", "-f", str(build / "pom.xml"), f"-Dlibs.dir={staging}", "package"],
            timeout=900,
            what=f"resolving Apache Kafka {self.version} with Maven",
        )
        shutil.rmtree(self.libs.parent, ignore_errors=True)
        self.libs.parent.mkdir(parents=True)
        staging.rename(self.libs)
        shutil.rmtree(build, ignore_errors=True)
        done_marker.touch()

    def java(self) -> str:
        java = require_binary("java", "openjdk-17-jre-headless")
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
        match = re.search(r'version "(\d+)', out)
        if not match or int(match.group(1)) < 17:
            raise StackError(f"Apache Kafka {self.version} needs Java 17 or newer; {java} says: {out.strip()}")
        return java

    def _format_storage(self, java: str) -> None:
        if (self.data / "meta.properties").exists():
            return
        run(
            [java, "-cp", f"{self.libs}/*", *self._log_opts(), "kafka.tools.StorageTool", "format",
             "-t", new_cluster_id(), "-c", str(self.config), "--standalone"],
            timeout=120,
            what="formatting Kafka's KRaft storage",
        )

    def _log_opts(self) -> list[str]:
        return [f"-Dkafka.logs.dir={self.log_dir}", f"-Dlog4j2.configurationFile={LOG4J2}"]

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self.status().up:
            return
        if read_pid(self.pid_file) is not None:
            # Running but not answering yet (e.g. still starting): wait for it, don't start a second.
            self._wait_healthy()
            return
        refuse_taken_ports(self.name, self.port, self.controller_port)
        java = self.java()
        self.ensure_jars()
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            server_properties(node_id=1, port=self.port, controller_port=self.controller_port, data_dir=self.data)
        )
        self._format_storage(java)
        with open(self.log_dir / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                [java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true", *self._log_opts(),
                 "-cp", f"{self.libs}/*", "kafka.Kafka", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
                preexec_fn=raise_open_files_limit,
            )
        self.pid_file.write_text(str(proc.pid))
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        def ours_and_answering() -> bool:
            if read_pid(self.pid_file) is None:
                raise StackError(f"Kafka exited while starting; the end of {self.log_dir}/server.log:\n"
                                 f"{log_tail(self.log_dir / 'server.log')}")
            return self._answers()

        wait_until(
            ours_and_answering,
            timeout=120,
            what=f"Kafka did not answer on 127.0.0.1:{self.port} (see {self.log_dir}/server.log)",
            interval=0.5,
        )

    def stop(self) -> None:
        # A clean broker shutdown moves leadership and flushes logs; it can take ~10 s.
        stop_pid(self.pid_file, name="kafka", timeout=60)

    def status(self) -> ServiceStatus:
        pid = read_pid(self.pid_file)
        up = pid is not None and self._answers()
        detail = f"Apache Kafka {self.version} (KRaft)" + (f", pid {pid}" if pid else "")
        return ServiceStatus(self.name, up, f"127.0.0.1:{self.port}", detail)

    def _answers(self) -> bool:
        return asyncio.run(brokers_answering(f"127.0.0.1:{self.port}", timeout=5.0)) > 0


async def brokers_answering(bootstrap: str, *, timeout: float) -> int:
    """How many brokers the cluster's metadata lists (0: no answer within ``timeout``)."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    # While the broker starts, every refused connection would be logged as an error: expected here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        return len(client.cluster.brokers())
    except (KafkaError, OSError, asyncio.TimeoutError):
        return 0
    finally:
        await client.close()


OPEN_FILES = 1_048_576


def raise_open_files_limit() -> None:
    """In the broker's process, before exec: Kafka keeps several files open per partition segment,
    and a machine that ran many test apps carries thousands of partitions (a broker that runs out
    of descriptors stops with a storage fault). Root may raise the hard limit; others get theirs."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
