"""Ranks that outlive their launcher stop.

`accelerate launch` / torchrun killed with SIGKILL (an OOM killer, `kill -9`, a lost job step)
cannot tell its ranks; they would train on as orphans, holding the accelerator, the run lock and
the cores. Each rank watches its parent instead and ends itself when the parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

THREAD_NAME = "vlmkit-launcher-watch"
#: Environment variables a launcher (torchrun, accelerate launch, deepspeed) sets in each rank.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


def under_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def stop_when_orphaned(poll_s: float = 1.0, grace_s: float = 10.0) -> threading.Thread | None:
    """Under a launcher, watch the parent process; when it has gone, SIGTERM this rank (then,
    after `grace_s`, exit hard). Returns the watching thread (None when not launched, or when
    this process already watches)."""
    if not under_launcher():
        return None
    if any(thread.name == THREAD_NAME for thread in threading.enumerate()):
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.error(
            "the launcher (pid %d) is gone: stopping rank %s (pid %d)",
            parent,
            os.environ.get("RANK", "?"),
            os.getpid(),
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)  # a SIGTERM handler that did not end the process
        os._exit(1)

    thread = threading.Thread(target=watch, name=THREAD_NAME, daemon=True)
    thread.start()
    return thread
