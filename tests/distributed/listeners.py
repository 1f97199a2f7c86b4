"""Run a launcher and record every address its process tree listens on (S6: loopback unless asked)."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil

LOOPBACK = ("127.0.0.1", "::1")


def run_watching_listeners(cmd: list[str], timeout: float, **popen) -> tuple[subprocess.CompletedProcess, set]:
    """Run `cmd` to the end like subprocess.run(capture_output=True, text=True); also return the set of
    (ip, port) its processes and their children listened on, sampled every 0.5 s."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    seen: set = set()
    deadline = time.monotonic() + timeout
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())), daemon=True)
    reader.start()
    while reader.is_alive() and time.monotonic() < deadline:
        try:
            pids = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
            # one scan of the socket tables for the whole tree (cheap beside the training it watches)
            seen.update((c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in pids)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(0.5)
    if reader.is_alive():
        proc.kill()
        reader.join()
        raise subprocess.TimeoutExpired(cmd, timeout)
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", "")), seen
