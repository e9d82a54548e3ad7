"""Load for the rebalancing test and benchmark: concurrent streams through the gateway with the
arrival time of every message, inter-token gaps, and the per-expert-server load each expert
server reports in its own metrics (what it actually computed, per MoE layer)."""
import collections
import re
import statistics
import threading
import time
import urllib.request

import cluster_util as cu

_SAMPLE = re.compile(r'^dsmoe_expert_server_tokens_total\{([^}]*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class Stream:
    def __init__(self, prompt, max_tokens):
        self.prompt, self.max_tokens = prompt, max_tokens
        self.ids, self.times, self.error, self.finish = [], [], None, None
        # With margins=True: per token, the log-probability gap between the two likeliest tokens.
        self.margins = []


def run_streams(cluster, prompts, max_tokens, timeout=300, margins=False):
    """One greedy request per prompt, all at once; returns the Streams when all are done."""
    streams = [Stream(p, max_tokens) for p in prompts]

    def one(s):
        try:
            req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=s.prompt), max_tokens=s.max_tokens,
                                        temperature=0.0, ignore_eos=True, logprobs=margins,
                                        top_logprobs=2 if margins else 0)
            for m in cluster.gateway.Generate(req, timeout=timeout):
                now = time.monotonic()
                if m.token_ids:
                    s.ids.extend(m.token_ids)
                    s.times.append(now)
                    s.margins.extend(lp.top_logprobs[0].logprob - lp.top_logprobs[1].logprob
                                     for lp in m.logprobs)
                if m.finish_reason:
                    s.finish = cu.pb.FinishReason.Name(m.finish_reason)
        except cu.grpc.RpcError as e:
            s.error = f"{e.code().name}: {e.details()}"

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return streams, threads


# Two greedy runs of the same requests batch them differently, and batching changes logits
# only by fp32 rounding (~1e-6 relative). Where the two likeliest tokens are closer than this, in
# log-probability, rounding may pick either: the runs may then part ways, and not before.
NEAR_TIE = 1e-3


def first_difference_at_a_near_tie(got, want):
    """None when the two Streams' tokens are equal. Otherwise the first index where they
    differ, if both runs saw a near tie there (greedy choice decided by rounding); raises
    AssertionError naming the index and the margins if not."""
    if got.ids == want.ids:
        return None
    j = next((i for i, (a, b) in enumerate(zip(got.ids, want.ids)) if a != b), min(len(got.ids), len(want.ids)))
    if j < len(got.margins) and j < len(want.margins) and max(got.margins[j], want.margins[j]) < NEAR_TIE:
        return j
    raise AssertionError(f"token {j} differs ({got.ids[j:j + 1]} vs {want.ids[j:j + 1]}) with margins "
                         f"{got.margins[j:j + 1]} / {want.margins[j:j + 1]} (a near tie is < {NEAR_TIE})")


def wait(threads):
    for t in threads:
        t.join()


def gaps(streams):
    """(start, end) of every gap between two consecutive token messages of a stream."""
    out = []
    for s in streams:
        out.extend(zip(s.times, s.times[1:]))
    return out


def gap_report(streams, switch_start, switch_end):
    """Worst gap that overlaps [switch_start, switch_end] and the p99 of the gaps that do not."""
    inside, outside = [], []
    for a, b in gaps(streams):
        (inside if a <= switch_end and b >= switch_start else outside).append(b - a)
    p99 = statistics.quantiles(outside, n=100)[98] if len(outside) >= 2 else float("nan")
    return (max(inside) if inside else 0.0), p99, len(inside), len(outside)


def decode_rate(streams):
    """Tokens per second from the first token of any stream to the last of any."""
    first = min(s.times[0] for s in streams if s.times)
    last = max(s.times[-1] for s in streams if s.times)
    tokens = sum(len(s.ids) - 1 for s in streams if s.ids)  # the first token is the prefill's
    return tokens / max(last - first, 1e-9)


def server_layer_loads(cluster):
    """{(server, layer): assignments computed so far} from every expert server's metrics."""
    out = collections.Counter()
    for p in cluster.processes("expert-server"):
        with urllib.request.urlopen(p["metrics_url"], timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                labels = dict(_LABEL.findall(m.group(1)))
                out[(p["index"], int(labels["layer"]))] += float(m.group(2))
    return out


def imbalance(before, after, num_servers):
    """Per-server imbalance (max / mean over servers) of what was computed between two
    server_layer_loads: (mean over layers, worst layer)."""
    diff = collections.defaultdict(lambda: [0.0] * num_servers)
    for (s, l), v in after.items():
        diff[l][s] += v - before.get((s, l), 0.0)
    per_layer = [max(v) / (sum(v) / num_servers) for v in diff.values() if sum(v) > 0]
    return statistics.mean(per_layer), max(per_layer)


def critical_path(before, after, num_servers):
    """Σ over MoE layers of the busiest server's assignments / Σ of all assignments × servers:
    the expert work a step waits for when each server computes on cores of its own, relative to
    a perfect balance (1 = perfectly even; static placement under skew is above)."""
    diff = collections.defaultdict(lambda: [0.0] * num_servers)
    for (s, l), v in after.items():
        diff[l][s] += v - before.get((s, l), 0.0)
    worst = sum(max(v) for v in diff.values())
    total = sum(sum(v) for v in diff.values())
    return worst * num_servers / total if total else 0.0


def apply_placement(cluster, timeout=300):
    """PlacementService.ApplyPlacement (plan from the window) on the first attention server,
    timed here: (response, monotonic start, monotonic end)."""
    from dsmoe.internal.v1 import placement_pb2, placement_pb2_grpc
    stub = placement_pb2_grpc.PlacementServiceStub(
        cluster.channel_to(cluster.processes("attention-server")[0]["address"]))
    stub.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=30)  # connected before timing
    start = time.monotonic()
    r = stub.ApplyPlacement(placement_pb2.ApplyPlacementRequest(), timeout=timeout)
    return r, start, time.monotonic()
