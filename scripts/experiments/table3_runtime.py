"""Run-time plumbing of the Table-3 protocol (issue #24): results ledger, jobs, worker threads.

* :class:`Ledger`: the ``results.json`` document (runs, phases, notes) behind one lock, the
  protocol clock, and :meth:`Ledger.snapshot`, which rewrites ``results.json`` / ``table.md``
  atomically (an outside kill leaves the last snapshot).
* :class:`Launcher`: one ``train.py`` job per process group (its data-loader workers die with
  it), a per-job log and data-index cache, an environment without this process's rendezvous.
* :class:`WorkerPool`: named threads, each draining a priority queue of ``(label, fn)``
  tasks; a failing task is logged and reported, the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from table3_report import render_markdown, summarize

from indexcache_train.tools.model_io import write_atomic

log = logging.getLogger("table3")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a killed writer) ends the list."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Ledger:
    """The results document, its lock and the protocol clock (seconds since start)."""

    def __init__(self, out: Path, results: dict[str, Any]) -> None:
        self.out = out
        self.results = results
        self.runs: dict[str, dict[str, Any]] = results.setdefault("runs", {})
        self.lock = threading.RLock()
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def note(self, text: str) -> None:
        log.info("note: %s", text)
        with self.lock:
            self.results.setdefault("notes", []).append(text)

    def phase(self, name: str, budget_s: float | None) -> dict[str, Any]:
        p = {"name": name, "budget_s": budget_s, "start_s": self.now(), "status": "running"}
        with self.lock:
            self.results.setdefault("phases", []).append(p)
        log.info("phase %s (budget %s s) at %.0f s", name, budget_s, p["start_s"])
        return p

    def end_phase(self, p: dict[str, Any], status: str) -> None:
        p["end_s"], p["status"] = self.now(), status
        log.info("phase %s: %s at %.0f s", p["name"], status, p["end_s"])
        self.snapshot()

    def update_run(self, name: str, **fields: Any) -> None:
        with self.lock:
            self.runs.setdefault(name, {}).update(fields)

    def set(self, key: str, value: Any) -> None:
        with self.lock:
            self.results[key] = value

    def snapshot(self) -> None:
        """Rewrite ``results.json`` and ``table.md`` with what is known now."""
        with self.lock:
            self.results["wall_s"] = self.now()
            self.results["summary"] = summarize(self.runs)
            doc = json.dumps(self.results, indent=1, default=str)
            table = render_markdown(self.results)
            # Under the lock: snapshots come from the driver and the analysis workers, and the
            # last one taken must be the last one written (#24's GPU run: two unlocked writers
            # shared one temporary name and one rename failed).
            write_atomic(self.out / "results.json", (doc + "\n").encode())
            write_atomic(self.out / "table.md", table.encode())


class Launcher:
    """Starts and stops ``train.py`` jobs (see the module docstring)."""

    def __init__(self, repo: Path, work: Path, common: tuple[str, ...], env: dict[str, str]):
        self.repo, self.work, self.common = repo, work, common
        self.runs_root = work / "runs"
        self.logs = work / "logs"
        self.extra_env = env

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The tools in this process initialise torch.distributed (MASTER_PORT set): each
        # train.py must pick its own rendezvous port.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        # Autotuning results on disk: the arms reuse the base's instead of re-benchmarking.
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.update(self.extra_env)
        return env

    def launch(
        self, name: str, experiment: str, overrides: list[str]
    ) -> tuple[subprocess.Popen, TextIO]:
        """Start ``train.py +experiment=...`` in its own process group; returns it and its
        open log file (the caller closes it)."""
        cmd = [
            sys.executable,
            str(self.repo / "train.py"),
            f"+experiment={experiment}",
            f"run.root={self.runs_root}",
            f"run.name={name}",
            # One index cache per job: concurrent jobs never write the same .npy files.
            f"data.cache_dir={self.work / 'cache' / name}",
            *self.common,
            *overrides,
        ]
        self.logs.mkdir(parents=True, exist_ok=True)
        f = open(self.logs / f"{name}.log", "w")  # closed by the caller
        f.write(" ".join(cmd) + "\n")
        f.flush()
        log.info("launch %s", name)
        proc = subprocess.Popen(
            cmd,
            cwd=self.repo,
            env=self.env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, f

    @classmethod
    def stop(cls, proc: subprocess.Popen, grace_s: float) -> None:
        """SIGTERM the job alone (the trainer saves at the next step boundary and exits; its
        data-loader workers must live until then), then :meth:`kill` what is left after
        ``grace_s``."""
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.info("job %d still running %.0f s after SIGTERM: killed", proc.pid, grace_s)
        cls.kill(proc)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the job's process group (the job and its data-loader workers)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def run_dir(self, name: str) -> Path | None:
        """``<runs>/<name>-<job id>`` (the trainer's naming), None before it exists."""
        dirs = sorted(self.runs_root.glob(f"{name}-*"))
        return dirs[0] if len(dirs) == 1 else None


class WorkerPool:
    """Named threads, each running the tasks of its own priority queue in order."""

    def __init__(self, names: tuple[str, ...], on_error: Callable[[str, Exception], None]):
        self.queues = {n: queue.PriorityQueue() for n in names}
        self.busy: dict[str, str | None] = dict.fromkeys(names)
        self.on_error = on_error
        self._seq = 0
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(n,), daemon=True, name=n) for n in names
        ]
        for t in self.threads:
            t.start()

    def submit(self, worker: str, priority: int, label: str, fn: Callable[[], None]) -> None:
        """Queue ``fn`` on ``worker``; lower ``priority`` runs first, then submission order."""
        with self._lock:
            self._seq += 1
            self.queues[worker].put((priority, self._seq, label, fn))

    def _loop(self, name: str) -> None:
        q = self.queues[name]
        while True:
            _, _, label, fn = q.get()
            self.busy[name] = label
            t0 = time.monotonic()
            try:
                fn()
                log.info("%s: %s done in %.0f s", name, label, time.monotonic() - t0)
            except Exception as err:  # reported; the other tasks go on
                log.info("%s: %s failed\n%s", name, label, traceback.format_exc(limit=6))
                self.on_error(label, err)
            finally:
                self.busy[name] = None
                q.task_done()

    def idle(self) -> bool:
        return all(q.unfinished_tasks == 0 for q in self.queues.values())

    def wait(self, deadline: Callable[[], bool]) -> list[str]:
        """Wait until every queue is empty or ``deadline()`` is true; returns the labels of
        the tasks that did not run (queued) or were still running then."""
        while not self.idle():
            if deadline():
                left = [label for label in self.busy.values() if label]
                for q in self.queues.values():
                    while True:
                        try:
                            left.append(q.get_nowait()[2])
                        except queue.Empty:
                            break
                return left
            time.sleep(0.5)
        return []


def write_tarball(path: Path, runs_root: Path, work: Path, max_log_bytes: int) -> None:
    """``runs.tar.gz``: every run's metrics / evaluations / config, every evaluation's and the
    search's JSON, and the logs (each cut to its last ``max_log_bytes``)."""
    import io
    import tarfile

    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for d in sorted(runs_root.glob("*-*")):
            for name in ("metrics.jsonl", "eval.jsonl", "run_config.yaml"):
                if (d / name).is_file():
                    tar.add(d / name, arcname=f"runs/{d.name}/{name}")
        for sub in ("eval", "search", "hfcheck"):
            root = work / sub
            for f in sorted(root.rglob("*")) if root.is_dir() else []:
                if f.is_file() and f.suffix in (".json", ".jsonl", ".md"):
                    tar.add(f, arcname=f"{sub}/{f.relative_to(root)}")
        for f in sorted((work / "logs").glob("*.log")):
            data = f.read_bytes()[-max_log_bytes:]
            info = tarfile.TarInfo(f"logs/{f.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
