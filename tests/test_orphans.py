"""Ranks stop when their launcher is killed (SIGKILL: it cannot tell them), instead of training on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from test_faults import config
from vlmkit.train.orphans import stop_when_orphaned

RANK = textwrap.dedent(
    """
    import sys, time
    from vlmkit.train.orphans import stop_when_orphaned
    assert stop_when_orphaned(poll_s=0.1, grace_s=2) is not None
    print("ready", flush=True)
    time.sleep(120)
    """
)
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "ready"
    print(rank.pid, flush=True)
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that may not come."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_not_under_a_launcher_nothing_watches(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert stop_when_orphaned() is None


def test_a_rank_ends_when_its_launcher_is_killed():
    env = {**os.environ, "LOCAL_RANK": "0"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, RANK], stdout=subprocess.PIPE, text=True, env=env
    )
    rank = int(launcher.stdout.readline())
    try:
        assert alive(rank)
        time.sleep(0.5)
        assert alive(rank)  # the watcher does nothing while the launcher lives
        launcher.kill()
        launcher.wait()
        assert wait_gone([rank], timeout=5) == []
    finally:
        if alive(rank):
            os.kill(rank, signal.SIGKILL)


@pytest.mark.slow
def test_killing_torchrun_stops_its_training_ranks(tmp_path):
    """`torchrun -m vlmkit train` with 2 CPU ranks, SIGKILLed mid-training: no rank trains on."""
    raw = config(tmp_path, "orphans", max_steps=100_000, save_strategy="no", ddp_backend="gloo")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(port)),
        *("-m", "vlmkit", "train", str(tmp_path / "run.yaml")),
    ]
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "step/s" not in (tmp_path / "launcher.log").read_text():
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        time.sleep(1)  # training steps now
        assert all(alive(p) for p in ranks)
        launcher.kill()
        launcher.wait()
        assert wait_gone(ranks, timeout=20) == [], (tmp_path / "launcher.log").read_text()[-3000:]
        assert "is gone: stopping rank" in " ".join((tmp_path / "launcher.log").read_text().split())
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
