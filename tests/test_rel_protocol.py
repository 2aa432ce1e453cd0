"""Item 1 of the reliability suite: malformed JSON-RPC over stdio and over HTTP.

Per transport: a fixed corpus (invalid UTF-8, non-JSON, arrays/batches, wrong
`jsonrpc`, odd ids, unknown methods, wrongly typed params, deep nesting, huge
strings, truncated requests, bodies over the limit) plus hypothesis-generated
messages, >= 300 cases in all, against the real server in a subprocess.

Pass criteria: the process never dies; no 5xx; every stdout line (stdio) and
every response body (HTTP) is valid JSON-RPC 2.0; every well-formed request
(jsonrpc "2.0", an integer or string id, a string method, object params)
gets exactly one answer with its id; a ping after each stdio case and
`tools/list` after each batch still work. Figures printed: cases, failures,
answered / dropped, max and median latency.
"""

from __future__ import annotations

import json
import socket
import statistics
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reltools import StdioPeer, init_messages, server_cmd, stop, valid_jsonrpc_message
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

pytestmark = pytest.mark.slow

BATCH = 25
HYPOTHESIS_CASES = 140
SAFE_TOOLS = ["engine_status", "job_status", "job_cancel", "test_load", "test_image", "test_noisy", "test_boom",
              "test_oom", "no_such_tool", ""]
METHODS = ["initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
           "resources/templates/list", "prompts/list", "prompts/get", "logging/setLevel", "completion/complete",
           "notifications/initialized", "notifications/cancelled", "notifications/progress",
           "notifications/roots/list_changed", "resources/subscribe", "sampling/createMessage"]


