"""A network namespace of the fault suite's own, joined to the host by a veth pair, so that one
replica can be cut off from PostgreSQL or Kafka with iptables rules inside it while the rest of
the stack runs on.

PostgreSQL and Kafka listen on the host's 127.0.0.1 only and Kafka advertises 127.0.0.1, so a
process inside must keep dialing 127.0.0.1:<port>. The plumbing, for each forwarded port:

- inside: nat OUTPUT DNAT of 127.0.0.1:<port> to the host end of the veth, nat POSTROUTING SNAT
  to the inner veth address (route_localnet=1 lets a packet sourced from 127.0.0.1 leave);
- on the host: nat PREROUTING DNAT from the host veth to 127.0.0.1:<port> (route_localnet=1 on
  that veth only), and nat INPUT SNAT to 127.0.0.1, so PostgreSQL's pg_hba (127.0.0.1/32) admits
  the connection and the servers see a loopback peer.

A partition is a pair of DROP rules inside (both directions of that port): nothing on the host
changes, and the servers notice the vanished peer the way they would notice a vanished host.
Everything made here carries the `ecomchaos` prefix and is removed by `destroy` (deleting the
namespace deletes the veth pair and the rules inside; the host rules are deleted one by one).
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Sequence

PREFIX = "ecomchaos"
_SUBNET = "10.237"  # a /30 of 10.237.0.0/16 per namespace, never routed off this machine


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def _free_subnet() -> int:
    used = _run("ip", "-4", "-o", "addr").stdout
    free = [n for n in range(256) if f" {_SUBNET}.{n}." not in used]
    return random.choice(free)


class Namespace:
    def __init__(self, ports: Sequence[int]) -> None:
        suffix = uuid.uuid4().hex[:5]
        self.name = f"{PREFIX}-{suffix}"
        self.host_link = f"{PREFIX}{suffix}h"  # interface names: 15 characters at most
        self.inner_link = f"{PREFIX}{suffix}n"
        self.ports = tuple(ports)
        self._host_rules: list[list[str]] = []
        self._cut: dict[int, list[list[str]]] = {}
        self.host_address = ""
        self.address = ""  # the inner end: where the host reaches servers inside

    @property
    def exec_prefix(self) -> list[str]:
        """Runs a command inside (`ip netns exec` execs it: its PID is the command's own)."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        """Makes the namespace and its plumbing; on any failure, removes what it made."""
        subnet = _free_subnet()
        self.host_address, self.address = f"{_SUBNET}.{subnet}.1", f"{_SUBNET}.{subnet}.2"
        try:
            self._plumb()
        except BaseException:
            self.destroy()
            raise

    def _plumb(self) -> None:
        inside = ["ip", "netns", "exec", self.name]
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link)
        _run("ip", "link", "set", self.inner_link, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_link)
        _run("ip", "link", "set", self.host_link, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.inner_link)
        _run("ip", "-n", self.name, "link", "set", self.inner_link, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")
        _run(*inside, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        _run("sysctl", "-qw", f"net.ipv4.conf.{self.host_link}.route_localnet=1")
        tag = ["-m", "comment", "--comment", self.name]
        for port in self.ports:
            tcp = ["-p", "tcp", "--dport", str(port)]
            _run(*inside, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.1", *tcp,
                 "-j", "DNAT", "--to-destination", self.host_address)  # fmt: skip
            for rule in (
                ["PREROUTING", "-i", self.host_link, *tcp, "-j", "DNAT",
                 "--to-destination", "127.0.0.1"],
                ["INPUT", "-s", self.address, "-d", "127.0.0.1", *tcp, "-j", "SNAT",
                 "--to-source", "127.0.0.1"],
            ):  # fmt: skip
                _run("iptables", "-t", "nat", "-A", *rule, *tag)
                self._host_rules.append(rule + tag)
        _run(*inside, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", self.inner_link,
             "-j", "SNAT", "--to-source", self.address)  # fmt: skip

    def cut(self, port: int) -> None:
        """Drops every packet of `port`'s connections inside, both ways: a partition."""
        rules = [
            ["OUTPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
            ["INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
        ]
        for rule in rules:
            _run(*self.exec_prefix, "iptables", "-I", *rule)
        self._cut[port] = rules

    def heal(self, port: int) -> None:
        for rule in self._cut.pop(port, []):
            _run(*self.exec_prefix, "iptables", "-D", *rule)

    def destroy(self) -> None:
        """Removes the namespace (with its veth pair and inner rules) and the host rules; safe to
        call twice and after a partial create."""
        _run("ip", "netns", "del", self.name, check=False)
        _run("ip", "link", "del", self.host_link, check=False)
        for rule in self._host_rules:
            _run("iptables", "-t", "nat", "-D", *rule, check=False)
        self._host_rules.clear()
        self._cut.clear()
