"""Replicas behind a real HAProxy with shared state in a real redis-server (issue 15): figures, printed.

    python benchmarks/replicas_bench.py              # 1,000 mixed calls, throughput with 1/2/3 replicas
    python benchmarks/replicas_bench.py --quick      # 200 mixed calls, 300 per throughput run
    python benchmarks/replicas_bench.py --text       # also one replica's generate_text tokens/s

What runs: redis-server (no persistence), three replicas
(`http.stateless = true`, `state.backend = "redis"`, one torch thread each)
and three HAProxy frontends in front of 1, 2 and 3 of them (round-robin), all
on loopback ports (tests/replicas.py starts them; needs the Debian packages
redis-server and haproxy).

1. Mixed load: N calls (3 in 4 `color_compare` on two colours, 1 in 4
   `engine_status`) from 8 client threads through the 3-replica frontend.
   Printed: calls/s, answers per call (must be exactly 1), session errors
   (must be 0), and how the calls spread over the replicas.
2. Throughput of cheap calls (`color_compare` on colours) from 8 clients
   through 1, 2 and 3 replicas; printed calls/s and the ratio to 1 replica.
   On a machine with few cores the replicas share the same cores, so the
   ratio says what the balancer and Redis cost rather than what more
   machines give (docs/scaling.md turns the 1-replica figure into estimates).
3. (--text) generate_text's decode rate on one replica (64 new tokens,
   greedy, after a warm-up call), from the tool's own `tokens_per_s`.
No figure here is asserted; tests/test_replicas.py asserts the behaviour.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import itertools
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.replicas import HaproxyProc, RedisProc, Replica, call, stop_all  # noqa: E402

COLOURS = ["#ff0000", "#fe0101", "#00ff00", "#0a0b0c", "#808080", "#7f8081", "#123456", "#fedcba"]


def run_calls(url: str, work: list[tuple[str, dict]], clients: int = 8) -> tuple[float, list]:
    chunks = [list(enumerate(work))[k::clients] for k in range(clients)]

    def client_run(chunk):
        out = []
        with httpx.Client() as c:
            for rid, (tool, args) in chunk:
                try:
                    out.append((rid, call(c, url, tool, args, rid=rid + 1)))
                except httpx.HTTPError as exc:
                    out.append((rid, exc))
        return out

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        results = [r for part in ex.map(client_run, chunks) for r in part]
    return time.perf_counter() - t0, results


def summarize(results: list) -> tuple[int, int, collections.Counter]:
    errors, wrong_answers, spread = 0, 0, collections.Counter()
    for _, a in results:
        if isinstance(a, Exception) or a.status != 200:
            errors += 1
            continue
        if len(a.replies) != 1:
            wrong_answers += 1
            continue
        if a.error is not None or a.result.get("isError"):
            errors += 1
        spread[a.replica] += 1
    return errors, wrong_answers, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--text", action="store_true")
    ap.add_argument("--calls", type=int, default=None, help="mixed calls (default 1000, --quick 200)")
    args = ap.parse_args()
    mixed_n = args.calls or (200 if args.quick else 1000)
    tp_n = 300 if args.quick else 800

    work_dir = Path(tempfile.mkdtemp(prefix="atelier-replicas-bench-"))
    shared = work_dir / "shared"
    (shared / "out").mkdir(parents=True)
    redis = None
    reps: list[Replica] = []
    lbs: list[HaproxyProc] = []
    try:
        redis = RedisProc(work_dir).start()
        t0 = time.perf_counter()
        reps = [Replica(work_dir, f"r{i}", redis.url, shared_dir=shared, deadline_s=45.0).start() for i in (1, 2, 3)]
        for r in reps:
            r.wait()
        print(f"3 replicas started (in parallel) in {time.perf_counter() - t0:.1f} s")
        for n in (1, 2, 3):
            d = work_dir / f"lb{n}"
            d.mkdir()
            lbs.append(HaproxyProc(d, reps[:n]).start())
        with httpx.Client() as c:  # warm every replica (first call imports the colour engine)
            for r in reps:
                call(c, r.url, "color_compare", {"color_a": "red", "color_b": "blue"})
        time.sleep(1.0)  # health checks

        pairs = itertools.cycle(itertools.combinations(COLOURS, 2))
        work = [("color_compare", {"color_a": a, "color_b": b}) if i % 4 else ("engine_status", {})
                for i, (a, b) in zip(range(mixed_n), pairs)]
        secs, results = run_calls(lbs[2].url, work)
        errors, wrong, spread = summarize(results)
        print(f"\n1. mixed load: {mixed_n} calls (3/4 color_compare, 1/4 engine_status), 8 clients, 3 replicas")
        print(f"   {mixed_n / secs:8.1f} calls/s   session/call errors: {errors}   calls without exactly one "
              f"answer: {wrong}")
        print("   spread: " + ", ".join(f"{k}: {v}" for k, v in sorted(spread.items())))

        print(f"\n2. throughput, color_compare on two colours, {tp_n} calls, 8 clients")
        base = None
        for n, lb in zip((1, 2, 3), lbs):
            cheap = [("color_compare", {"color_a": a, "color_b": b})
                     for _, (a, b) in zip(range(tp_n), itertools.cycle(itertools.combinations(COLOURS, 2)))]
            secs, results = run_calls(lb.url, cheap)
            errors, wrong, _ = summarize(results)
            rate = tp_n / secs
            base = base or rate
            print(f"   {n} replica{'s' if n > 1 else ' '}: {rate:8.1f} calls/s   x{rate / base:4.2f} vs 1   "
                  f"errors: {errors + wrong}")

        if args.text:
            with httpx.Client() as c:
                prompt = {"prompt": "Describe a lighthouse at night.", "max_new_tokens": 64}
                warm = call(c, reps[0].url, "generate_text", {**prompt, "max_new_tokens": 4}, timeout=300)
                job = warm.result["structuredContent"].get("job_id")
                while job and call(c, reps[0].url, "job_status", {"job_id": job}).result["structuredContent"][
                        "status"] in ("queued", "running"):
                    time.sleep(0.5)
                sc = call(c, reps[0].url, "generate_text", prompt, timeout=300).result["structuredContent"]
                while "job_id" in sc and sc.get("status") not in ("done", "error", "cancelled"):  # past the deadline
                    time.sleep(0.5)
                    sc = call(c, reps[0].url, "job_status", {"job_id": sc["job_id"]}).result["structuredContent"]
                sc = sc.get("result", sc)
                print(f"\n3. generate_text on one replica: {sc['completion_tokens']} tokens at "
                      f"{sc['tokens_per_s']:.1f} tokens/s ({sc['model']})")
    finally:
        stop_all(*lbs, *reps, redis)


if __name__ == "__main__":
    main()
