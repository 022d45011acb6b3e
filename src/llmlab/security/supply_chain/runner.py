"""The parent side of _worker.py: a Worker is one isolated child process (`python -I`) that runs scanner and
loader tools, each call in a process of its own forked from it, in a given working folder, under a timeout."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
STARTUP_S = 180.0  # a first call also imports the tool's libraries (torch: a few seconds on a busy laptop)


class Worker:
    """A child process serving tool calls; use as a context manager. `run()` returns the worker's answer:
    status ("done", "timeout", "crashed"), verdict, files created in the working folder, seconds, log tail."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        self._own = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="llmlab-worker-")) if workdir is None else Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._n = 0
        self._warm: set[str] = set()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(self.dir / "worker.log", "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-I", str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, cwd=self.dir, env=env,
                                             start_new_session=True)
            self._warm = set()
        return self.proc

    def run(self, tool: str, path: str | Path, cwd: str | Path, timeout: float = 60.0, **extra: Any) -> dict[str, Any]:
        """Run `tool` on `path` in a fresh process whose working folder is `cwd` (created if missing)."""
        cwd = Path(cwd)
        cwd.mkdir(parents=True, exist_ok=True)
        self._n += 1
        req = {"tool": tool, "path": str(Path(path).absolute()), "cwd": str(cwd.absolute()), "timeout": timeout,
               "log": str((self.dir / f"call-{self._n}.log").absolute()), **extra}
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        wait = timeout + 30 + (0 if tool in self._warm else STARTUP_S)
        try:
            proc.stdin.write((json.dumps(req) + "\n").encode())
            proc.stdin.flush()
        except BrokenPipeError:
            self._kill()
            return {"status": "crashed", "error": "the worker process died", "created": [], "seconds": 0.0}
        t0 = time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        line = proc.stdout.readline() if ready else b""
        if not line:
            self._kill()
            state = "timeout" if not ready else "crashed"
            return {"status": state, "error": f"the worker gave no answer in {time.monotonic() - t0:.0f} s",
                    "created": [], "seconds": round(time.monotonic() - t0, 3)}
        self._warm.add(tool)
        return json.loads(line)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Stop the worker (and anything it left running) and remove its folder if it made one."""
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if self.proc is None and self._own:
            shutil.rmtree(self.dir, ignore_errors=True)
