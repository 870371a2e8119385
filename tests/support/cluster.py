"""Three RabbitMQ nodes of the tests' own, clustered, on this machine.

Each node has its own name, AMQP and distribution ports, data and log dirs, and an Erlang cookie
shared only by the three and by the `rabbitmqctl` calls made here; the machine's default node
(5672/25672) is never touched. The package's own scripts are called (not the `rabbitmq-server`
wrapper on PATH, which switches to the `rabbitmq` user and its cookie), with the machine's env
and config files replaced by files of ours. The nodes form the cluster on first boot through
classic peer discovery (no stop_app/join_cluster round trips). Nodes are stopped by name at the
end, then by their own OS pid if they did not go.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.infra import port_open
from worker.ops.processes import free_port


def _sbin() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"))
    if not found:
        raise RuntimeError("no rabbitmq-server package scripts under /usr/lib/rabbitmq")
    return Path(found[-1]).parent


@dataclass
class Node:
    name: str  # e.g. egloc1a@localhost
    port: int
    dist_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # the Erlang VM's OS pid, from its pid file

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class RabbitCluster:
    """`start()` boots three clustered nodes; `close()` stops them by name (then by pid)."""

    def __init__(self, size: int = 3) -> None:
        self.sbin = _sbin()
        self.dir = Path(tempfile.mkdtemp(prefix="eglo-rmq-cluster-"))
        self.home = self.dir / "home"
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        tag = secrets.token_hex(3)
        self.nodes = [
            Node(f"eglo{tag}{chr(ord('a') + i)}@localhost", free_port(), free_port(),
                 self.dir / f"n{i}")
            for i in range(size)
        ]
        ctl_min = free_port()
        self._ctl_ports = (ctl_min, ctl_min + 10)

    @property
    def url(self) -> str:
        """EGLO_AMQP_URL for the whole cluster: the first node's URL, then host:port entries."""
        return ",".join([self.nodes[0].url, *(n.address for n in self.nodes[1:])])

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "HOME": str(self.home),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "empty-env.conf"),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self._ctl_ports[0]),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self._ctl_ports[1]),
        }
        if node is not None:
            env.update(
                {
                    "RABBITMQ_NODENAME": node.name,
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(node.port),
                    "RABBITMQ_DIST_PORT": str(node.dist_port),
                    "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(node.base / "log"),
                    "RABBITMQ_PID_FILE": str(node.base / "rabbit.pid"),
                    "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "no-advanced.config"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                        "-kernel inet_dist_use_interface {127,0,0,1}"
                    ),
                }
            )
        return env

    def start(self, timeout_s: float = 90.0) -> None:
        (self.dir / "empty-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        peers = "\n".join(
            f"cluster_formation.classic_config.nodes.{i + 1} = {n.name}"
            for i, n in enumerate(self.nodes)
        )
        for node in self.nodes:
            node.base.mkdir(parents=True)
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{node.port}\n"
                "loopback_users = none\n"
                "cluster_formation.peer_discovery_backend = classic_config\n"
                f"{peers}\n"
                "log.file.level = warning\n"
            )
        for node in self.nodes:
            self.start_node(node, wait=False)
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            self._wait_up(node, deadline)
        members = self.ctl(self.nodes[0], "eval", "length(rabbit_nodes:all_running()).")
        if members.strip() != str(len(self.nodes)):
            raise RuntimeError(f"cluster formed with {members.strip()} running nodes")

    def start_node(self, node: Node, *, wait: bool = True) -> None:
        log = open(node.base / "console.log", "ab")  # noqa: SIM115 - the node's for its life
        node.process = subprocess.Popen(
            [str(self.sbin / "rabbitmq-server")],
            env=self._env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node.pid = None
        if wait:
            self._wait_up(node, time.monotonic() + 60)

    def _wait_up(self, node: Node, deadline: float) -> None:
        while not port_open("127.0.0.1", node.port):
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited {node.process.returncode}: see "
                                   f"{node.base / 'console.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} did not open port {node.port}")
            time.sleep(0.2)
        pid_file = node.base / "rabbit.pid"
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} wrote no pid file")
            time.sleep(0.1)
        node.pid = int(pid_file.read_text().strip())

    def ctl(self, node: Node, *args: str, timeout_s: float = 60.0) -> str:
        done = subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-q", "-n", node.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {done.stderr}")
        return done.stdout

    def node_at(self, address: str) -> Node:
        return next(n for n in self.nodes if n.address == address)

    def node_of(self, connection_name: str, address: str) -> Node:
        """The node of a client's connection: the address the client logged (behind HAProxy,
        `Balanced.node_of` asks the broker instead)."""
        return self.node_at(address)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def leader(self, queue: str) -> Node:
        """The node leading quorum queue `queue` (asked of a running node)."""
        for node in self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                out = self.ctl(node, "list_queues", "name", "leader", "--no-table-headers")
                for line in out.splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == queue:
                        return next(n for n in self.nodes if n.name == parts[1])
        raise RuntimeError(f"no leader found for {queue}")

    def wait_replicated(self, queues: list[str], timeout_s: float = 30.0) -> None:
        """Until each quorum queue has a member online on every running node (a fault before that
        would test the cluster's start, not eglo)."""
        import json

        want = {n.name for n in self.running()}
        deadline = time.monotonic() + timeout_s
        seen: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                out = self.ctl(
                    self.running()[0], "list_queues", "name", "online", "--formatter", "json"
                )
                seen = {q["name"]: q["online"] for q in json.loads(out or "[]")}
                if all(set(seen.get(q) or []) >= want for q in queues):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"quorum queues not replicated on {sorted(want)}: {seen}")

    def kill(self, node: Node) -> None:
        """kill -9 of the node's VM: the hard loss."""
        if node.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGKILL)
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(10)

    def stop(self, node: Node) -> None:
        """A graceful stop, by node name."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl(node, "stop", timeout_s=60)
        if node.process is not None:
            try:
                node.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill(node)

    def close(self) -> None:
        live = self.running()
        stoppers = [
            subprocess.Popen(
                [str(self.sbin / "rabbitmqctl"), "-q", "-n", n.name, "stop"],
                env=self._env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n in live
        ]
        for stopper in stoppers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stopper.wait(60)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(15)
            if node.process is not None and node.process.poll() is None:
                self.kill(node)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def rabbit_cluster(size: int = 3) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _node_of_eval(connection_name: str) -> str:
    """Erlang for `rabbitmqctl eval`: true if a connection named so is on the node asked."""
    return (
        "lists:any(fun(P) -> case rabbit_networking:connection_info(P, [client_properties]) of "
        "[{client_properties, CP}] -> lists:keyfind(<<\"connection_name\">>, 1, CP) =:= "
        f"{{<<\"connection_name\">>, longstr, <<\"{connection_name}\">>}}; _ -> false end end, "
        "rabbit_networking:local_connections())."
    )


def connection_node(cluster: RabbitCluster, connection_name: str) -> Node:
    """The node a client connection named `connection_name` is on, asked of the nodes."""
    for node in cluster.running():
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if cluster.ctl(node, "eval", _node_of_eval(connection_name)).strip() == "true":
                return node
    raise RuntimeError(f"no node has a connection named {connection_name!r}")


class Balanced:
    """The cluster behind HAProxy (Debian's haproxy, a process of the tests' own on a free
    loopback port): `url` is HAProxy's single address, round-robin over the nodes, each health-
    checked every 0.5 s; everything else is the cluster's. A client then knows only HAProxy's
    address, so the node of one of its connections is asked of the broker (`node_of`)."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.config = cluster.dir / "haproxy.cfg"
        servers = "\n".join(
            f"  server n{i} {n.address} check inter 500 fall 1 rise 2 on-marked-down "
            "shutdown-sessions"
            for i, n in enumerate(cluster.nodes)
        )
        self.config.write_text(
            "global\n  maxconn 2000\n"
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n"
            "  timeout server 1h\n"
            f"frontend amqp\n  bind 127.0.0.1:{self.port}\n  default_backend nodes\n"
            f"backend nodes\n  balance roundrobin\n{servers}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def node_of(self, connection_name: str, address: str) -> Node:
        return connection_node(self.cluster, connection_name)

    def __getattr__(self, name: str) -> object:
        return getattr(self.cluster, name)

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise RuntimeError("no haproxy: apt-get install haproxy (see .ci/run)")
        log = open(self.cluster.dir / "haproxy.log", "ab")  # noqa: SIM115 - for its life
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.cluster.dir / 'haproxy.log'}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.contextmanager
def haproxy_front(cluster: RabbitCluster) -> Iterator[Balanced]:
    balanced = Balanced(cluster)
    try:
        balanced.start()
        yield balanced
    finally:
        balanced.close()
