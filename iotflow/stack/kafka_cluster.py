"""A three-node Apache Kafka cluster on loopback (KRaft, every node broker and controller), for the
broker-failure test and chaos scenario: the production shape of R-10 — replication factor 3,
``min.insync.replicas=2`` — in throwaway folders and ports, on the jars the local stack resolved.

Every node gets its own folder, ports and pid file under ``root``; :meth:`KafkaCluster.kill`
SIGKILLs one (a crashed host), :meth:`KafkaCluster.stop` stops them all and deletes the folders.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

from iotflow.errors import StackError
from iotflow.stack.base import LocalNode, free_loopback_port, log_tail, read_pid, run, stop_pid, wait_until
from iotflow.stack.kafka import (
    LOG4J2,
    Kafka,
    brokers_answering,
    new_cluster_id,
    raise_open_files_limit,
    server_properties,
)


class _Broker(LocalNode):
    def __init__(self, name: str, port: int, home: Path, node_id: int, controller_port: int) -> None:
        super().__init__(name, port, home)
        self.node_id, self.controller_port = node_id, controller_port
        self.proc: subprocess.Popen[bytes] | None = None

    def reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def config(self) -> Path:
        return self.home / "server.properties"


class KafkaCluster:
    def __init__(self, root: Path, runtime: Kafka, *, nodes: int = 3) -> None:
        self.root = root.absolute()
        self.runtime = runtime  # the local stack's broker: its Java and its resolved jars
        self.brokers = []
        for i in range(1, nodes + 1):
            port = free_loopback_port(span=2)  # the broker's port and its controller's
            self.brokers.append(_Broker(f"kafka-{i}", port, self.root / f"kafka-{i}", i, port + 1))

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{b.port}" for b in self.brokers)

    def start(self) -> KafkaCluster:
        java = self.runtime.java()
        self.runtime.ensure_jars()
        voters = {b.node_id: b.controller_port for b in self.brokers}
        cluster_id = new_cluster_id()
        classpath = f"{self.runtime.libs}/*"
        for broker in self.brokers:
            (broker.home / "data").mkdir(parents=True, exist_ok=True)
            broker.config.write_text(server_properties(node_id=broker.node_id, port=broker.port,
                                                       controller_port=broker.controller_port,
                                                       data_dir=broker.home / "data", voters=voters))
            run([java, "-cp", classpath, *self._log_opts(broker), "kafka.tools.StorageTool", "format",
                 "-t", cluster_id, "-c", str(broker.config)], timeout=120, what=f"formatting {broker.name}")
        for broker in self.brokers:
            self._launch(java, broker)
        wait_until(lambda: self._brokers_seen() == len(self.brokers), timeout=180, interval=1.0,
                   what=f"the {len(self.brokers)} Kafka nodes did not form a cluster (logs under {self.root})")
        return self

    def _log_opts(self, broker: _Broker) -> list[str]:
        return [f"-Dkafka.logs.dir={broker.home / 'logs'}", f"-Dlog4j2.configurationFile={LOG4J2}"]

    def _launch(self, java: str, broker: _Broker) -> None:
        with open(broker.home / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                [java, "-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true", *self._log_opts(broker),
                 "-cp", f"{self.runtime.libs}/*", "kafka.Kafka", str(broker.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=broker.home, preexec_fn=raise_open_files_limit)
        broker.proc = proc
        broker.pid_file.write_text(str(proc.pid))

    def _brokers_seen(self) -> int:
        for broker in self.brokers:
            if read_pid(broker.pid_file) is None:
                raise StackError(f"{broker.name} exited while starting; the end of {broker.home / 'logs'}/server.log:\n"
                                 f"{log_tail(broker.home / 'logs' / 'server.log')}")
        return asyncio.run(brokers_answering(self.bootstrap, timeout=5.0))

    def kill(self, index: int) -> None:
        """SIGKILL one node (a crashed host): no clean shutdown, no leadership handed over."""
        broker = self.brokers[index]
        pid = read_pid(broker.pid_file)
        if pid is None:
            raise StackError(f"{broker.name} is not running")
        os.kill(pid, signal.SIGKILL)
        broker.reap()

    def restart(self, index: int) -> None:
        """Start a killed node again and wait until the cluster counts it."""
        self._launch(self.runtime.java(), self.brokers[index])
        wait_until(lambda: self._brokers_seen() == len(self.brokers), timeout=180, interval=1.0,
                   what=f"{self.brokers[index].name} did not rejoin the cluster")

    def stop(self) -> None:
        for broker in self.brokers:
            stop_pid(broker.pid_file, name=broker.name, timeout=30)
            if broker.proc is not None and broker.proc.poll() is None:
                broker.proc.kill()  # e.g. a node still starting, before its pid file says so
            broker.reap()
        shutil.rmtree(self.root, ignore_errors=True)

