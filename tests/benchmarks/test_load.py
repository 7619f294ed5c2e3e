"""benchmarks/load.py's memory judgement (flat, settling to a bound, or growing) and its reading of a process's CPU
time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.load import memory_trend, proc_cpu_seconds, thread_cpu_seconds

# RSS (MB) after each of 40 rounds of `benchmarks/load.py --rounds 40` against the shipped bundle on this machine.
MEASURED = [794, 826, 844, 857, 872, 880, 888, 895, 906, 908, 915, 922, 923, 926, 928, 933, 933, 935, 937, 937]
MEASURED += [938, 938, 941, 943, 943, 943, 944, 946, 946, 953, 954, 959, 964, 966, 967, 967, 944, 967, 967, 967]


def test_memory_that_levels_off_settles():
    trend = memory_trend(MEASURED, tolerance_mb=32)
    assert trend["state"] == "settles" and trend["flat"] is False
    assert trend["second_half_growth_mb"] == 967 - 937
    assert "settles: +30 MB over rounds 21..40" in trend["summary"]


def test_memory_within_tolerance_of_round_one_is_flat():
    assert memory_trend([800, 810, 805, 830], tolerance_mb=32)["state"] == "flat"


def test_memory_still_climbing_in_the_second_half_is_growing():
    leak = [800 + 10 * i for i in range(20)]
    trend = memory_trend(leak, tolerance_mb=32)
    assert trend["state"] == "GROWING"
    assert "GROWING: +100 MB over rounds 11..20" in trend["summary"]


def test_one_round_is_not_judged():
    assert memory_trend([800], tolerance_mb=32)["flat"] is None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads CPU time from Linux's /proc")
def test_a_process_cpu_time_counts_what_it_burnt_and_an_absent_process_reads_as_unknown():
    """What the serving benchmark divides by the wall time to say how many cores a server kept busy."""
    burn = "import time\nbegan = time.process_time()\nwhile time.process_time() - began < 0.4: pass\n"
    burn += "print(1, flush=True)\ninput()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        assert 0.35 <= proc_cpu_seconds(child.pid) < 5
    finally:
        child.communicate("\n", timeout=10)
    assert proc_cpu_seconds(child.pid) is None  # reaped: nothing left to read


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads threads' CPU time from Linux's /proc")
def test_thread_cpu_time_is_counted_per_thread_name():
    """What the serving benchmark splits a server's cores by: its engine, routing and other threads."""
    burn = (
        "import threading, time\n"
        "from server.priority import name_native_thread\n"
        "def work():\n"
        "    name_native_thread('aptp-engine-0')\n"
        "    began = time.thread_time()\n"
        "    while time.thread_time() - began < 0.4: pass\n"
        "    print(1, flush=True)\n"
        "    input()\n"
        "thread = threading.Thread(target=work)\n"
        "thread.start(); thread.join()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        seconds = thread_cpu_seconds(child.pid)
    finally:
        child.communicate("\n", timeout=10)
    assert 0.35 <= seconds["aptp-engine-0"] < 5
    assert len(seconds) == 2  # and the main thread's (importing torch), under its own name
    assert thread_cpu_seconds(child.pid) is None  # reaped: nothing left to read
