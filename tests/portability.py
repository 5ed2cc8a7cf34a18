"""Find AVX-512 code that a CPU without AVX-512 would reach: the check behind tests/test_portability.py.

pgvector (and PostgreSQL) may use AVX-512 only in functions they call after asking the CPU (their names say
`avx512`); an AVX-512 instruction anywhere else kills the server with SIGILL on a CPU without it, as a build
compiled with `-march` for an AVX-512 machine does. An instruction counts as AVX-512 when it is EVEX-encoded (the
0x62 prefix, which in 64-bit code means nothing else) or uses a zmm or opmask (k0-k7) register.

    .venv/bin/python -m tests.portability [DIR_OR_FILE ...]   (default: the embedded server's programs)

IMSEARCH_CHECK_PGINSTALL=DIR runs tests/test_portability.py against another build.

prints each offending function and exits 1 when there is one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

LEGACY_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "67"}  # segment and address-size prefixes, before EVEX
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\t([0-9a-f ]+?)\s*\t(\S.*)$")
AVX512_REGISTER = re.compile(r"%zmm\d|%k[0-7]\b")


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def binaries(root: Path) -> list[Path]:
    """Every ELF file under root (or root itself): programs and shared libraries."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p))


def avx512_functions(binary: Path) -> dict[str, int]:
    """Function name -> number of AVX-512 instructions in it, for the whole of binary's code."""
    out = subprocess.run(["objdump", "-d", "--wide", str(binary)], capture_output=True, text=True, check=True).stdout
    found: dict[str, int] = {}
    function = "?"
    for line in out.splitlines():
        if m := FUNCTION.match(line):
            function = m[1]
            continue
        m = INSTRUCTION.match(line)
        if m is None:
            continue
        raw = m[1].split()
        while raw and raw[0] in LEGACY_PREFIXES:
            raw = raw[1:]
        if (raw and raw[0] == "62") or AVX512_REGISTER.search(m[2]):
            found[function] = found.get(function, 0) + 1
    return found


def undispatched(binary: Path) -> dict[str, int]:
    """The AVX-512 functions of binary that are not named as runtime-dispatched ones."""
    return {f: n for f, n in avx512_functions(binary).items() if "avx512" not in f.lower()}


def embedded_programs() -> Path:
    """The embedded server's installation: its programs and libraries, pgvector's vector.so among them.

    IMSEARCH_CHECK_PGINSTALL points the checks at another installation (e.g. an older wheel's `pginstall`).
    """
    from imsearch.db import embedded

    return Path(os.environ.get("IMSEARCH_CHECK_PGINSTALL") or embedded.bin_dir().parent)


def main(args: list[str]) -> int:
    roots = [Path(a) for a in args] or [embedded_programs()]
    bad = 0
    for binary in (b for root in roots for b in binaries(root)):
        for function, count in sorted(undispatched(binary).items()):
            print(f"{binary}: {function}: {count} AVX-512 instruction(s) outside a dispatched function")
            bad += 1
    print(f"{bad} function(s) would crash a CPU without AVX-512" if bad else "no AVX-512 outside dispatched code")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
