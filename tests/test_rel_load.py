"""Reliability items 4 and 5 over HTTP on 127.0.0.1, against the real `atelier serve`.

4. Load: 8 clients x 50 mixed calls (colour, mask, recommend, text with the
   embedded model, images with a tiny pipeline) while generations run back to back:
   every request gets exactly one answer (result, busy or error), no transport
   failure or 5xx, p99 of cheap tools under a quarter of a generation, and RSS, threads and open
   files back within 5 % of the warmed-up baseline afterwards.
5. Cancellation: 20 cycles of cancelling a text generation and an image job
   mid-way: the work stops within one step, memory returns to baseline, and
   the next call succeeds.

Each test prints its figures. Loops are bounded in count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mcp import Client
from PIL import Image

from tests.helpers import free_port, server_env, wait_port
from tests.tiny_pipeline import cached_tiny_sd
from tests.zygote import Popen

pytestmark = pytest.mark.slow

ATELIER = str(Path(sys.executable).parent / "atelier")
CHEAP = {"color_pair", "engine_status", "catalog_info"}


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / name)
    port = free_port()
    env = server_env(tmp_path, ATELIER_MODELS__DIFFUSION=str(cached_tiny_sd()), ATELIER_LOGGING__LEVEL="WARNING",
                     ATELIER_LIMITS__DEADLINE_S="120")
    proc = Popen([ATELIER, "serve", "--transport", "http", "--port", str(port)], env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/mcp"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


CALLS = {
    "color_pair": ("color_compare", {"color_a": "#FF0000", "color_b": "#FE0000"}),
    "engine_status": ("engine_status", {}),
    "catalog_info": ("catalog_info", {}),
    "color_images": ("color_compare", {"image_a": "a.png", "image_b": "b.png", "heatmap": False}),
    "mask": ("mask_edit", {"image": "a.png", "expression": "r > 128", "operation": "fill", "color": "#00ff00"}),
    "recommend": ("recommend_topk", {"text": "usb-c cable", "k": 5}),
    "text": ("generate_text", {"prompt": "Say hello.", "max_new_tokens": 4}),
    "image": ("generate_image", {"prompt": "a cube", "width": 64, "height": 64, "steps": 2, "seed": 1}),
}
ORDER = list(CALLS)


def _snapshot(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    return {"rss": p.memory_info().rss, "threads": p.num_threads(), "fds": p.num_fds()}


async def _client_loop(url: str, cid: int, n: int, log: list, stop_at: float) -> None:
    async with Client(url) as c:
        for j in range(n):
            if time.monotonic() > stop_at:
                log.append((cid, "timeout-budget", "skipped", 0.0))
                continue
            kind = ORDER[(cid * 7 + j) % len(ORDER)]
            name, args = CALLS[kind]
            t0 = time.perf_counter()
            try:
                r = await c.call_tool(name, args)
                text = r.content[0].text if r.content else ""
                outcome = "busy" if (r.is_error and text.startswith("busy")) else ("error" if r.is_error else "ok")
            except Exception as exc:  # a transport failure: no answer
                outcome = f"exception:{type(exc).__name__}"
            log.append((cid, kind, outcome, (time.perf_counter() - t0) * 1000))


async def _call(url: str, name: str, args: dict):
    async with Client(url) as c:
        return await c.call_tool(name, args)


def test_http_load_mixed_clients(tmp_path):
    proc, url = _start(tmp_path)
    try:
        async def main():
            # warm-up at the same concurrency as the measured run (a generation in flight and 8 clients calling
            # at once): loads every model and starts every thread (the server's pools start all their threads
            # at their first call, mcp_server/pool.py: a pool that grew with how calls overlapped once ended
            # this run 2 threads above its baseline)
            warm: list = []
            warm_long = asyncio.create_task(_call(url, "generate_text", {"prompt": "Tell a long story about the sea.",
                                                                         "max_new_tokens": 48}))
            await asyncio.sleep(0.5)
            await asyncio.gather(*(_client_loop(url, i, len(ORDER), warm, time.monotonic() + 300)
                                   for i in range(8)))
            assert not (await asyncio.wait_for(warm_long, 300)).is_error
            assert all(o[2] == "ok" for o in warm), [o for o in warm if o[2] != "ok"]
            await asyncio.sleep(1.0)
            base = _snapshot(proc.pid)

            # the device stays busy for the whole measured phase: generations back to back (sampled, so no
            # drafting shortens them) until the 8 clients are done; a single one took 0.7 s on a fast machine,
            # over before the clients had started
            phase_done = asyncio.Event()
            gens: list[tuple[float, float]] = []  # (start, end) of each generation

            async def long_generations():
                async with Client(url) as c:
                    while not phase_done.is_set():
                        t = time.perf_counter()
                        r = await c.call_tool("generate_text", {"prompt": "Tell a long story about the sea.",
                                                                "max_new_tokens": 160, "temperature": 0.8,
                                                                "seed": len(gens)})
                        gens.append((t, time.perf_counter()))
                        assert not r.is_error, r.content[0].text

            long_task = asyncio.create_task(long_generations())
            await asyncio.sleep(1.0)
            log: list = []
            t0 = time.perf_counter()
            await asyncio.gather(*(_client_loop(url, i, 50, log, time.monotonic() + 600) for i in range(8)))
            t1 = time.perf_counter()
            phase_done.set()
            await asyncio.wait_for(long_task, 300)
            # generations covered the whole phase (each next one starts as the last ends: gaps of a few ms)
            assert gens and gens[0][0] < t0 and gens[-1][1] > t1 - 0.2, (gens, t0, t1)
            assert all(b[0] - a[1] < 0.2 for a, b in zip(gens, gens[1:])), gens
            await asyncio.sleep(2.0)
            after = _snapshot(proc.pid)
            times = sorted(b - a for a, b in gens)
            return base, after, log, t1 - t0, times[len(times) // 2]

        base, after, log, wall, long_s = asyncio.run(main())
    finally:
        _stop(proc)

    outcomes: dict[str, int] = {}
    for _, _, o, _ in log:
        outcomes[o] = outcomes.get(o, 0) + 1
    cheap = sorted(ms for _, k, o, ms in log if k in CHEAP and o == "ok")
    p99 = cheap[max(0, int(len(cheap) * 0.99) - 1)] if cheap else float("nan")
    p50 = cheap[len(cheap) // 2] if cheap else float("nan")
    print(f"\nload: {len(log)} calls in {wall:.1f} s, outcomes {outcomes}; cheap tools p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms (generations of up to 160 tokens back to back beside them, median {long_s:.1f} s); "
          f"rss {base['rss'] / 1e6:.0f} -> {after['rss'] / 1e6:.0f} MB, threads "
          f"{base['threads']} -> {after['threads']}, fds {base['fds']} -> {after['fds']}")
    assert len(log) == 400
    assert not [o for o in outcomes if o.startswith("exception") or o == "timeout-budget"], outcomes
    assert outcomes.get("error", 0) == 0, [x for x in log if x[2] == "error"][:5]
    # cheap tools run beside the device worker, not queued behind it (queued, they would wait half a generation
    # on average): even their slowest calls take a small fraction of one of the generations that hold the device
    # meanwhile (a ratio: these 2 shared cores are too noisy for a fixed number of milliseconds; the figures above
    # are printed for the record)
    assert p99 < 1000 * long_s / 4, f"p99 of cheap tools {p99:.1f} ms vs a {long_s:.1f} s generation"
    assert after["rss"] <= base["rss"] * 1.05
    assert after["threads"] <= base["threads"] * 1.05 + 1
    assert after["fds"] <= base["fds"] * 1.05 + 1


def test_cancel_cycles_text_and_image(tmp_path):
    proc, url = _start(tmp_path)
    figures = {"cycles": 0, "max_steps_after_cancel": 0, "stop_ms": []}
    try:
        async def one_cycle(c: Client, tool: str, args: dict) -> None:
            seen: list[float] = []
            first = asyncio.Event()

            async def on_progress(p, t, m):
                seen.append(p)
                if len(seen) >= 2:
                    first.set()

            task = asyncio.create_task(c.call_tool(tool, args, progress_callback=on_progress))
            await asyncio.wait_for(first.wait(), 120)
            at_cancel = len(seen)
            t0 = time.perf_counter()
            task.cancel()
            try:
                await task
            except BaseException:
                pass
            async with Client(url) as probe:
                for _ in range(200):
                    st = await probe.call_tool("engine_status", {})
                    if not st.structured_content["worker_busy"] and not _llm_busy(st.structured_content):
                        break
                    await asyncio.sleep(0.02)
            figures["stop_ms"].append((time.perf_counter() - t0) * 1000)
            figures["max_steps_after_cancel"] = max(figures["max_steps_after_cancel"], len(seen) - at_cancel)
            figures["cycles"] += 1

        async def main():
            async with Client(url) as warm:
                for name, args in (CALLS["text"], CALLS["image"]):
                    assert not (await warm.call_tool(name, args)).is_error
            await asyncio.sleep(1.0)
            base = _snapshot(proc.pid)
            for i in range(20):
                async with Client(url) as c:
                    if i % 2 == 0:
                        await one_cycle(c, "generate_text", {"prompt": "Count to one thousand.",
                                                             "max_new_tokens": 400})
                    else:
                        await one_cycle(c, "generate_image", {"prompt": "x", "width": 64, "height": 64,
                                                              "steps": 90, "seed": i})
            async with Client(url) as c:
                r = await c.call_tool(*CALLS["text"])
                assert not r.is_error, r.content[0].text
                r = await c.call_tool(*CALLS["image"])
                assert not r.is_error, r.content[0].text
            await asyncio.sleep(1.0)
            return base, _snapshot(proc.pid)

        base, after = asyncio.run(main())
    finally:
        _stop(proc)
    stops = sorted(figures["stop_ms"])
    print(f"\ncancel: {figures['cycles']} cycles, progress steps after cancel <= "
          f"{figures['max_steps_after_cancel']}, stop latency median {stops[len(stops) // 2]:.0f} ms, "
          f"max {stops[-1]:.0f} ms; rss {base['rss'] / 1e6:.0f} -> {after['rss'] / 1e6:.0f} MB")
    assert figures["cycles"] == 20
    assert figures["max_steps_after_cancel"] <= 2  # the step in flight may still report
    assert after["rss"] <= base["rss"] * 1.05


def _llm_busy(status: dict) -> bool:
    return any(name.startswith("llm") and (v.get("active", 0) or v.get("waiting", 0))
               for name, v in status.get("services", {}).items() if isinstance(v, dict))
