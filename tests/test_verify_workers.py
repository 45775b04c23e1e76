"""How many worker processes a Verifier starts by default: the pod's CPUs, shared among its ranks.

A training pod runs several ranks (``accelerate launch``), each with its own reward Verifier; a pod
with a CPU limit sees the whole node in its CPU affinity. Neither may multiply the workers.
"""

from __future__ import annotations

import os
import pickle

import pytest

from thinkforge import timeouts
from thinkforge.verify import Verifier


@pytest.fixture
def eight_cpus(monkeypatch, tmp_path):
    """A process that may run on 8 CPUs, in a cgroup without a CPU limit."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    real = timeouts.pod_cpus  # read this test's cgroup files, not the machine's
    monkeypatch.setattr(timeouts, "pod_cpus", lambda cgroup_root="/sys/fs/cgroup": real(tmp_path))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return tmp_path


def test_ranks_of_one_pod_share_its_cpus(eight_cpus, monkeypatch):
    assert Verifier().workers == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 training ranks, each with its reward Verifier
    assert Verifier().workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert Verifier().workers == 1, "never fewer than one worker"
    assert Verifier(workers=3).workers == 3, "an explicit count is kept"


def test_a_pod_cpu_limit_caps_the_workers(eight_cpus, monkeypatch):
    from thinkforge.timeouts import default_workers, pod_cpus

    (eight_cpus / "cpu.max").write_text("250000 100000\n")  # limits.cpu: 2.5
    assert pod_cpus(eight_cpus) == 3 and Verifier().workers == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Verifier().workers == 1
    # cgroup v1
    (eight_cpus / "cpu.max").unlink()
    (eight_cpus / "cpu").mkdir()
    (eight_cpus / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (eight_cpus / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert pod_cpus(eight_cpus) == 4 and default_workers(eight_cpus) == 2
    (eight_cpus / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert pod_cpus(eight_cpus) == 8


def test_an_unpickled_default_verifier_takes_the_share_of_where_it_lands(eight_cpus, monkeypatch):
    blob = pickle.dumps(Verifier())  # built in a launcher process: 8 workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # unpickled in one of 8 ranks
    assert pickle.loads(blob).workers == 1
