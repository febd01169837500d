"""Starting torchrun jobs from tests: CPU ranks, gloo over loopback, bounded by a timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["TESTS", "JOB_TIMEOUT_S", "torchrun", "tail"]

TESTS = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 240


def torchrun(args: list[str], log: Path, nproc: int = 2, max_restarts: int = 0) -> int:
    """Run a torchrun job on this machine (c10d rendezvous on a free loopback port); its return code.

    The job runs in its own session: on timeout or interruption the whole process group is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=TESTS.parent,
                                start_new_session=True)
        try:
            return proc.wait(timeout=JOB_TIMEOUT_S)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text()[-n:]
