#!/usr/bin/python3
"""The HTTP API's streaming against the gRPC API's, on one cluster (`dsmoe cluster up`, TLS and an
API key as deployed), with Python clients on both sides (grpcio; a raw TLS socket reading
Server-Sent Events, no HTTP library in between).

--mode compare (default): --streams N concurrent streams of --tokens M tokens each (token-id
prompt, ignore_eos, greedy), first through gRPC Generate, then through POST /v1/completions with
stream: true, alternating for --rounds rounds. Prints per protocol the time per token of a
stream (its duration / its tokens), the inter-arrival time of the messages (gRPC) and the events
(SSE) carrying tokens, p50 and p99, time to first token, and the HTTP/gRPC ratios (target:
per-token cost <= 1.1x gRPC's). Each HTTP stream opens its own TLS connection (as a client
without keep-alive does; gRPC reuses its channel), which its first token pays for; SSE events
read by one recv() share its arrival time.

--mode chat-load: --streams (default 512) concurrent streaming chat completions
(/v1/chat/completions, the deepseek-moe chat template) against one gateway, each of --tokens
tokens, bounded by --timeout seconds. Prints errors (expected: 0), streams completed, and the
gateway's resident memory and thread count (/proc/PID/status) before, at the peak during the
load, and after, and how many streams were open at once. --check makes a non-zero exit status
of any error or unfinished stream (and, with --max-threads N, of a gateway above N threads):
the ctest load.http_chat_512.

Usage: http_stream_bench.py --dsmoe build/bin/dsmoe --stubs build/proto/python
                            [--mode compare|chat-load] [--streams N] [--tokens M] [--preset tiny]
"""
import argparse
import json
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "cluster"))
import cluster_util as cu  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(HERE, "..", "tests", "fuzz", "tokenizers", "deepseek.json")
PROMPT_IDS = [1, 5, 9, 17, 33, 65, 100]


def proc_status(pid):
    """(VmRSS in MiB, Threads) of a process."""
    rss, threads = float("nan"), 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


class Sse:
    """One POST with a streamed answer over a raw TLS socket: the status, then each SSE event's
    data with its arrival time (time.perf_counter)."""

    def __init__(self, host, port, ca, key, timeout):
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.ctx = ssl.create_default_context(cafile=ca)

    def post(self, path, body, on_open=None, before_send=None):
        """on_open(): called once the answer's headers said 200 (the stream is open);
        before_send(): called once the TLS connection is up, before the request goes."""
        data = json.dumps(body).encode()
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock = self.ctx.wrap_socket(raw, server_hostname="localhost")
        try:
            if before_send:
                before_send()
            head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {self.key}\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n")
            sock.sendall(head.encode() + data)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the connection closed before the headers")
                buf += chunk
            header, buf = buf.split(b"\r\n\r\n", 1)
            status = int(header.split(b" ", 2)[1])
            chunked = b"transfer-encoding: chunked" in header.lower()
            if status != 200:
                return status, [(time.perf_counter(), header + b"\r\n\r\n" + buf)]
            if on_open:
                on_open()
            events = []
            body_bytes = b""  # the de-chunked stream
            done = False
            while not done:
                # De-chunk what has arrived (HTTP/1.1 chunked transfer coding), then cut events.
                if chunked:
                    while True:
                        eol = buf.find(b"\r\n")
                        if eol < 0:
                            break
                        size = int(buf[:eol].split(b";")[0], 16)
                        if len(buf) < eol + 2 + size + 2:
                            break
                        body_bytes += buf[eol + 2:eol + 2 + size]
                        buf = buf[eol + 2 + size + 2:]
                        if size == 0:
                            done = True
                            break
                else:
                    body_bytes, buf = body_bytes + buf, b""
                now = time.perf_counter()
                while b"\n\n" in body_bytes:
                    event, body_bytes = body_bytes.split(b"\n\n", 1)
                    if event.startswith(b"data: "):
                        payload = event[6:]
                        events.append((now, payload))
                        if payload == b"[DONE]":
                            done = True
                if done:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return status, events
        finally:
            sock.close()


def grpc_stream(c, tokens):
    """(arrival times of the messages with tokens, tokens, start) of one Generate stream."""
    req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=PROMPT_IDS), max_tokens=tokens,
                                temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    arrivals, n = [], 0
    for m in c.gateway.Generate(req, timeout=600):
        if m.token_ids:
            arrivals.append(time.perf_counter())
            n += len(m.token_ids)
    return arrivals, n, start