def _req(rid, method, params=None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


def fixed_corpus() -> list[tuple[str, bytes]]:
    """(label, bytes of one message) — labels group the corpus in the printed figures."""
    c: list[tuple[str, bytes]] = []
    add = lambda label, data: c.append((label, data if isinstance(data, bytes) else data.encode()))  # noqa: E731
    # invalid UTF-8
    for raw in [b"\xff", b"\xff\xfe\xfd", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf0\x9f\x98",
                b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}', b'{"jsonrpc":"2.0","id":"\xc3","method":"ping"}',
                b'\xef\xbb\xbf{"jsonrpc":"2.0","id":2,"method":"ping"}', b"\x80" * 1000,
                b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"test_load","arguments":'
                b'{"image":"\xfe\xff"}}}', b"\x00\x01\x02\x03"]:
        add("invalid-utf8", raw)
    # not JSON
    for text in ["", " ", "\t", "null", "true", "false", "0", "-1", "1e999", '"a string"', "{", "}", "[", "]",
                 "{'jsonrpc': '2.0'}", "NaN", "Infinity", '{"jsonrpc":"2.0",}', '{"jsonrpc":"2.0"} trailing',
                 '{"a":1}{"b":2}', "/* comment */ {}", "<xml/>", "GET / HTTP/1.1", "\r", "\x1b[31m", "\\u0000",
                 '{"jsonrpc":"2.0","id":1,"method":"ping"', '{"jsonrpc":2.0,id:1}', "\u2028\u2029"]:
        add("non-json", text)
    # arrays and batches (batches are not part of MCP since 2025-06-18)
    for val in [[], [1], [{}], [[]], [None], [_req_obj(10, "ping")], [_req_obj(11, "ping"), _req_obj(12, "tools/list")],
                [_req_obj(13, "ping"), 5, "x"], [{"jsonrpc": "2.0", "method": "notifications/initialized"}],
                [[_req_obj(14, "ping")]]]:
        add("array", json.dumps(val))
    # wrong or missing jsonrpc
    for v in ["1.0", "2", 2.0, 2, None, "2.0 ", ["2.0"], {"v": "2.0"}, "", "3.0"]:
        add("wrong-jsonrpc", json.dumps({"jsonrpc": v, "id": 20, "method": "ping"}))
    add("wrong-jsonrpc", json.dumps({"id": 21, "method": "ping"}))
    # odd ids
    for rid in [None, 1.5, -0.0, 1e308, 10 ** 30, -(10 ** 30), -1, 0, True, False, [1], [[1, 2]], {"a": 1},
                {"a": {"b": [1]}}, "", "x" * 10000, "\u0000", "🦀", " ", 2 ** 53 + 1]:
        add("odd-id", json.dumps({"jsonrpc": "2.0", "id": rid, "method": "ping"}))
    # unknown methods
    for m in ["", "nope", "tools/none", "TOOLS/LIST", "rpc.discover", "a" * 10000, "\u0000", "tools/list/extra",
              "$/cancelRequest", "initialize ", "resources/subscribe", "resources/unsubscribe", "prompts/get",
              "completion/complete", "sampling/createMessage", "elicitation/create", "roots/list", "tasks/get",
              "notifications/unknown", "../../etc/passwd"]:
        add("unknown-method", _req(30, m))
    for m in [None, 5, [], {}, True]:
        add("unknown-method", json.dumps({"jsonrpc": "2.0", "id": 31, "method": m}))
    # wrongly typed params for known methods
    wrong = [
        ("ping", [1, 2]), ("ping", "str"), ("ping", 5), ("ping", None), ("ping", {"_meta": 5}),
        ("tools/list", {"cursor": 5}), ("tools/list", {"cursor": None}), ("tools/list", {"cursor": "x" * 1000}),
        ("tools/list", [None]),
        ("tools/call", {}), ("tools/call", {"name": 5}), ("tools/call", {"name": None}), ("tools/call", {"name": []}),
        ("tools/call", {"name": "engine_status", "arguments": []}),
        ("tools/call", {"name": "engine_status", "arguments": "x"}),
        ("tools/call", {"name": "engine_status", "arguments": None}),
        ("tools/call", {"name": "engine_status", "arguments": {"extra": 1}}),
        ("tools/call", {"name": "job_status", "arguments": {"job_id": 5}}),
        ("tools/call", {"name": "job_status", "arguments": {"job_id": "x" * 100000}}),
        ("tools/call", {"name": "job_cancel", "arguments": {"job_id": None}}),
        ("tools/call", {"name": "test_image", "arguments": {"width": "wide"}}),
        ("tools/call", {"name": "test_image", "arguments": {"width": 10 ** 20}}),
        ("tools/call", {"name": "test_image", "arguments": {"width": -5, "height": 1.5}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": 7}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": "../../../etc/passwd"}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": "/etc/passwd"}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": "a\u0000b"}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": "data:image/png;base64,!!!"}}),
        ("tools/call", {"name": "test_load", "arguments": {"image": "image://../../x"}}),
        ("tools/call", {"name": "test_boom", "arguments": {}}),
        ("tools/call", {"name": "test_oom", "arguments": {}}),
        ("tools/call", {"name": "test_noisy", "arguments": {}}),
        ("tools/call", {"name": "x" * 5000, "arguments": {}}),
        ("tools/call", {"name": "engine_status", "arguments": {}, "_meta": {"progressToken": [1]}}),
        ("tools/call", {"name": "engine_status", "arguments": {}, "_meta": "str"}),
        ("resources/read", {}), ("resources/read", {"uri": 5}), ("resources/read", {"uri": "not a uri"}),
        ("resources/read", {"uri": "image://../../etc/passwd"}), ("resources/read", {"uri": "file:///etc/passwd"}),
        ("resources/read", {"uri": "image://" + "0" * 12}), ("resources/read", {"uri": "image://%2e%2e%2f"}),
        ("resources/list", {"cursor": {}}), ("resources/templates/list", [1]),
        ("prompts/get", {"name": "x"}), ("prompts/get", {"name": 5, "arguments": []}),
        ("logging/setLevel", {"level": "bogus"}), ("logging/setLevel", {"level": 5}), ("logging/setLevel", {}),
        ("completion/complete", {"ref": 5}),
        ("initialize", {}), ("initialize", {"protocolVersion": 5}),
        ("initialize", {"protocolVersion": "1999-01-01", "capabilities": {}, "clientInfo": {"name": "x", "version": "0"}}),
    ]
    for i, (m, p) in enumerate(wrong):
        add("wrong-params", _req(100 + i, m, p))
    for m, p in [("notifications/cancelled", {"requestId": {"x": 1}}), ("notifications/cancelled", {}),
                 ("notifications/cancelled", {"requestId": 99999, "reason": 5}),
                 ("notifications/progress", {"progressToken": None, "progress": "x"}),
                 ("notifications/initialized", [1]), ("notifications/roots/list_changed", "x")]:
        add("wrong-params", json.dumps({"jsonrpc": "2.0", "method": m, "params": p}))
    # deep nesting
    for depth in [100, 1000, 10000, 100000]:
        add("deep-nesting", "[" * depth + "]" * depth)
        add("deep-nesting", '{"jsonrpc":"2.0","id":40,"method":"ping","params":{"x":' + '{"a":' * depth + "1"
            + "}" * depth + "}}")
        add("deep-nesting", '{"jsonrpc":"2.0","id":41,"method":"tools/call","params":{"name":"engine_status",'
            '"arguments":{"x":' + "[" * depth + "]" * depth + "}}}")
    add("deep-nesting", "[" * 50000)  # unterminated
    # huge strings and large structures (well under the HTTP body limit)
    for n in [100_000, 1_000_000, 4_000_000]:
        add("huge", _req(50, "ping", {"x": "a" * n}))
    add("huge", _req(51, "tools/call", {"name": "test_load", "arguments": {"image": "A" * 2_000_000}}))
    add("huge", _req(52, "tools/call", {"name": "test_load", "arguments": {"image": "/" + "a/" * 300_000}}))
    add("huge", _req(53, "tools/list", {str(i): i for i in range(100_000)}))
    add("huge", '{"jsonrpc":"2.0","id":54,"method":"ping","params":{"n":' + "9" * 100_000 + "}}")
    add("huge", '{"jsonrpc":"2.0","id":' + "7" * 5000 + ',"method":"ping"}')
    add("huge", '{"jsonrpc":"2.0","id":55,"method":"ping","params":{"s":"' + "\\u0000" * 100_000 + '"}}')
    # valid requests truncated at many points
    for rid, base in [(60, _req(60, "tools/call", {"name": "test_image", "arguments": {"width": 8, "height": 8}})),
                      (61, json.dumps(init_messages(61)[0]).encode())]:
        for cut in range(1, len(base), max(1, len(base) // 20)):
            add("truncated", base[:cut])
    return c


def _req_obj(rid, method):
    return {"jsonrpc": "2.0", "id": rid, "method": method}


def well_formed_id(data: bytes):
    """The id of a well-formed request (which must get exactly one answer), else None."""
    try:
        msg = json.loads(data.decode("utf-8"))  # strict: a BOM or invalid UTF-8 is not well-formed
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method"), str):
        return None
    rid = msg.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    if "params" in msg and not isinstance(msg["params"], dict):
        return None
    if not msg["method"] or msg["method"].startswith("notifications/"):
        return None
    return rid


# --------------------------------------------------------------------------- hypothesis strategies
json_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda ch: st.lists(ch, max_size=4)
                          | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=16)
odd_ids = (st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16)
           | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
call_params = st.fixed_dictionaries({"name": st.sampled_from(SAFE_TOOLS)}, optional={"arguments": json_value})
message = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0"]) | json_leaf,
    "id": odd_ids,
    "method": st.sampled_from(METHODS) | st.text(max_size=24),
    "params": json_value | call_params,
})


