"""Real Prefect servers for tests: ``prefect server start`` on 127.0.0.1 (SQLite, or PostgreSQL through a database
URL), process workers, and a throwaway PostgreSQL cluster when its binaries are installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: How long an embedded (ephemeral) Prefect server may take to start: Prefect's 20 s default is missed on a busy
#: 2-core machine (seen: the nightly test's Secret block timed out under load).
EPHEMERAL_STARTUP_S = "180"


def prefect_env(home: Path, api_url: str | None = None, base: dict[str, str] | None = None,
                **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) plus a private PREFECT_HOME, no analytics, quiet logs and
    persisted results; with ``api_url`` the runs go to that server instead of an embedded one."""
    env = {**(os.environ if base is None else base), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": EPHEMERAL_STARTUP_S, **extra}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class PrefectServer:
    """``prefect server start`` in its own process group; ``api_url`` once healthy."""

    def __init__(self, home: Path, database_url: str | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        extra = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}
        self.env = prefect_env(home, self.api_url, **extra)
        self.log = open(home / "server.log", "w")
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--no-ui", "--analytics-off"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.workers: list[subprocess.Popen] = []
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefect server did not become healthy")

    def cli(self, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=timeout)

    def start_worker(self, pool: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.home / f"worker-{pool}.log", "w")
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                                stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                start_new_session=True, cwd=cwd)
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for w in self.workers:
            _stop(w)
        _stop(self.proc)
        self.log.close()


class Postgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) listening on 127.0.0.1 only. PostgreSQL refuses to run as
    root, so as root it runs as the ``postgres`` user in a directory that user owns."""

    USER = "turboquant"

    def __init__(self) -> None:
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="tq-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = [shutil.which("runuser"), "-u", "postgres", "--"]
        self.data = self.root / "pgdata"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-o",
                  f"-p {self.port} -h 127.0.0.1 -k {self.root}", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, "prefect")
        self.url = f"postgresql+asyncpg://{self.USER}@127.0.0.1:{self.port}/prefect"

    def _run(self, binary: str, *args: str) -> None:
        res = subprocess.run([*self.as_user, shutil.which(binary), *args], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{binary} failed: {res.stderr[-1500:]}")

    @staticmethod
    def available() -> str | None:
        """Why PostgreSQL cannot run here, or None when it can."""
        missing = [b for b in ("initdb", "pg_ctl", "createdb") if not shutil.which(b)]
        if missing:
            return f"PostgreSQL binaries not installed ({', '.join(missing)})"
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root without a 'postgres' user to run the server as"
            if not shutil.which("runuser"):
                return "running as root without runuser"
        return None

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
