import os
import threading

import pytest
import torch

from server.priority import available_cpus, name_native_thread, on_passing_thread, use_intra_op_threads
from tests.helpers import native_thread_name


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_a_named_thread_shows_its_name_to_the_os_and_threads_it_starts_inherit_it():
    """`top -H` and /proc tell the server's threads apart (and count an engine thread's OpenMP workers as its)."""
    seen: dict[str, str] = {}

    def child() -> None:
        seen["child"] = native_thread_name(threading.get_native_id())

    def named() -> None:
        name_native_thread("aptp-engine-0 and more than fifteen bytes")
        seen["named"] = native_thread_name(threading.get_native_id())
        started = threading.Thread(target=child)
        started.start()
        started.join(10)

    thread = threading.Thread(target=named)
    thread.start()
    thread.join(10)
    assert seen == {"named": "aptp-engine-0 a", "child": "aptp-engine-0 a"}
    assert native_thread_name(threading.get_native_id()) != "aptp-engine-0 a"  # the caller's thread only


def test_a_threads_intra_op_count_holds_when_another_thread_sets_one_afterwards():
    """The routing thread asks for one intra-op thread and the engine's thread for two, in whichever order they
    start: each keeps its own (torch would otherwise apply the last count set to the routing thread's first
    operation, and the process would hold more OpenMP threads than it has CPUs)."""
    original = torch.get_num_threads()
    counted, ready, go = [], threading.Event(), threading.Event()

    def routing_like() -> None:
        use_intra_op_threads(1)
        ready.set()
        go.wait(10)
        torch.ones(1 << 16).mul_(2).sum()  # its first parallel operations
        counted.append(torch.get_num_threads())

    thread = threading.Thread(target=routing_like)
    thread.start()
    try:
        assert ready.wait(10)
        torch.set_num_threads(2)  # another thread sets its count later
        go.set()
        thread.join(10)
    finally:
        torch.set_num_threads(original)
    assert counted == [1]


def test_work_on_a_passing_thread_returns_its_result_or_raises_its_error_in_the_caller():
    ran_on = []

    def work() -> int:
        ran_on.append(threading.current_thread().name)
        return 41 + 1

    assert on_passing_thread(work, "aptp-test") == 42 and ran_on == ["aptp-test"]

    def broken() -> None:
        raise ValueError("expert 0 cannot load")

    with pytest.raises(ValueError, match="expert 0 cannot load"):
        on_passing_thread(broken, "aptp-test")


def test_available_cpus_follow_omp_num_threads_when_it_is_one_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    own = available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert available_cpus() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # a list for nested parallelism: not one count
    assert available_cpus() == own >= 1