@st.composite
def hypothesis_case(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    msg = draw(message)
    data = json.dumps(msg).encode()
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=200)).replace(b"\n", b" ")
    if kind == 1 and len(data) > 2:
        return data[: draw(st.integers(1, len(data) - 1))]
    if kind == 2:
        pos = draw(st.integers(0, len(data)))
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)).replace(b"\n", b" ") + data[pos:]
    return data


# --------------------------------------------------------------------------- stdio
def test_malformed_jsonrpc_over_stdio(tmp_path):
    corpus = fixed_corpus()
    peer = StdioPeer(server_cmd("stdio"), server_env(tmp_path), tmp_path)
    figures = {"cases": 0, "failures": 0, "well_formed": 0, "answered_well_formed": 0, "tools_list_checks": 0}
    latencies: list[float] = []
    failures: list[str] = []
    seq = [0]
    try:
        assert peer.initialize() is not None, bytes(peer.stderr)[-2000:]

        def one(label: str, data: bytes) -> None:
            seq[0] += 1
            figures["cases"] += 1
            rid = well_formed_id(data)
            t0 = time.monotonic()
            peer.send_raw(data.replace(b"\n", b" "))
            sentinel = f"sentinel-{seq[0]}"
            ans = peer.request(sentinel, "ping", timeout=20)
            latencies.append(time.monotonic() - t0)
            if ans is None or "result" not in ans:
                failures.append(f"{label}: no ping answer after {data[:80]!r} (alive={peer.proc.poll() is None})")
            if rid is not None:
                figures["well_formed"] += 1
                if peer.wait_answer(rid, 20) is None:
                    failures.append(f"{label}: well-formed request id={rid!r} got no answer: {data[:80]!r}")
                else:
                    figures["answered_well_formed"] += 1
                    peer.answers.pop(json.dumps(rid), None)  # ids repeat across cases
            if seq[0] % BATCH == 0:
                tools_list_ok()

        def tools_list_ok() -> None:
            figures["tools_list_checks"] += 1
            ans = peer.request(f"list-{seq[0]}", "tools/list", timeout=30)
            if not ans or "test_image" not in {t["name"] for t in ans.get("result", {}).get("tools", [])}:
                failures.append(f"tools/list failed after case {seq[0]}: {ans!r:.200}")

        for label, data in corpus:
            one(label, data)
            assert peer.proc.poll() is None, f"server died on {label}: {data[:100]!r}"

        @settings(max_examples=HYPOTHESIS_CASES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(hypothesis_case())
        def gen(data: bytes) -> None:
            one("hypothesis", data)
            assert peer.proc.poll() is None, f"server died on {data[:100]!r}"

        gen()
        tools_list_ok()
        figures["failures"] = len(failures) + len(peer.bad_lines)
        figures["stdout_lines"] = len(peer.lines)
        figures["invalid_stdout_lines"] = len(peer.bad_lines)
        figures["max_latency_ms"] = round(max(latencies) * 1000, 1)
        figures["median_latency_ms"] = round(statistics.median(latencies) * 1000, 2)
        print(f"\n[rel-protocol stdio] {json.dumps(figures)}")
        assert not peer.bad_lines, f"stdout lines that are not JSON-RPC: {peer.bad_lines[:5]!r}"
        assert not failures, "\n".join(failures[:20])
        assert figures["cases"] >= 300
        peer.proc.stdin.close()
        assert peer.proc.wait(20) == 0
    finally:
        stop(peer.proc)


# --------------------------------------------------------------------------- HTTP
def _check_http_body(resp: httpx.Response) -> str | None:
    """None when the body is acceptable JSON-RPC (or an empty/plain error body on a 4xx), else why not."""
    ctype = resp.headers.get("content-type", "")
    if resp.status_code >= 500:
        return f"status {resp.status_code}"
    if "text/event-stream" in ctype:
        for line in resp.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                try:
                    if not valid_jsonrpc_message(json.loads(line[5:])):
                        return f"SSE event is not JSON-RPC: {line[:120]}"
                except ValueError:
                    return f"SSE event is not JSON: {line[:120]}"
    elif "application/json" in ctype and resp.content:
        try:
            body = json.loads(resp.content)
        except ValueError:
            return f"JSON body does not parse: {resp.content[:120]!r}"
        if not valid_jsonrpc_message(body):
            return f"JSON body is not JSON-RPC: {resp.content[:120]!r}"
    return None


def _answer_ids(resp: httpx.Response) -> list:
    out = []
    ctype = resp.headers.get("content-type", "")
    try:
        if "text/event-stream" in ctype:
            for line in resp.text.splitlines():
                if line.startswith("data:") and line[5:].strip():
                    msg = json.loads(line[5:])
                    if "result" in msg or "error" in msg:
                        out.append(msg.get("id"))
        elif "application/json" in ctype and resp.content:
            out.append(json.loads(resp.content).get("id"))
    except ValueError:
        pass
    return out


def _raw_http(port: int, head: bytes, body: bytes = b"") -> int:
    """Send raw bytes, return the status code (0 when the server closed without a status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def test_malformed_jsonrpc_over_http(tmp_path):
    import subprocess

    port = free_port()
    proc = Popen(server_cmd("http", port), env=server_env(tmp_path), stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/mcp"
    figures = {"cases": 0, "failures": 0, "status": {}, "well_formed": 0, "answered_well_formed": 0,
               "tools_list_checks": 0}
    latencies: list[float] = []
    failures: list[str] = []
    try:
        wait_port(port, proc)
        client = httpx.Client(timeout=30)
        base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        r = client.post(url, headers=base, content=json.dumps(init_messages(1)[0]))
        assert r.status_code == 200, r.text
        sid = r.headers.get("mcp-session-id")
        hdrs = {**base, "MCP-Protocol-Version": "2025-11-25"}
        if sid:
            hdrs["Mcp-Session-Id"] = sid
        client.post(url, headers=hdrs, content=json.dumps(init_messages(1)[1]))

        def record(label: str, resp: httpx.Response | None, status: int, data: bytes | None) -> None:
            figures["cases"] += 1
            figures["status"][str(status)] = figures["status"].get(str(status), 0) + 1
            if status >= 500 or status == 0:
                failures.append(f"{label}: status {status} for {(data or b'')[:80]!r}")
            if resp is not None:
                why = _check_http_body(resp)
                if why:
                    failures.append(f"{label}: {why}")
            if figures["cases"] % BATCH == 0:
                tools_list_ok()

        def tools_list_ok() -> None:
            figures["tools_list_checks"] += 1
            resp = client.post(url, headers=hdrs, content=_req("list", "tools/list"))
            names = set()
            for line in resp.text.splitlines():
                if line.startswith("data:") and line[5:].strip():
                    names |= {t["name"] for t in json.loads(line[5:]).get("result", {}).get("tools", [])}
            if resp.status_code != 200 or "test_image" not in names:
                failures.append(f"tools/list failed after case {figures['cases']}: {resp.status_code} {resp.text[:200]}")

        def one(label: str, data: bytes, headers: dict | None = None) -> None:
            rid = well_formed_id(data)
            t0 = time.monotonic()
            try:
                resp = client.post(url, headers=headers or hdrs, content=data)
            except httpx.HTTPError as exc:
                failures.append(f"{label}: transport error {exc!r} for {data[:80]!r}")
                figures["cases"] += 1
                return
            latencies.append(time.monotonic() - t0)
            if rid is not None and resp.status_code == 200:
                figures["well_formed"] += 1
                if rid in _answer_ids(resp):
                    figures["answered_well_formed"] += 1
                else:
                    failures.append(f"{label}: well-formed request id={rid!r} got no answer ({resp.text[:120]})")
            record(label, resp, resp.status_code, data)

        for label, data in fixed_corpus():
            one(label, data)
            assert proc.poll() is None, f"server died on {label}: {data[:100]!r}"

        # HTTP-level malformations
        ping = _req(70, "ping")
        for label, headers in [
            ("no-content-type", {k: v for k, v in hdrs.items() if k != "Content-Type"}),
            ("text-content-type", {**hdrs, "Content-Type": "text/plain"}),
            ("no-accept", {k: v for k, v in hdrs.items() if k != "Accept"}),
            ("accept-html", {**hdrs, "Accept": "text/html"}),
            ("bad-session", {**hdrs, "Mcp-Session-Id": "not-a-session"}),
            ("no-session", {k: v for k, v in hdrs.items() if k != "Mcp-Session-Id"}),
            ("bad-protocol-version", {**hdrs, "MCP-Protocol-Version": "1999-01-01"}),
            ("huge-header", {**hdrs, "X-Junk": "a" * 60000}),
            ("charset-latin1", {**hdrs, "Content-Type": "application/json; charset=latin-1"}),
        ]:
            one(f"http-{label}", ping, headers)
        for method in ["GET", "PUT", "PATCH", "OPTIONS", "HEAD", "DELETE"]:
            h = {k: v for k, v in hdrs.items() if k != "Mcp-Session-Id"} if method == "DELETE" else hdrs
            t0 = time.monotonic()
            resp = client.request(method, url, headers={**h, "Accept": "text/event-stream"} if method == "GET" else h,
                                  timeout=5) if method != "GET" else None
            if method == "GET":  # a GET opens the server->client stream: read the status line only
                with client.stream("GET", url, headers={**hdrs, "Accept": "text/event-stream"}, timeout=5) as s:
                    resp = s
                    status = s.status_code
                record(f"http-{method}", None, status, None)
            else:
                record(f"http-{method}", resp, resp.status_code, None)
            latencies.append(time.monotonic() - t0)
        for path in ["/", "/mcp/../mcp", "/mcp%00", "/" + "a" * 5000, "/sse", "/messages/"]:
            resp = client.post(f"http://127.0.0.1:{port}{path}", headers=hdrs, content=ping)
            record(f"http-path {path[:20]}", resp, resp.status_code, ping)
        # bodies over the limit (32 MiB): a real one, and lying / broken Content-Length headers
        resp = client.post(url, headers=hdrs, content=b"[" * (33 * 1024 * 1024))
        record("over-limit", resp, resp.status_code, b"33 MiB")
        assert resp.status_code == 413
        head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json, text/event-stream\r\n").encode()
        for label, extra, body in [
            ("claims-1TB", b"Content-Length: 1099511627776\r\n\r\n", b"{}"),
            ("claims-negative", b"Content-Length: -5\r\n\r\n", b"{}"),
            ("claims-text", b"Content-Length: lots\r\n\r\n", b"{}"),
            ("chunked-garbage", b"Transfer-Encoding: chunked\r\n\r\n", b"zz\r\nxx\r\n"),
        ]:
            status = _raw_http(port, head + extra, body)
            figures["cases"] += 1
            figures["status"][str(status)] = figures["status"].get(str(status), 0) + 1
            if status >= 500 or status == 0 and label not in ("claims-negative",):
                failures.append(f"{label}: status {status}")
            if label == "claims-1TB":
                assert status == 413, (label, status)

        @settings(max_examples=HYPOTHESIS_CASES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(hypothesis_case())
        def gen(data: bytes) -> None:
            one("hypothesis", data)
            assert proc.poll() is None, f"server died on {data[:100]!r}"

        gen()
        tools_list_ok()
        assert proc.poll() is None, "server died"
        figures["failures"] = len(failures)
        figures["max_latency_ms"] = round(max(latencies) * 1000, 1)
        figures["median_latency_ms"] = round(statistics.median(latencies) * 1000, 2)
        print(f"\n[rel-protocol http] {json.dumps(figures)}")
        assert not failures, "\n".join(failures[:20])
        assert figures["cases"] >= 300
        assert not any(int(s) >= 500 for s in figures["status"])
    finally:
        stop(proc)
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        heads = [ln for ln in err.splitlines() if '"exc"' in ln or "Traceback" in ln]
        print(f"[rel-protocol http] server log lines with a traceback: {len(heads)}")
        for ln in heads[:10]:
            print("   ", ln[:300], "...", ln[-700:])


def test_http_chunked_body_over_limit_is_413(tmp_path):
    """Regression: a chunked body (no Content-Length) over http.max_body_bytes must be a 413, not a 500.

    GuardMiddleware's limited_receive raises _BodyTooLarge inside the Starlette app, whose
    ServerErrorMiddleware turns it into a 500 before GuardMiddleware can answer 413."""
    import subprocess

    port = free_port()
    proc = Popen(server_cmd("http", port), env=server_env(tmp_path), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_port(port, proc)
        head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        body = b"".join(b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20)) for _ in range(34)) + b"0\r\n\r\n"
        status = _raw_http(port, head, body)
        print(f"\n[rel-protocol http] chunked 34 MiB body -> status {status}")
        assert status == 413
        assert proc.poll() is None
    finally:
        stop(proc)
