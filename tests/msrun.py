"""Run a script under msrun on CPU from a test, and never leave its workers behind; kill a run mid-way."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MsrunResult:
    returncode: int
    logs: str
    problems: str  # error lines from msrun and every log, for assertion messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_msrun(script: Path, args: list[str], cwd: Path, workers: int = 2, timeout: float = 400) -> MsrunResult:
    msrun = Path(sys.executable).with_name("msrun")
    log_dir = cwd / "msrun_logs"
    cmd = [str(msrun), f"--worker_num={workers}", f"--local_worker_num={workers}", "--join=True",
           f"--master_port={free_port()}", f"--log_dir={log_dir}", str(script), *args]
    env = dict(os.environ, PATH=f"{msrun.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # msrun's workers too
            proc.wait()
            stdout = ""
    logs = "".join(p.read_text() for p in sorted(log_dir.glob("*.log")))
    problems = [line for line in (stdout + logs).splitlines()
                if any(word in line for word in ("ERROR", "Error", "Traceback", "exit"))]
    return MsrunResult(proc.returncode, logs, "\n".join(problems[-40:]))


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_when_written(cmd: list[str], cwd: Path, env: dict, part: Path, lines: int) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``part`` holds ``lines`` lines (or after 120 s)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and count_lines(part) < lines:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
