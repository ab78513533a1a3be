"""ghz runs: closed loop (`-c` callers, each waiting for its reply) for throughput, open loop
(`--rps` with `--async`: each call is started on its tick, whether or not earlier ones have
replied; ghz's worker then does not wait for the reply) for cost at a fixed rate."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.proc import local_tool
from servicekit.local_credentials import tls_of, token


def _token_metadata() -> Path:
    """One admin token for the whole run (valid for its hour), in a file only we can read: a
    token on a command line would show in every process list."""
    path = _PROTOSETS / "metadata.json"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(json.dumps({"authorization": f"Bearer {token('bench', ['admin'])}"}))
    return path


_PROTOSETS = Path(tempfile.mkdtemp(prefix="bench-protosets-"))


def ghz_path() -> Path:
    return local_tool("ghz")


def transport_flags(plaintext: bool, tool: str) -> list[str]:
    """Mutual TLS with the `client` certificate (grpcurl and ghz spell the flags differently),
    or plaintext for a server run with GRPC_INSECURE=true."""
    if plaintext:
        return ["-plaintext"] if tool == "grpcurl" else ["--insecure"]
    tls = tls_of("client")
    dash = "-" if tool == "grpcurl" else "--"
    return [f"{dash}cacert", tls.ca_file, f"{dash}cert", tls.cert_file, f"{dash}key", tls.key_file]


def protoset(address: str, service: str, plaintext: bool = False) -> Path:
    """The service's descriptors, read by grpcurl through reflection (ghz's own reflection
    client does not find the health service), cached per service."""
    path = _PROTOSETS / f"{service}.protoset"
    if not path.exists():
        subprocess.run(
            [str(local_tool("grpcurl")), *transport_flags(plaintext, "grpcurl"),
             "-protoset-out", str(path), address, "describe", service],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
    return path


@dataclass(frozen=True)
class RpcFigures:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    calls: int


def ghz(
    address: str,
    call: str,
    data: dict[str, object],
    concurrency: int,
    seconds: float,
    open_loop_rate: float | None = None,
    plaintext: bool = False,
) -> RpcFigures:
    """Closed loop at `concurrency`, or open loop at `open_loop_rate` calls per second; over
    mutual TLS with an admin's token, as any client calls (`plaintext`: without TLS)."""
    load = ["-c", str(concurrency), "--connections", str(min(concurrency, 4))]
    if open_loop_rate is not None:
        load = ["--rps", str(max(1, round(open_loop_rate))), "--async", "-c", "4"]
    completed = subprocess.run(
        [
            str(ghz_path()), *transport_flags(plaintext, "ghz"), "--call", call,
            "-d", json.dumps(data), "--metadata-file", str(_token_metadata()),
            "--protoset", str(protoset(address, call.split("/")[0], plaintext)), *load,
            "-z", f"{seconds:g}s", "-O", "json", address,
        ],
        capture_output=True, text=True, timeout=seconds + 120, check=True,
    )  # fmt: skip
    report = json.loads(completed.stdout)
    latency = {d["percentage"]: d["latency"] / 1e6 for d in report["latencyDistribution"] or []}
    # "Canceled": the calls still in flight when the duration ended, cut off by ghz itself.
    errors = sum(
        n for code, n in report["statusCodeDistribution"].items() if code not in ("OK", "Canceled")
    )
    return RpcFigures(
        report["rps"], latency.get(50, 0.0), latency.get(99, 0.0), errors, int(report["count"])
    )
