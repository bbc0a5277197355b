"""Flower's deployment engine rehearsed on one machine: a SuperLink and K SuperNodes as separate
processes on 127.0.0.1, the example app run against them with `flwr run`.

This is what a consortium runs, with every party on this machine instead of its own:
- `flower-superlink --insecure --disable-runtime-dependency-installation` on a free port
  (flwr 1.41 serves the Fleet, Control and ServerAppIo APIs over one HTTP port);
- one `flower-supernode --insecure --superlink 127.0.0.1:PORT` per party, each with its own
  free runtime port and a `--node-config` naming its partition and its party file
  (`dmm.data.party`): the node reads that file and nothing else;
- `flwr run APP deploy --stream` against a federation written to a private `FLWR_HOME`, with
  the run config pointing the server at the data *description* (no sample): the server sees
  no data; the final model is evaluated by the caller, on a test set the server never had.

Every process is started in its own session (process group) and stopped by it: SIGTERM, then
SIGKILL after a grace period, also on failure or interruption (`LocalDeployment` is a context
manager; `deploy_run` installs SIGTERM/SIGINT handlers for its duration). `pids()` lists every
process of those groups (the SuperExec and ServerApp/ClientApp processes Flower spawns
included), so a caller can check that none is left.

A SuperNode killed during a round: the SuperLink answers for it once its heartbeat is missed
(flwr 1.41: 2 x a 30 s interval), the strategy records the failure and aggregates the rest;
`restart_node` starts it again (a new node id), and the strategy asks new nodes for their
partition at the start of every round and uses them again.

Across real machines what changes is the addresses (`--superlink SERVER:PORT`, the federation's
`address`), TLS certificates instead of `--insecure`, and node authentication
(`--enable-supernode-auth` on the SuperLink, a key pair per SuperNode); see docs/flower.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmm.errors import DMMError

FEDERATION = "deploy"
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tool(name: str) -> str:
    """A Flower command: beside this Python first (a venv not on PATH), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise DMMError(f"{name} not found (install Flower: pip install 'dmm[flower]')")
    return found


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process (read from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def _group_pids(pgids: set[int]) -> list[int]:
    """Every live process whose process group is in `pgids`."""
    return sorted(p for p, (_, g) in _processes().items() if g in pgids)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class LocalDeployment:
    """One SuperLink and one SuperNode per entry of `node_configs`, on 127.0.0.1.

    `workdir` holds everything they write (the private FLWR_HOME, logs); `threads` pins torch's
    threads in the processes (Flower's ClientApps inherit the environment)."""

    node_configs: list[dict]
    workdir: Path
    threads: int = 1
    startup_timeout: float = 60.0
    env: dict = field(default_factory=dict)
    superlink: Proc | None = None
    nodes: dict[int, Proc] = field(default_factory=dict)
    port: int = 0
    seen: set[int] = field(default_factory=set)   # every pid of ours ever seen alive
    node_ports: list[int] = field(default_factory=list)  # every SuperNode port used
    _pgids: set[int] = field(default_factory=set)
    _restarts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)

    # -- processes ---------------------------------------------------------------------------
    def _environ(self) -> dict:
        # Flower starts its own tools (flower-superexec, flwr-clientapp) by name: this
        # Python's scripts folder goes first on PATH, for a virtual environment not activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, PATH=path, FLWR_HOME=str(self.workdir / "flwr-home"),
                   OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
                   **self.env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        f = open(log, "ab")  # noqa: SIM115  (closed with the process, see stop)
        try:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self._environ(),
                                 cwd=self.workdir, start_new_session=True)
        finally:
            f.close()  # the child holds its own descriptor
        self._pgids.add(p.pid)
        self.seen.add(p.pid)
        return Proc(name, p, log)

    def start(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        ports = free_ports(1 + len(self.node_configs))
        self.port, self._node_ports = ports[0], ports[1:]
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.superlink = self._spawn("superlink", [
            _tool("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait(lambda: _listening(self.port), self.superlink, "the SuperLink to listen")
        for i in range(len(self.node_configs)):
            self.start_node(i)
        return self

    def start_node(self, i: int) -> Proc:
        """Start (or restart) SuperNode `i` with its node config."""
        cfg = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                       for k, v in self.node_configs[i].items())
        n = self._restarts.get(i, 0)
        self._restarts[i] = n + 1
        port = self._node_ports[i] if n == 0 else free_ports(1)[0]
        self.node_ports.append(port)
        proc = self._spawn(f"supernode-{i}" + (f"-restart{n}" if n else ""), [
            _tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(port), "--node-config", cfg])
        self.nodes[i] = proc
        self._wait(lambda: _listening(port), proc, f"SuperNode {i} to start")
        return proc

    def wait_busy(self, i: int, timeout: float) -> bool:
        """Wait until SuperNode `i` runs a ClientApp process (it is training); False if it did
        not within `timeout` seconds."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for pid in _group_pids({self.nodes[i].pid}):
                with contextlib.suppress(OSError):
                    if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return True
            time.sleep(0.05)
        return False

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode `i` and every process of its group (its ClientApp) with `sig`."""
        proc = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.popen.wait(timeout=30)

    def _wait(self, ready: Callable[[], bool], proc: Proc, what: str) -> None:
        t0 = time.monotonic()
        while not ready():
            if proc.popen.poll() is not None:
                raise DMMError(f"waiting for {what}: {proc.name} exited with status "
                               f"{proc.popen.returncode}; its log: {proc.log}\n"
                               + proc.log.read_text(errors="replace")[-2000:])
            if time.monotonic() - t0 > self.startup_timeout:
                raise DMMError(f"waiting for {what}: not ready after {self.startup_timeout:.0f} s"
                               f"; its log: {proc.log}")
            time.sleep(0.1)

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every process's log (for an error message; the logs go with the
        workdir)."""
        out = []
        for p in sorted((self.workdir / "logs").glob("*.log")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def adopt(self) -> None:
        """Add the process groups of every descendant of ours: Flower's SuperExec starts its
        own session, so the ServerApp it spawns is in no group we created."""
        procs = _processes()
        ours = {p for p, (_, g) in procs.items() if g in self._pgids}
        grew = True
        while grew:
            kids = {p for p, (pp, _) in procs.items() if pp in ours} - ours
            grew = bool(kids)
            ours |= kids
        self._pgids |= {procs[p][1] for p in ours}
        self.seen |= ours

    def pids(self) -> list[int]:
        """Every live process this deployment started, with the ones Flower spawned."""
        self.adopt()
        return _group_pids(self._pgids)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after `grace` seconds."""
        self.adopt()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in list(self._pgids):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            t0 = time.monotonic()
            while self.pids() and time.monotonic() - t0 < grace:
                time.sleep(0.1)
            if not self.pids():
                break
        for p in [self.superlink, *self.nodes.values()]:
            if p is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=1)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- runs --------------------------------------------------------------------------------
    def run(self, app: str | Path, run_config: dict, *, timeout: float = 3600.0,
            on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
        """`flwr run APP deploy --stream` with `run_config`; calls `on_line` with every line
        of its output (the streamed logs); returns (exit status, the output)."""
        toml = self.workdir / "run-config.toml"
        toml.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        proc = self._spawn("flwr-run", [_tool("flwr"), "run", str(Path(app).resolve()),
                                        FEDERATION, "--run-config", str(toml), "--stream"])
        lines: list[str] = []
        done = threading.Event()

        def follow() -> None:  # the log file as it grows (the child writes, we read)
            with open(proc.log, errors="replace") as f:
                while True:
                    line = f.readline()
                    if line:
                        lines.append(line)
                        if on_line is not None:
                            on_line(line)
                    elif done.is_set():
                        break
                    else:
                        self.adopt()
                        time.sleep(0.2)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        try:
            status = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DMMError(f"flwr run did not finish within {timeout:.0f} s; its log: "
                           f"{proc.log}") from e
        finally:
            done.set()
            reader.join(timeout=10)
        return status, "".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


@dataclass
class DeployResult:
    summary: dict                 # the ServerApp's summary (history, failures, DMM reports)
    checkpoint: Path              # the final model the ServerApp wrote
    seconds: float                # wall time from the SuperLink's start to every process gone
    run_seconds: float            # wall time of `flwr run`
    events: list[dict]            # what the fault plan did, with the round it happened in
    ports: list[int]              # the ports it listened on (SuperLink, SuperNodes)
    started: list[int]            # every process of the deployment seen alive
    leftover: list[int]           # processes still alive after the stop (should be none)
    output: str                   # the streamed log of `flwr run`


def deploy_run(app: str | Path, run_config: dict, parties: list[Path], description: Path,
               out: str | Path, *, kill: tuple[int, int] | None = None,
               rejoin_after: float | None = None, kill_delay: float = 0.5,
               busy_timeout: float = 60.0,
               threads: int = 1, timeout: float = 3600.0, workdir: str | Path | None = None,
               report: Callable[[str], None] | None = None) -> DeployResult:
    """Run `app` (examples/flower) on a SuperLink and one SuperNode per party file.

    `run_config` is the app's (data set keys aside: the server gets `description`, each node
    its party file); the final checkpoint goes to `out`. `kill=(node, round)` SIGKILLs that
    SuperNode (and its ClientApp) `kill_delay` seconds after its ClientApp starts training in
    that round (or after `busy_timeout`); `rejoin_after` restarts it that many seconds after
    the kill. Every process is stopped before this returns or raises."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix="dmm-deploy-")) if workdir is None else Path(workdir)
    k = len(parties)
    configs = [{"partition-id": i, "num-partitions": k, "data-file": str(Path(p).resolve())}
               for i, p in enumerate(parties)]
    rc = {**run_config, "dataset": "party", "data-root": str(Path(description).resolve()),
          "clients": k, "out": str(out.resolve()), "threads": threads}
    events: list[dict] = []
    dep = LocalDeployment(configs, tmp, threads=threads)
    say = report or (lambda s: None)
    old = {}

    def on_signal(signum, frame):  # the trap: stop everything, then leave
        dep.stop()
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, on_signal)
    t0 = time.perf_counter()
    try:
        with dep:
            say(f"SuperLink on 127.0.0.1:{dep.port} (pid {dep.superlink.pid}), "
                f"{k} SuperNodes (pids {', '.join(str(p.pid) for p in dep.nodes.values())})")

            def on_line(line: str) -> None:
                m = ROUND_LINE.search(line)
                if m is None:
                    return
                rnd = int(m.group(1))
                say(f"round {rnd}/{m.group(2)}")
                if kill is not None and rnd == kill[1] and not any(
                        e["event"] == "kill" for e in events):
                    threading.Thread(target=fault, args=(rnd,), daemon=True).start()

            def fault(rnd: int) -> None:
                node = kill[0]
                busy = dep.wait_busy(node, timeout=busy_timeout)
                time.sleep(kill_delay)
                dep.kill_node(node)
                events.append({"event": "kill", "node": node, "round": rnd,
                               "while_training": busy, "t": time.perf_counter() - t0})
                say(f"killed SuperNode {node} (SIGKILL) in round {rnd}"
                    + (" while its ClientApp trained" if busy else ""))
                if rejoin_after is not None:
                    time.sleep(rejoin_after)
                    p = dep.start_node(node)
                    events.append({"event": "rejoin", "node": node, "pid": p.pid,
                                   "t": time.perf_counter() - t0})
                    say(f"restarted SuperNode {node} (pid {p.pid})")

            t_run = time.perf_counter()
            status, output = dep.run(app, rc, timeout=timeout, on_line=on_line)
            run_seconds = time.perf_counter() - t_run
            summary_path = out.with_suffix(".json")
            if status != 0 or not out.is_file() or not summary_path.is_file():
                raise DMMError(f"flwr run exited with status {status} without writing {out}")
            summary = json.loads(summary_path.read_text())
    except DMMError as e:
        raise DMMError(f"{e}\n{dep.log_tails()}") from e
    finally:
        dep.stop()
        for s, h in old.items():
            signal.signal(s, h)
        leftover = dep.pids()
        if workdir is None and not leftover:
            shutil.rmtree(tmp, ignore_errors=True)
    return DeployResult(summary, out, time.perf_counter() - t0, run_seconds, events,
                        [dep.port, *dep.node_ports], sorted(dep.seen), leftover, output)


def rehearse(data, partition, run_config: dict, out: str | Path, *,
             kill: tuple[int, int] | None = None, rejoin_after: float | None = None,
             threads: int = 1, timeout: float = 3600.0,
             report: Callable[[str], None] | None = None) -> dict:
    """One deployment rehearsal: `data` (an ImageDataset) cut along `partition` (a
    `Partition`) into party files in a temporary folder, `deploy_run` on them, the final model
    (written to `out`) evaluated on `data`'s test split here, never on the server; the
    temporary files removed. Returns a summary row (accuracy, rounds, failures, times)."""
    from dmm import checkpoint
    from dmm.data.party import write_parties
    from dmm.evaluate import evaluate

    tmp = Path(tempfile.mkdtemp(prefix="dmm-parties-"))
    try:
        desc, files = write_parties(data, partition.indices, tmp)
        r = deploy_run(Path(app_dir()), run_config, files, desc, out, kill=kill,
                       rejoin_after=rejoin_after, threads=threads, timeout=timeout,
                       report=report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ck = checkpoint.load(r.checkpoint)
    ev = evaluate(ck.build(), data.x_test, data.y_test, data.normalize,
                  num_classes=data.num_classes)
    hist = r.summary["history"]
    return {"accuracy": ev.accuracy, "rounds": len(hist),
            "clients_per_round": [h["clients"] for h in hist],
            "failed_per_round": [h.get("failed", []) for h in hist],
            "failures": r.summary["failures"], "events": r.events,
            "seconds": r.seconds, "run_seconds": r.run_seconds,
            "processes": len(r.started), "leftover": r.leftover, "checkpoint": str(r.checkpoint)}


def app_dir() -> Path:
    """The example Flower app (examples/flower) of this checkout."""
    here = Path(__file__).resolve().parents[3] / "examples" / "flower"
    if not (here / "pyproject.toml").is_file():
        raise DMMError(f"the example Flower app is not at {here} (an installed dmm without its "
                       "source tree: pass the app's folder)")
    return here
