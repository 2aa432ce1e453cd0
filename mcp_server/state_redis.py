"""Shared state in Redis (issue 15): jobs and tasks, cancel requests, leases, the image index, stream events.

Keys (all under `state.key_prefix`, default `atelier`):

- `P:replica:<id>`   this replica's lease: set every `state.heartbeat_s`, expires after `state.lease_s`;
- `P:job:<id>`       a hash per shared job: `meta` (JSON: tool, owner, state, progress, message, times,
                     the replica running it), `result` (the CallToolResult as JSON, at most
                     `state.max_result_bytes`), `cancel` (a cancel request from any replica);
- `P:jobs`           a sorted set of shared job ids by creation time (tasks/list);
- `P:cancel`         the pub/sub channel cancel requests are announced on;
- `P:img:<id>`, `P:imgs`, `P:imgexp:<id>`   the image:// index (mcp_server/media.py);
- `P:ev:<stream>`, `P:evid:<event>`         the EventStore (resumable streams).

Which jobs are shared: a job is mirrored to Redis from the moment it detaches
(the call outlasted the deadline and answered a job id) or is created as an
MCP task; a call that finishes within its call never touches Redis. The
replica running a job is its only writer of `meta`/`result`; another replica
writes only `cancel` (and announces it on `P:cancel`, which the running
replica listens to and, as a fallback, polls every 0.1 s).

A replica whose lease is gone (killed, frozen, cut off from Redis for longer
than `state.lease_s`) has its queued/running jobs read as `error` with
"replica <id> stopped responding", by every replica alike (the judgement
reads only the lease key). A replica killed never renews it, so its jobs stay
failed; one that was only stalled and comes back renews it, and its jobs read
as they really are again. A job finished before the replica died keeps its
result.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import mcp_types as mt
import redis
from redis.exceptions import RedisError

from engine.scheduler import CancelToken

from .clients import LOCAL, can_see
from .config import ConfigError, Settings
from .jobs import Job, JobManager
from .state import StateUnavailable, replica_id

log = logging.getLogger("atelier.state")

_ACTIVE = ("queued", "running")
_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_IMG_ID = re.compile(r"^[0-9a-f]{12}$")
_PUBLISH_ON = frozenset({"detached", "state", "ttl_s", "cancel_requested", "is_task"})


class SharedJob(Job):
    """A job whose changes (detached, state, ...) are written through to Redis once it is shared."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _PUBLISH_ON:
            mgr = self.__dict__.get("_manager")
            if mgr is not None:
                mgr._changed(self, name)


def _result_json(result: Any, limit: int) -> str | None:
    if not isinstance(result, mt.CallToolResult):
        return None
    def dump(r: mt.CallToolResult) -> str:
        return json.dumps(r.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"result_type"}))
    text = dump(result)
    if len(text) <= limit:
        return text
    # too big to share: keep the text blocks (no images, no structured content), then a note if still too big
    slim = mt.CallToolResult(content=[c for c in result.content if isinstance(c, mt.TextContent)],
                             is_error=result.is_error)
    text = dump(slim)
    if len(text) <= limit:
        return text
    note = (f"the result ({len(text)} bytes) is over state.max_result_bytes={limit}; it was not shared through "
            f"Redis: run the call again with a smaller request")
    return dump(mt.CallToolResult(content=[mt.TextContent(type="text", text=note)], is_error=result.is_error))


