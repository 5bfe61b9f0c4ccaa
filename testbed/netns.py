"""A network namespace reached through a veth pair, whose server port can be turned into a black hole.

The server runs inside the namespace; the tests connect from the host. ``drop()`` adds an iptables
DROP rule inside the namespace (so no host rule is ever touched): packets vanish without a reset,
exactly like a NAT or firewall that forgot an idle flow. ``restore()`` removes it.
"""

from __future__ import annotations

import os
import random
import subprocess


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class BlackHoleNet:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.name = f"fcbh{tag}"
        self.host_if = f"fch{tag}"
        self.ns_if = f"fcn{tag}"
        subnet = random.randint(1, 250)
        block = random.randint(0, 63) * 4
        self.host_ip = f"10.{subnet}.{block // 256 + 77}.{block % 256 + 1}"
        self.ns_ip = f"10.{subnet}.{block // 256 + 77}.{block % 256 + 2}"
        self._rules: list[list[str]] = []

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace.

        nsenter switches only the network namespace; ``ip netns exec`` also remounts /sys in a new
        mount namespace, which fails inside a chroot ("mount --make-rslave /").
        """
        return ["nsenter", f"--net=/run/netns/{self.name}"]

    def __enter__(self) -> BlackHoleNet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run(*self.prefix(), "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _run(*self.prefix(), "ip", "link", "set", self.ns_if, "up")
            _run(*self.prefix(), "ip", "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise

    def drop(self, port: int) -> None:
        """Silently drop every packet to ``port`` inside the namespace (no RST, no ICMP)."""
        rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
        _run(*self.prefix(), "iptables", "-I", *rule)
        self._rules.append(rule)

    def dropped(self) -> int:
        """Packets the DROP rules in place have swallowed so far (proof that a black hole met real traffic)."""
        out = subprocess.run(
            [*self.prefix(), "iptables", "-L", "INPUT", "-v", "-x", "-n"], check=True, capture_output=True, text=True
        ).stdout
        total = 0
        for line in out.splitlines():
            fields = line.split()
            # "pkts bytes target prot opt in out source destination [match...]"
            if len(fields) > 2 and fields[2] == "DROP" and fields[0].isdigit():
                total += int(fields[0])
        return total

    def restore(self) -> None:
        while self._rules:
            rule = self._rules.pop()
            _run(*self.prefix(), "iptables", "-D", *rule)

    def stop(self) -> None:
        self._rules.clear()
        subprocess.run(["ip", "link", "del", self.host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
