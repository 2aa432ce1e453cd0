"""Jobs: long work that outlives a tool call's deadline.

A long-running tool call waits up to the deadline (`limits.deadline_s`); if the
work is still running the call returns a job id and the work goes on.
`job_status(id)` reports progress or, once finished, the result;
`job_cancel(id)` asks the work to stop at its next step. Finished jobs are
kept for `limits.job_ttl_s` seconds; at most `limits.max_jobs` are kept.
MCP tasks (`mcp_server/tasks.py`) are jobs too (`is_task`), kept for their own
`ttl_s` after they were created (and at least until they finish).

A job whose work was asked to stop reads `cancelled`, even when the tool then
returned normally with what it had (generate_text's partial text): the result
is kept and shown, the status says what happened.

With `state.backend = "redis"` (issue 15) the manager is
`mcp_server.state_redis.RedisJobManager`: the same interface, with every job
that detached (or is a task) mirrored to Redis so that any replica answers
`job_status` / `tasks/get` and passes `job_cancel` on to the replica running
it. The default manager below is the single-process one and does no I/O.

Every job has an owner (`mcp_server.clients`): over HTTP only the client that
started it sees it; `get` and `cancel` answer None to anyone else, exactly as
for an id that never existed.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.scheduler import CancelToken

from .clients import LOCAL, can_see


@dataclass
class Job:
    id: str
    tool: str
    token: CancelToken
    created: float = field(default_factory=time.time)
    finished: float | None = None
    state: str = "queued"  # queued | running | done | error | cancelled
    detached: bool = False  # the original call returned a job id
    result: Any = None  # mcp CallToolResult once finished
    error: str | None = None
    future: Future | None = None
    owner: str = LOCAL  # the client that started it (mcp_server.clients)
    updated: float = field(default_factory=time.time)  # last progress or state change
    is_task: bool = False  # created by a task-augmented tools/call (mcp_server/tasks.py)
    ttl_s: float | None = None  # tasks: kept this long after creation; None = the manager's ttl after finishing
    cancel_requested: bool = False  # job_cancel / tasks/cancel asked it to stop

    def snapshot(self) -> dict[str, Any]:
        t = self.token
        return {
            "job_id": self.id,
            "tool": self.tool,
            "status": self.state,
            "progress": t.progress,
            "total": t.total,
            "message": t.message,
            "elapsed_s": round((self.finished or time.time()) - self.created, 3),
            "error": self.error,
        }


class JobManager:
    def __init__(self, ttl_s: float = 3600.0, max_jobs: int = 256) -> None:
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    job_class: type[Job] = Job  # issue 15: the Redis manager's jobs publish their changes

    def create(self, tool: str, token: CancelToken, owner: str = LOCAL) -> Job:
        job = self.job_class(id=secrets.token_hex(8), tool=tool, token=token, owner=owner)
        with self._lock:
            self._purge_locked()
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str, caller: str = LOCAL) -> Job | None:
        """The job, if it exists and `caller` may see it; None otherwise (the two are not told apart)."""
        with self._lock:
            self._purge_locked()
            job = self._jobs.get(job_id)
        return job if job is not None and can_see(job.owner, caller) else None

    def finish(self, job: Job, state: str, result: Any = None, error: str | None = None) -> None:
        if state == "done" and (job.cancel_requested or job.token.cancelled):
            state = "cancelled"  # the tool stopped early and returned what it had
            error = error or job.token.reason
        job.state, job.result, job.error = state, result, error
        job.finished = job.updated = time.time()

    def forget(self, job: Job) -> None:
        """Drop a job that completed within its call (nobody will ask for it)."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def cancel(self, job_id: str, caller: str = LOCAL, reason: str = "cancelled by job_cancel") -> Job | None:
        job = self.get(job_id, caller)
        if job is not None and job.state in ("queued", "running"):
            self.request_cancel(job, reason)
        return job

    def request_cancel(self, job: Job, reason: str) -> None:
        """Ask a queued or running job to stop at its next step (job_cancel, tasks/cancel)."""
        job.cancel_requested = True
        job.updated = time.time()
        job.token.cancel(reason)

    def fresh(self, job: Job) -> Job:
        """The job as it stands now (in memory: the object itself; the Redis manager re-reads a remote job)."""
        return job

    def visible(self, caller: str = LOCAL) -> list[Job]:
        """Every kept job `caller` may see."""
        with self._lock:
            self._purge_locked()
            return [j for j in self._jobs.values() if can_see(j.owner, caller)]

    def active(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state in ("queued", "running")]

    def cancel_all(self, reason: str = "server shutting down") -> None:
        for job in self.active():
            job.token.cancel(reason)

    def _expired(self, j: Job, now: float) -> bool:
        if not j.finished:
            return False
        return now - j.created > j.ttl_s if j.ttl_s is not None else now - j.finished > self.ttl_s

    def _purge_locked(self) -> None:
        now = time.time()
        for jid in [j.id for j in self._jobs.values() if self._expired(j, now)]:
            del self._jobs[jid]
        if len(self._jobs) >= self.max_jobs:
            done = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.finished or 0)
            for j in done[: len(self._jobs) - self.max_jobs + 1]:
                del self._jobs[j.id]
