"""CPU ranks keep freed host memory for the next step (mlkd_scale.engine.host_memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from run_fixtures import child_env

from mlkd_scale.engine import host_memory
from mlkd_scale.engine.host_memory import allocator_chosen_by_user, keep_freed_memory

#: The environment variables by which a user chooses or tunes the allocator.
USER_SETTINGS = (*host_memory.USER_MALLOC_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD")

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# What a training step does to the heap, with the C library's own malloc and free (no Python or torch
# allocations in between): eight 2 MiB activations allocated, written and freed together. glibc's
# defaults trim the heap's 16 MiB free top (above its trim threshold, twice the largest freed block)
# and fault it back in on the next step; with the settings it stays. Prints the page faults per step.
STEP_FAULTS = """
import ctypes, resource, sys
from mlkd_scale.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 2 << 20
def step():
    blocks = [libc.malloc(SIZE) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in blocks:
        libc.free(block)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in child_env().items() if k not in USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


@glibc_only
def test_a_kept_heap_spares_the_page_faults_of_every_step():
    system, kept = _faults_per_step("system"), _faults_per_step("keep")
    # 16 MiB are 4,096 pages: measured 4,064 faults per step with glibc's defaults, 0 with the settings.
    assert system > 2000, f"glibc's defaults took only {system} faults per step; the comparison shows nothing"
    assert kept < 50, f"{kept} page faults per step with the settings, {system} without"


@pytest.mark.parametrize(
    ("environ", "chosen"),
    [
        ({}, None),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, None),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
        ({"LD_PRELOAD": "/opt/lib/libfoo.so"}, None),
    ],
)
def test_the_users_own_allocator_settings_are_recognised(environ, chosen):
    assert allocator_chosen_by_user(environ) == chosen


@glibc_only
def test_settings_are_applied_unless_the_user_chose_the_allocator(monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory()
    monkeypatch.setenv("MALLOC_TOP_PAD_", str(host_memory.SETTINGS[host_memory.M_TOP_PAD]))
    assert not keep_freed_memory()
