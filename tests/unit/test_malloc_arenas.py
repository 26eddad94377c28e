"""`relais serve` caps glibc's malloc arenas (relais.cli.fewer_malloc_arenas): checked in a child process, whose
threads allocate at once, by counting the heaps glibc's own malloc_info reports."""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from relais.cli import fewer_malloc_arenas

    print("capped" if fewer_malloc_arenas() else "left", flush=True)
    start, done = threading.Barrier(12), threading.Barrier(12)

    def allocate():
        start.wait()  # all at once, so that glibc would give most of them an arena of their own
        kept = [bytearray(4096) for _ in range(2000)]
        done.wait()  # every thread holds its memory until all have allocated
        del kept

    threads = [threading.Thread(target=allocate) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = os.path.join(tempfile.mkdtemp(), "malloc.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(path).read().count("<heap nr="))
    """
)


def arenas(env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    said, count = done.stdout.split()
    return said, int(count)


def test_serve_caps_malloc_arenas_at_two_unless_the_environment_says_otherwise() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert arenas(env) == ("capped", 2)
    said, uncapped = arenas({**env, "MALLOC_ARENA_MAX": "6"})
    assert said == "left" and uncapped > 2  # the operator's setting wins, and without the cap threads get more
