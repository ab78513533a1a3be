"""Service processes started the way users start them (`python -m ...`), on ephemeral ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from servicekit.local_credentials import DATABASE_ROLES, role_url

REPO = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """A service in a child process; its JSON log lines are collected for assertions."""

    def __init__(
        self,
        module: str,
        port_variable: str,
        env: dict[str, str],
        port: int = 0,
        log_path: Path | None = None,
        command_prefix: Sequence[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        """`command_prefix`: what runs the module (`ip netns exec NAME`, which execs it, so the
        PID stays the service's own); `host`: where it listens and callers reach it."""
        self._log_file = log_path.open("a") if log_path else None
        self.module = module
        # The latest lines only: a long run under load logs a line per RPC.
        self.log_lines: deque[dict[str, object]] = deque(maxlen=10_000)
        self._serving = threading.Event()
        self.port = 0
        self.host = host
        if module in DATABASE_ROLES and "DATABASE_URL" in env:
            # The same database, as the service's own role, as it is deployed.
            env = {**env, "DATABASE_URL": role_url(env["DATABASE_URL"], module)}
        self.process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", module],
            cwd=REPO,
            env={"SHUTDOWN_GRACE_SECONDS": "5", **os.environ, **env, port_variable: str(port)},
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        threading.Thread(target=self._collect, args=(self.process.stderr,), daemon=True).start()
        if not self._serving.wait(timeout=20):
            self.stop()
            raise RuntimeError(f"{module} did not start: {self.log_lines}")

    def _collect(self, stream: IO[str]) -> None:
        for raw in stream:
            if self._log_file:
                self._log_file.write(raw)
                self._log_file.flush()
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"raw": raw.rstrip()}
            self.log_lines.append(line)
            if line.get("message") == "serving":
                self.port = int(str(line["port"]))
                self._serving.set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: this child only, by its PID."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until(condition: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(interval)
    return False


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
