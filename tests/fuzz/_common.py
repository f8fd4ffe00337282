"""Shared by the atheris harnesses: the contract every harness checks.

A harness feeds one fuzzed input to an sqllm entry point.  The entry point
may only return normally or raise one of ``ALLOWED`` (the documented errors
for bad input); anything else -- another exception type, a crash, a
sanitizer report, a hang past libFuzzer's -timeout -- is a finding, and
libFuzzer stops and saves the input as ``crash-*``/``timeout-*``.

When atheris is not installed, ``run()`` falls back to a seeded
random-mutation loop over the seed corpus with the same contract
(``--fallback-iterations N``), so the harnesses still run anywhere.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

ALLOWED = (ValueError, TypeError, FileNotFoundError)
HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("SQLLM_FUZZ_CORPUS", HERE / "corpus"))

try:
    import atheris  # noqa: F401
    HAVE_ATHERIS = True
except ImportError:  # pragma: no cover - the fallback
    HAVE_ATHERIS = False


def instrumented(modules: Iterable[str]):
    """atheris.instrument_imports for sqllm's own code (coverage feedback)."""
    if HAVE_ATHERIS:
        import atheris

        return atheris.instrument_imports(include=list(modules))
    import contextlib

    return contextlib.nullcontext()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        elif op == 3 and len(b) > 1:
            i = rng.randrange(1, len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4 and len(b) > 8:
            i = rng.randrange(1, len(b) - 4)
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff",
                                     b"\x00\x00\x00\x00", b"9999", b'"x":'])
    return bytes(b)


def run(test_one_input: Callable[[bytes], None], corpus_name: str) -> None:
    if "--fallback-iterations" in sys.argv or not HAVE_ATHERIS:
        i = sys.argv.index("--fallback-iterations") if "--fallback-iterations" in sys.argv else -1
        n = int(sys.argv[i + 1]) if i >= 0 else 1000
        seeds = [p.read_bytes() for p in sorted((CORPUS / corpus_name).iterdir())]
        rng = random.Random(int(os.environ.get("SQLLM_FUZZ_SEED", "0")))
        t0 = time.perf_counter()
        for _ in range(n):
            test_one_input(_mutate(rng.choice(seeds), rng))
        print(f"Done {n} runs in {time.perf_counter() - t0:.0f} second(s) (fallback mutator)")
        return
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def check(fn: Callable[[], object]) -> object:
    """Call ``fn``; documented errors are fine, anything else propagates (a finding)."""
    try:
        return fn()
    except ALLOWED:
        return None
