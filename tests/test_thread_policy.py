"""The thread policy: its decisions (model-free, with a named stand-in for the machine's load) and its load reading
on real processes. The adaptive mode on the real model is tested in test_adapter.py and test_server_chat.py."""

import sys
import threading
import time

import psutil
import pytest

from llamachat import thread_policy
from llamachat.thread_policy import OtherLoad, ThreadPolicy, threads_for


@pytest.mark.parametrize(
    "others, cpus, max_threads, expected",
    [
        (0.0, 2, 2, 2),  # idle: every core
        (0.05, 2, 2, 2),  # a little background work (our server answering polls) costs no thread
        (0.15, 2, 2, 1),  # a sixth of a core taken: the second thread already waits at too many barriers
        (1.0, 2, 2, 1),  # one core busy
        (2.0, 2, 2, 1),  # everything busy: still one thread, never none
        (5.0, 2, 2, 1),  # more demand than cores
        (0.0, 8, 4, 4),  # hyperthreads: at most the physical cores
        (2.0, 8, 4, 4),  # others on the siblings leave the 4 cores' worth free
        (5.0, 8, 4, 3),
        (-0.1, 2, 2, 2),  # a reading that went below zero counts as idle
    ],
)
def test_threads_for_takes_the_free_cores(others, cpus, max_threads, expected):
    assert threads_for(others, cpus, max_threads) == expected


class FakeLoad:
    """A stand-in for OtherLoad whose readings the test sets (a real machine's load cannot be scripted)."""

    def __init__(self, cores: float) -> None:
        self.value, self.reads, self.closed = cores, 0, False

    def cores(self) -> float:
        self.reads += 1
        return self.value

    def close(self) -> None:
        self.closed = True


def test_a_pinned_count_is_never_changed_and_reads_no_load():
    applied = []
    policy = ThreadPolicy(pinned=3, cpus=2)
    assert policy.mode == "fixed"
    assert policy.threads == policy.max_threads == 3
    assert policy.update(applied.append, force=True) == 3
    assert applied == []


def test_adaptive_applies_a_new_count_only_when_it_changes_and_logs_it():
    load, applied, logged = FakeLoad(0.0), [], []
    policy = ThreadPolicy(max_threads=2, cpus=2, load=load, log=logged.append)
    assert policy.mode == "adaptive"
    assert policy.threads == 2
    assert policy.update(applied.append, force=True) == 2
    assert applied == []
    assert logged == []
    load.value = 1.0
    assert policy.update(applied.append, force=True) == 1
    assert applied == [1]
    assert logged == ["info: llama.cpp now uses 1 of 2 threads: other processes use 1.0 of 2 CPUs"]
    load.value = 0.05
    assert policy.update(applied.append, force=True) == 2
    assert applied == [1, 2]
    policy.close()
    assert load.closed


def test_adaptive_rereads_the_load_at_most_once_per_interval_unless_forced(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(thread_policy.time, "monotonic", lambda: now[0])
    load, applied = FakeLoad(0.0), []
    policy = ThreadPolicy(max_threads=2, cpus=2, load=load)
    policy.update(applied.append)
    load.value = 1.0
    assert policy.update(applied.append) == 2
    assert load.reads == 1  # within the interval: no new reading
    now[0] += thread_policy.SAMPLE_INTERVAL_S
    assert policy.update(applied.append) == 1
    assert load.reads == 2
    assert applied == [1]
    assert policy.update(applied.append, force=True) == 1
    assert load.reads == 3


class ScriptedMachine:
    """Stands in for the machine's CPU counters (a real machine's load cannot be scripted): each window lasts one
    second, in which other processes use the next of the scripted loads, in cores."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now, self.busy = 0.0, 0.0
        monkeypatch.setattr(thread_policy.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(thread_policy, "_machine_busy_s", lambda: self.busy)
        monkeypatch.setattr(thread_policy, "_own_busy_s", lambda: 0.0)

    def window(self, others_cores: float) -> None:
        self.now += 1.0
        self.busy += others_cores


def test_a_load_costs_a_thread_only_when_it_fills_two_windows(monkeypatch):
    machine = ScriptedMachine(monkeypatch)
    load = OtherLoad(interval_s=3600)  # only the explicit samples below
    policy = ThreadPolicy(max_threads=2, cpus=2, load=load, log=lambda line: None)
    counts = []
    for others in [0.0, 0.6, 0.0, 0.3, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]:
        machine.window(others)
        load.sample()
        counts.append(policy.update(lambda threads: None, force=True))
    load.close()
    # Bursts of one window (a poll answered, accounting noise) cost nothing; a busy core costs a thread from its
    # second window on; a freed core is taken back at once.
    assert counts == [2, 2, 2, 2, 2, 2, 1, 1, 2, 2]


def test_the_first_window_counts_on_its_own(monkeypatch):
    machine = ScriptedMachine(monkeypatch)
    load = OtherLoad(interval_s=3600)
    machine.window(1.0)
    assert load.sample() == 1.0
    assert load.cores() == 1.0  # a module starting beside a busy core takes one thread from its first chat
    load.close()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_other_load_sees_another_process_busy():
    # An interval longer than the test: its own thread must not sample meanwhile, which would leave the second
    # sample() a window of a few ms to compare with the busy process's whole second (a flake on a loaded machine).
    load = OtherLoad(interval_s=60.0)
    busy = psutil.Popen([sys.executable, "-c", "while True: pass"])
    try:
        load.sample()  # starts a window with the busy process running
        started, used = time.monotonic(), _cpu_s(busy)
        time.sleep(1.0)
        others = load.sample()
        busy_cores = (_cpu_s(busy) - used) / (time.monotonic() - started)
    finally:
        busy.kill()
        busy.wait()
        load.close()
    assert busy_cores > 0.3, "the busy process hardly ran: the machine is overloaded"
    assert others >= busy_cores - 0.15  # the busy process is counted, whatever else runs beside it


def test_other_load_leaves_out_this_process_own_work():
    load = OtherLoad(interval_s=10)  # only the explicit samples below
    stop = threading.Event()

    def spin() -> None:  # pure Python with the GIL held: this process's own CPU use
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    me = psutil.Process()
    busy_before, ours_before, started = thread_policy._machine_busy_s(), _cpu_s(me), time.monotonic()
    load.sample()
    spinner.start()
    time.sleep(1.0)
    others = load.sample()
    stop.set()
    spinner.join()
    wall = time.monotonic() - started
    machine_cores = (thread_policy._machine_busy_s() - busy_before) / wall
    our_cores = (_cpu_s(me) - ours_before) / wall
    load.close()
    assert our_cores > 0.3, "the spinning thread hardly ran: the machine is overloaded"
    # What others used is the machine's busy time without ours (the tolerance covers the window edges and ticks).
    assert others <= machine_cores - our_cores + 0.2