class RedisJobManager(JobManager):
    job_class = SharedJob

    def __init__(self, shared: RedisState, ttl_s: float, max_jobs: int) -> None:
        super().__init__(ttl_s, max_jobs)
        self.shared = shared
        self._published: set[str] = set()  # ids of local jobs mirrored to Redis
        self._pending: set[str] = set()  # local jobs whose last write failed (retried by the sync loop)
        self._push_lock = threading.Lock()

    # -- local jobs -> Redis --------------------------------------------------------------------------
    def create(self, tool: str, token: CancelToken, owner: str = LOCAL) -> Job:
        job = super().create(tool, token, owner)
        object.__setattr__(job, "_manager", self)
        return job

    def _changed(self, job: Job, name: str) -> None:
        if name == "detached" and job.detached and job.id not in self._published:
            try:
                self.push(job)
            except StateUnavailable as exc:
                job.token.cancel(str(exc))  # nobody could follow or cancel it: do not run it orphaned
                raise
            return
        if name == "state" and job.state not in _ACTIVE:
            return  # finish() writes the terminal state together with the result
        if job.id in self._published:
            try:
                self.push(job)
            except StateUnavailable:
                self._pending.add(job.id)  # the sync loop writes it when Redis is back

    def _meta(self, job: Job) -> str:
        t = job.token
        return json.dumps({
            "tool": job.tool, "owner": job.owner, "state": job.state, "progress": t.progress, "total": t.total,
            "message": t.message, "created": job.created, "finished": job.finished, "updated": job.updated,
            "error": job.error, "is_task": job.is_task, "ttl_s": job.ttl_s,
            "cancel_requested": job.cancel_requested, "replica": self.shared.replica})

    def _expire_s(self, job: Job) -> int:
        if job.state in _ACTIVE:
            return int(max(self.ttl_s, job.ttl_s or 0) + 86400)
        if job.ttl_s is not None:
            return max(1, int(job.created + job.ttl_s - time.time()) + 1)
        return max(1, int(self.ttl_s))

    def push(self, job: Job) -> None:
        """Write a local job's state (and, once finished, its result) to Redis."""
        key = self.shared.key("job", job.id)
        fields = {"meta": self._meta(job)}
        if job.state not in _ACTIVE:
            res = _result_json(job.result, self.shared.max_result_bytes)
            if res is not None:
                fields["result"] = res
        with self._push_lock:
            def write(pipe: Any) -> None:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self._expire_s(job))
                pipe.zadd(self.shared.key("jobs"), {job.id: job.created})
            self.shared.pipeline(write)
            self._published.add(job.id)
            self._pending.discard(job.id)

    def finish(self, job: Job, state: str, result: Any = None, error: str | None = None) -> None:
        super().finish(job, state, result, error)
        if job.id in self._published or job.detached or job.is_task:
            try:
                self.push(job)
            except StateUnavailable:
                self._pending.add(job.id)
                log.warning("job result not yet shared: Redis unreachable; retrying",
                            extra={"job_id": job.id, "url": self.shared.url})

    def forget(self, job: Job) -> None:
        super().forget(job)
        if job.id in self._published:
            self._published.discard(job.id)
            self._pending.discard(job.id)
            try:
                self.shared.pipeline(lambda p: (p.delete(self.shared.key("job", job.id)),
                                                p.zrem(self.shared.key("jobs"), job.id)))
            except StateUnavailable:
                pass

    def _purge_locked(self) -> None:
        before = set(self._jobs)
        super()._purge_locked()
        for jid in before - set(self._jobs):
            self._published.discard(jid)
            self._pending.discard(jid)

    # -- reading any replica's jobs -------------------------------------------------------------------
    def _local(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _remote(self, job_id: str, data: dict[str, str]) -> Job | None:
        try:
            meta = json.loads(data["meta"])
        except (KeyError, ValueError):
            return None
        token = CancelToken()
        token.progress, token.total, token.message = float(meta["progress"]), meta["total"], meta["message"]
        job = Job(id=job_id, tool=meta["tool"], token=token, created=meta["created"], finished=meta["finished"],
                  state=meta["state"], detached=True, error=meta["error"], owner=meta["owner"],
                  updated=meta["updated"], is_task=meta["is_task"], ttl_s=meta["ttl_s"],
                  cancel_requested=bool(meta["cancel_requested"] or data.get("cancel")))
        job.replica = meta.get("replica")  # type: ignore[attr-defined]
        if "result" in data:
            try:
                job.result = mt.CallToolResult.model_validate(json.loads(data["result"]))
            except ValueError:
                job.result = None
        if job.state in _ACTIVE and not self.shared.alive(job.replica):  # type: ignore[attr-defined]
            # its replica's lease is gone: judged from the lease key alone, so every replica answers alike
            reason = (f"replica {job.replica} stopped responding (no heartbeat for state.lease_s="  # type: ignore
                      f"{self.shared.lease_s:g} s); the job was lost")
            job.state, job.error = "error", reason
            job.finished = job.updated
            job.result = mt.CallToolResult(content=[mt.TextContent(type="text", text=reason)], is_error=True)
        return job

    def get(self, job_id: str, caller: str = LOCAL) -> Job | None:
        local = self._local(job_id)
        if local is not None:
            return super().get(job_id, caller)
        if not _JOB_ID.match(job_id or ""):
            return None
        data = self.shared.call(self.shared.r.hgetall, self.shared.key("job", job_id))
        job = self._remote(job_id, data) if data else None
        return job if job is not None and can_see(job.owner, caller) else None

    def fresh(self, job: Job) -> Job:
        if self._local(job.id) is job:
            return job
        now = self.get(job.id, LOCAL)
        if now is None:
            job.state, job.error = "error", "the job's record is gone from the shared state (expired, or lost)"
            return job
        return now

    def request_cancel(self, job: Job, reason: str) -> None:
        if self._local(job.id) is job:
            super().request_cancel(job, reason)
            return
        key = self.shared.key("job", job.id)
        msg = json.dumps({"id": job.id, "reason": reason})
        self.shared.pipeline(lambda p: (p.hset(key, "cancel", reason), p.publish(self.shared.key("cancel"), msg)))
        job.cancel_requested = True
        job.updated = time.time()

    def visible(self, caller: str = LOCAL) -> list[Job]:
        local = super().visible(caller)
        seen = {j.id for j in local}
        ids = [i for i in self.shared.call(self.shared.r.zrevrange, self.shared.key("jobs"), 0, 999)
               if i not in seen]
        if not ids:
            return local
        rows = self.shared.pipeline(lambda p: [p.hgetall(self.shared.key("job", i)) for i in ids])
        out = list(local)
        gone = []
        for jid, data in zip(ids, rows):
            job = self._remote(jid, data) if data else None
            if job is None:
                gone.append(jid)
            elif can_see(job.owner, caller):
                out.append(job)
        if gone:
            self.shared.call(self.shared.r.zrem, self.shared.key("jobs"), *gone)
        return out

    # -- the sync loop's share ------------------------------------------------------------------------
    def sync(self, full: bool = False) -> None:
        """Push the progress of local shared jobs (and any write that failed); trip cancel requests."""
        with self._lock:
            jobs = [j for j in self._jobs.values()
                    if j.id in self._published and (full or j.state in _ACTIVE or j.id in self._pending)]
        if not jobs:
            return
        active = [j for j in jobs if j.state in _ACTIVE]
        if active:
            flags = self.shared.pipeline(lambda p: [p.hget(self.shared.key("job", j.id), "cancel") for j in active])
            for job, reason in zip(active, flags):
                if reason and not job.token.cancelled:
                    self.trip(job, reason)
        for job in jobs:
            self.push(job)

    def trip(self, job: Job, reason: str) -> None:
        """A cancel request from another replica reached the replica running the job."""
        log.info("cancel from another replica", extra={"job_id": job.id, "reason": reason})
        job.cancel_requested = True
        job.updated = time.time()
        job.token.cancel(reason)

    def on_cancel_message(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            job = self._local(str(msg["id"]))
        except (ValueError, KeyError, TypeError):
            return
        if job is not None and job.state in _ACTIVE and not job.token.cancelled:
            self.trip(job, str(msg.get("reason") or "cancelled by job_cancel"))


class RedisImageIndex:
    """The image:// index every replica reads (the files themselves are on shared storage)."""

    def __init__(self, shared: RedisState) -> None:
        self.shared = shared

    def put(self, rec: Any, max_age_s: float = 0.0) -> None:
        key = self.shared.key("img", rec.id)
        fields = {"path": str(rec.path), "width": rec.width, "height": rec.height, "name": rec.name,
                  "created": rec.created, "mime": rec.mime_type, "owner": rec.owner or "", "size": rec.size}

        def write(p: Any) -> None:
            p.hset(key, mapping=fields)
            if max_age_s:
                p.expire(key, int(max_age_s) + 3600)
            p.zadd(self.shared.key("imgs"), {rec.id: rec.created})
        self.shared.pipeline(write)

    def _record(self, image_id: str, d: dict[str, str]) -> Any:
        from .media import ImageRecord

        return ImageRecord(image_id, Path(d["path"]), int(d["width"]), int(d["height"]), d["name"],
                           float(d["created"]), mime_type=d.get("mime") or "image/png", owner=d.get("owner") or None,
                           size=int(d.get("size") or 0))

    def get(self, image_id: str) -> Any:
        if not _IMG_ID.match(image_id or ""):
            return None
        d = self.shared.call(self.shared.r.hgetall, self.shared.key("img", image_id))
        return self._record(image_id, d) if d else None

    def records(self, limit: int = 1000) -> list[Any]:
        ids = self.shared.call(self.shared.r.zrevrange, self.shared.key("imgs"), 0, limit - 1)
        if not ids:
            return []
        rows = self.shared.pipeline(lambda p: [p.hgetall(self.shared.key("img", i)) for i in ids])
        return [self._record(i, d) for i, d in zip(ids, rows) if d]

    def forget(self, ids: list[str], now: float) -> None:
        if not ids:
            return

        def write(p: Any) -> None:
            for i in ids:
                p.delete(self.shared.key("img", i))
                p.zrem(self.shared.key("imgs"), i)
                p.set(self.shared.key("imgexp", i), now, ex=7 * 86400)
        self.shared.pipeline(write)

    def expired(self, image_id: str) -> float | None:
        if not _IMG_ID.match(image_id or ""):
            return None
        v = self.shared.call(self.shared.r.get, self.shared.key("imgexp", image_id))
        return float(v) if v else None


def redact(url: str) -> str:
    """The URL as errors and logs show it: a password (redis://user:secret@host) becomes ***."""
    return re.sub(r"^(\w+://[^:/@]*:)[^@]*@", r"\1***@", url)


class RedisState:
    """The connection, this replica's lease, and the background loop (heartbeat, job sync, cancel listener)."""

    def __init__(self, settings: Settings) -> None:
        cfg = settings.state
        self.url = redact(cfg.redis_url)  # as shown in errors and logs
        self.prefix = cfg.key_prefix
        self.heartbeat_s = cfg.heartbeat_s
        self.lease_s = cfg.lease_s
        self.max_result_bytes = cfg.max_result_bytes
        self.event_ttl_s = cfg.event_ttl_s
        self.replica = replica_id()
        self.r = redis.Redis.from_url(cfg.redis_url, decode_responses=True, socket_timeout=2.0,
                                      socket_connect_timeout=1.0, health_check_interval=0)
        try:
            self.r.ping()
        except RedisError as exc:
            raise ConfigError(f"state.redis_url={self.url!r}: cannot reach Redis ({exc}); start redis-server or "
                              f"fix the URL") from None
        self.jobs = RedisJobManager(self, settings.limits.job_ttl_s, settings.limits.max_jobs)
        self.images = RedisImageIndex(self)
        from .state_events import RedisEventStore

        self.events = RedisEventStore(self)
        self._stop = threading.Event()
        self._down_since: float | None = None
        self.heartbeat()
        self._threads = [threading.Thread(target=self._loop, name="atelier-state-sync", daemon=True),
                         threading.Thread(target=self._listen, name="atelier-state-cancel", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("shared state: redis", extra={"url": self.url, "replica": self.replica})

    # -- helpers --------------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def unavailable(self, exc: BaseException) -> StateUnavailable:
        return StateUnavailable(f"shared state unavailable: cannot reach Redis at state.redis_url={self.url!r} "
                                f"({type(exc).__name__}: {exc}); the server reconnects by itself, retry shortly")

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise self.unavailable(exc) from None

    def pipeline(self, build: Any) -> Any:
        try:
            with self.r.pipeline(transaction=False) as p:
                build(p)
                return p.execute()
        except RedisError as exc:
            raise self.unavailable(exc) from None

    def alive(self, replica: str | None) -> bool:
        if not replica or replica == self.replica:
            return True  # our own jobs are answered from memory; a record without a replica is not judged
        return bool(self.call(self.r.exists, self.key("replica", replica)))

    def heartbeat(self) -> None:
        self.call(self.r.set, self.key("replica", self.replica), str(time.time()), px=int(self.lease_s * 1000))

    # -- background -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.wait(0.1):
            try:
                full = False
                if time.monotonic() >= next_beat:
                    self.heartbeat()
                    next_beat = time.monotonic() + self.heartbeat_s
                if self._down_since is not None:  # back: write everything we hold again (Redis may be new)
                    self.heartbeat()
                    full = True
                self.jobs.sync(full=full)
                if self._down_since is not None:
                    log.info("shared state reachable again", extra={"url": self.url,
                                                                     "down_s": round(time.time() - self._down_since, 2)})
                    self._down_since = None
            except StateUnavailable as exc:
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("shared state unreachable", extra={"url": self.url, "error": str(exc)})
            except Exception:  # never let the loop die
                log.exception("shared state loop failed")

    def _listen(self) -> None:
        while not self._stop.is_set():
            ps = None
            try:
                ps = self.r.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self.key("cancel"))
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self.jobs.on_cancel_message(msg["data"])
            except RedisError:
                self._stop.wait(0.5)
            except Exception:
                log.exception("cancel listener failed")
                self._stop.wait(0.5)
            finally:
                if ps is not None:
                    try:
                        ps.close()
                    except Exception:
                        pass

    def close(self) -> None:
        """Stop the loop, write what is pending, drop the lease (the replica's running jobs were cancelled)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        try:
            self.jobs.sync(full=True)
            self.call(self.r.delete, self.key("replica", self.replica))
        except StateUnavailable:
            pass
        try:
            self.r.close()
        except Exception:
            pass


__all__ = ["RedisImageIndex", "RedisJobManager", "RedisState", "SharedJob", "replica_id"]