def http_stream(sse, model_name, tokens):
    body = {"model": model_name, "prompt": PROMPT_IDS, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    status, events = sse.post("/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {events[0][1][:300]!r}")
    arrivals, n = [], 0
    for t, payload in events:
        if payload == b"[DONE]":
            continue
        chunk = json.loads(payload)
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
        if any(ch.get("text") for ch in chunk.get("choices", [])):
            arrivals.append(t)
    return arrivals, n, start


class Figures:
    def __init__(self):
        self.per_token, self.gaps, self.ttft, self.tokens, self.errors = [], [], [], 0, []

    def add(self, arrivals, n, start):
        end = arrivals[-1] if arrivals else time.perf_counter()
        if n:
            self.per_token.append((end - start) / n)
        self.gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
        if arrivals:
            self.ttft.append(arrivals[0] - start)
        self.tokens += n


def run_concurrently(n, fn):
    """Runs fn(i) on n threads at once; returns the wall time and the exceptions raised."""
    errors, lock = [], threading.Lock()

    def body(i):
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001: a bench counts every failure
            with lock:
                errors.append(repr(e)[:300])

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, errors


def compare(a, c, model):
    host, port = c.state["http_address"].rsplit(":", 1)
    sse = Sse(host, int(port), c.security["ca"], c.api_key, timeout=600)
    name = os.path.basename(model)
    # Warm up both paths (first touches, TLS session set-up on the gRPC channel).
    grpc_stream(c, 4)
    http_stream(sse, name, 4)
    figs = {"grpc": Figures(), "http": Figures()}
    walls = {"grpc": 0.0, "http": 0.0}
    lock = threading.Lock()
    for _ in range(a.rounds):
        for proto in ("grpc", "http"):
            def one(_, proto=proto):
                r = grpc_stream(c, a.tokens) if proto == "grpc" else http_stream(sse, name, a.tokens)
                with lock:
                    figs[proto].add(*r)

            wall, errors = run_concurrently(a.streams, one)
            walls[proto] += wall
            figs[proto].errors += errors
    ms = 1e3
    print(f"{a.streams} streams x {a.tokens} tokens x {a.rounds} rounds, preset {a.preset}, "
          f"Python clients; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'':26}{'gRPC Generate':>16}{'HTTP SSE':>16}{'HTTP/gRPC':>12}")
    rows = [
        ("per token p50 (ms)", lambda f: statistics.median(f.per_token) * ms),
        ("inter-arrival p50 (ms)", lambda f: percentile(f.gaps, 50) * ms),
        ("inter-arrival p99 (ms)", lambda f: percentile(f.gaps, 99) * ms),
        ("first token p50 (ms)", lambda f: percentile(f.ttft, 50) * ms),
    ]
    out = {}
    for label, fn in rows:
        g, h = fn(figs["grpc"]), fn(figs["http"])
        out[label] = {"grpc": g, "http": h}
        print(f"{label:26}{g:16.3f}{h:16.3f}{h / g:11.2f}x")
    g_tps = figs["grpc"].tokens / walls["grpc"]
    h_tps = figs["http"].tokens / walls["http"]
    print(f"{'total time (s)':26}{walls['grpc']:16.2f}{walls['http']:16.2f}{walls['http'] / walls['grpc']:11.2f}x")
    print(f"{'tokens/s':26}{g_tps:16.1f}{h_tps:16.1f}{h_tps / g_tps:11.2f}x")
    print(f"{'events per token':26}{len(figs['grpc'].gaps) / max(1, figs['grpc'].tokens):16.2f}"
          f"{len(figs['http'].gaps) / max(1, figs['http'].tokens):16.2f}")
    print(f"errors: gRPC {len(figs['grpc'].errors)}, HTTP {len(figs['http'].errors)}")
    for e in (figs["grpc"].errors + figs["http"].errors)[:5]:
        print("  ", e)
    return out, len(figs["grpc"].errors) + len(figs["http"].errors)


def chat_load(a, c, model):
    host, port = c.state["http_address"].rsplit(":", 1)
    sse = Sse(host, int(port), c.security["ca"], c.api_key, timeout=a.timeout)
    name = os.path.basename(model)
    gateway = c.processes("gateway")[0]["pid"]
    body = {"model": name, "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Tell me about experts."}],
            "max_tokens": a.tokens, "temperature": 0.7, "seed": 1, "ignore_eos": True, "stream": True}
    status, _ = sse.post("/v1/chat/completions", dict(body, max_tokens=2))  # warm-up
    if status != 200:
        raise RuntimeError(f"warm-up chat completion: HTTP {status}")
    time.sleep(0.5)
    before = proc_status(gateway)
    peak = list(before)
    stop = threading.Event()

    def sample():
        while not stop.wait(0.1):
            rss, th = proc_status(gateway)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], th)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    done, lock = [0], threading.Lock()
    open_now, open_peak = [0], [0]  # streams whose headers came and whose end did not yet
    # Every client connects (TLS) first and all send at once: 512 requests really in flight.
    barrier = threading.Barrier(a.streams, timeout=a.timeout)

    def opened():
        with lock:
            open_now[0] += 1
            open_peak[0] = max(open_peak[0], open_now[0])

    def one(_):
        was_open = []
        try:
            status, events = sse.post("/v1/chat/completions", body,
                                      on_open=lambda: (opened(), was_open.append(1)),
                                      before_send=barrier.wait)
        finally:
            with lock:
                open_now[0] -= len(was_open)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {events[0][1][:200]!r}")
        if not events or events[-1][1] != b"[DONE]":
            raise RuntimeError("the stream ended without [DONE]")
        last = json.loads(events[-2][1])
        if last["choices"][0]["finish_reason"] != "length":
            raise RuntimeError(f"finish_reason {last['choices'][0]['finish_reason']}")
        for _, payload in events[:-1]:
            if b'"error"' in payload:
                raise RuntimeError(f"error event: {payload[:200]!r}")
        with lock:
            done[0] += 1

    wall, errors = run_concurrently(a.streams, one)
    stop.set()
    sampler.join()
    time.sleep(1.0)  # the streams' state freed
    after = proc_status(gateway)
    print(f"{a.streams} concurrent streaming chat completions x {a.tokens} tokens, preset {a.preset}, "
          f"{wall:.1f} s; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"completed {done[0]}, errors {len(errors)}, all {a.streams} sent at once, "
          f"streams open (answering) at once at most {open_peak[0]}")
    for e in errors[:5]:
        print("  ", e)
    print(f"{'gateway':10}{'before':>10}{'peak':>10}{'after':>10}")
    print(f"{'RSS (MiB)':10}{before[0]:10.1f}{peak[0]:10.1f}{after[0]:10.1f}")
    print(f"{'threads':10}{before[1]:10d}{peak[1]:10d}{after[1]:10d}")
    problems = len(errors) + (done[0] != a.streams)
    if a.max_threads and peak[1] > a.max_threads:
        print(f"the gateway reached {peak[1]} threads (--max-threads {a.max_threads})")
        problems += 1
    return {"seconds": wall, "completed": done[0], "errors": len(errors), "open_peak": open_peak[0],
            "rss_mib": [before[0], peak[0], after[0]], "threads": [before[1], peak[1], after[1]]}, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--mode", choices=["compare", "chat-load"], default="compare")
    ap.add_argument("--streams", type=int, help="concurrent streams (compare: 8, chat-load: 512)")
    ap.add_argument("--tokens", type=int, help="tokens per stream (compare: 128, chat-load: 32)")
    ap.add_argument("--rounds", type=int, default=3, help="compare: rounds of each protocol")
    ap.add_argument("--preset", default="tiny", help="model preset (dsmoe make-model)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json of the model")
    ap.add_argument("--num-slots", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300, help="chat-load: seconds per stream at most")
    ap.add_argument("--check", action="store_true", help="exit non-zero on any error")
    ap.add_argument("--max-threads", type=int, help="chat-load: a problem if the gateway has more threads")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    if a.streams is None:
        a.streams = 8 if a.mode == "compare" else 512
    if a.tokens is None:
        a.tokens = 128 if a.mode == "compare" else 32
    cu.setup(a.dsmoe, a.stubs)
    tmp = tempfile.TemporaryDirectory(prefix="dsmoe-http-bench-")
    model = cu.make_model(tmp.name, a.preset, a.preset, "--tokenizer", a.tokenizer, "--chat-template",
                          "deepseek-moe")
    c = cu.Cluster(model, extra=["--num-slots", str(a.num_slots)])
    try:
        figures, errors = compare(a, c, model) if a.mode == "compare" else chat_load(a, c, model)
    finally:
        c.close()
        tmp.cleanup()
    if a.json:
        json.dump(figures, open(a.json, "w"), indent=1)
    return 1 if a.check and errors else 0


if __name__ == "__main__":
    sys.exit(main())
