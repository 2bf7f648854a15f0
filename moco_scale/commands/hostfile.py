"""Check a DeepSpeed hostfile before launching: the launcher itself starts nothing, silently, for a
host with `slots=0`, and answers a typo with a traceback.

    moco-scale hostfile hostfiles/two_nodes            # "2 hosts, 16 slots, master node-a"
    moco-scale hostfile --shell hostfiles/X            # HOSTS=2 SLOTS=16 MASTER=node-a, for scripts
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


class HostfileError(ValueError):
    pass


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] in file order; blank lines and # comments ignored; errors name file and line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HostfileError(f"hostfile {path}: {e.strerror}") from e
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise HostfileError(f"hostfile {path} is UTF-16 (as some Windows editors save it); the deepspeed launcher "
                            "reads plain text: save it as UTF-8 or ASCII")
    if data.startswith(b"\xef\xbb\xbf"):
        raise HostfileError(f"hostfile {path} starts with a UTF-8 byte-order mark, which the deepspeed launcher "
                            "would read as part of the first host's name: save it without the BOM")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise HostfileError(f"hostfile {path} is not text (byte {e.start} is not UTF-8)") from None
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"hostfile {path}, line {number}: {raw.strip()!r} is not 'HOST slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise HostfileError(f"hostfile {path}, line {number}: {host} has slots={slots}; the deepspeed "
                                "launcher would start no process there and exit 0")
        if any(h == host for h, _ in hosts):
            raise HostfileError(f"hostfile {path}, line {number}: {host} is listed twice")
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no host (every line is blank or a comment)")
    return hosts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moco-scale hostfile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shell", action="store_true", help="print HOSTS=.. SLOTS=.. MASTER=.. for eval")
    p.add_argument("hostfile")
    args = p.parse_args(argv)
    try:
        hosts = parse_hostfile(args.hostfile)
    except HostfileError as e:
        print(f"moco-scale hostfile: error: {e}", file=sys.stderr)
        return 2
    count, slots, master = len(hosts), sum(s for _, s in hosts), hosts[0][0]
    if args.shell:
        print(f"HOSTS={count} SLOTS={slots} MASTER={shlex.quote(master)}")
    else:
        print(f"{count} hosts, {slots} slots, master {master}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
