#!/usr/bin/python3
"""Expert placement under a skewed router: static vs planned vs live automatic rebalancing.

    bench/bench_rebalance.py --dsmoe build/bin/dsmoe --stubs build/proto/python
                             [--streams 16] [--tokens 48] [--rounds 3] [--bias 3] [--model DIR]

A small-preset checkpoint (BF16) whose router favours experts 0, 4 and 8 of every MoE layer
(make-model --router-bias-experts 0,4,8 --router-bias B): under round-robin placement over 4
expert servers they all land on one server per layer. For each setup the same rounds of N
concurrent greedy streams run through the gateway, and it prints decode tokens/s and the
per-expert-server imbalance (max / mean over servers of the assignments each expert server
reports computing, per MoE layer; mean over layers and worst layer):
  static   round-robin placement, never changed;
  planned  the same cluster after `dsmoe placement apply` (plan from the measured window);
  live     a fresh cluster with automatic rebalancing (--rebalance-period), measured over the
           whole run, the rebalance included, and after it;
plus the rebalance's duration and the worst inter-token gap while `placement apply` ran
against the p99 of the gaps outside it.

Every process shares this machine's cores, so per-server balance only turns into throughput
where the expert servers would otherwise wait on each other (see the note it prints).
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "cluster"))
import cluster_util as cu  # noqa: E402
import load_util as lu  # noqa: E402

SERVERS = 4


def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(2, 8000) for _ in range(rng.randrange(8, 24))] for _ in range(n)]


def measure(cluster, args, seed, label):
    """Runs args.rounds rounds; returns (tokens/s, mean imbalance, worst imbalance, outputs,
    critical path)."""
    rates, outputs = [], []
    before = lu.server_layer_loads(cluster)
    for r in range(args.rounds):
        streams, threads = lu.run_streams(cluster, prompts(args.streams, seed + r), args.tokens)
        lu.wait(threads)
        errors = [s.error for s in streams if s.error]
        if errors:
            raise SystemExit(f"{label}: {len(errors)} requests failed: {errors[:3]}")
        rates.append(lu.decode_rate(streams))
        outputs.append([s.ids for s in streams])
    after = lu.server_layer_loads(cluster)
    mean_imb, worst_imb = lu.imbalance(before, after, SERVERS)
    return statistics.mean(rates), mean_imb, worst_imb, outputs, lu.critical_path(before, after, SERVERS)


def placement(cluster, action, *flags):
    return json.loads(cu.run("placement", action, "--state-dir", cluster.state_dir, "--json", *flags).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--model", help="a skewed checkpoint (default: written under /tmp/dsmoe-bench)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bias", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=0, help="per server (default: all cores)")
    a = ap.parse_args()
    cu.setup(a.dsmoe, a.stubs)
    model = a.model
    if not model:
        os.makedirs("/tmp/dsmoe-bench", exist_ok=True)
        model = cu.make_model("/tmp/dsmoe-bench", f"small-bf16-skew{a.bias:g}", "small", "--dtype", "bf16",
                              "--router-bias-experts", "0,4,8", "--router-bias", str(a.bias))
    extra = ("--threads", str(a.threads)) if a.threads else ()
    print(f"model {model}; {SERVERS} expert servers, 1 attention server; {a.streams} streams × "
          f"{a.tokens} tokens × {a.rounds} rounds per setup", flush=True)

    # static, then planned on the same cluster
    c = cu.Cluster(model, attention=1, experts=SERVERS, extra=("--load-window-seconds", "600", *extra))
    try:
        lu.wait(lu.run_streams(c, prompts(a.streams, 99), 8)[1])  # warm-up
        static = measure(c, a, 1, "static")
        show = placement(c, "show")[0]
        print(f"measured load: worst layer per-server imbalance predicted "
              f"{max(l['imbalance'] for l in show['layers']):.3f} under round-robin", flush=True)
        # The switch under load: streams run while `placement apply` does its work.
        streams, threads = lu.run_streams(c, prompts(a.streams, 50), a.tokens * 2)
        while min(len(s.ids) for s in streams) < a.tokens // 2:
            time.sleep(0.005)
        r, t0, t1 = lu.apply_placement(c)
        applied = {"duration_seconds": r.duration_seconds, "load_seconds": r.load_seconds,
                   "switch_seconds": r.switch_seconds, "experts_loaded": r.experts_loaded,
                   "experts_dropped": r.experts_dropped}
        lu.wait(threads)
        if any(s.error for s in streams):
            raise SystemExit(f"requests failed during the rebalance: {[s.error for s in streams if s.error][:3]}")
        worst_gap, p99, n_in, _ = lu.gap_report(streams, t0, t1)
        planned = measure(c, a, 1, "planned")
    finally:
        c.close()
    same = planned[3] == static[3]

    # live automatic
    c = cu.Cluster(model, attention=1, experts=SERVERS,
                   extra=("--rebalance-period", "2", "--rebalance-threshold", "1.15",
                          "--load-window-seconds", "10", *extra))
    try:
        lu.wait(lu.run_streams(c, prompts(a.streams, 99), 8)[1])
        url = c.processes("attention-server")[0]["metrics_url"]
        live_rounds = []
        start = time.monotonic()
        version = 1
        # Rounds until the automatic rebalance has happened, then a.rounds more, measured.
        while version < 2 and time.monotonic() - start < 300:
            live_rounds.append(measure(c, argparse.Namespace(**{**vars(a), "rounds": 1}), 1, "live"))
            show = placement(c, "show")[0]
            version = int(show["version"])
        first_switch = time.monotonic() - start
        live_after = measure(c, a, 1, "live")
        status = placement(c, "show")[0]["status"]
    finally:
        c.close()

    rate_live_all = statistics.mean([r[0] for r in live_rounds] + [live_after[0]] * a.rounds)
    print()
    print(f"{'setup':<34} {'decode tok/s':>12} {'imbalance mean':>15} {'worst layer':>12}")
    print(f"{'static (round-robin)':<34} {static[0]:>12.1f} {static[1]:>15.3f} {static[2]:>12.3f}")
    print(f"{'planned (placement apply)':<34} {planned[0]:>12.1f} {planned[1]:>15.3f} {planned[2]:>12.3f}")
    print(f"{'live automatic, after rebalance':<34} {live_after[0]:>12.1f} {live_after[1]:>15.3f} {live_after[2]:>12.3f}")
    print(f"{'live automatic, whole run':<34} {rate_live_all:>12.1f}")
    print()
    print(f"throughput planned / static:   {planned[0] / static[0]:.3f}")
    print(f"throughput live / static:      {live_after[0] / static[0]:.3f} (after), "
          f"{rate_live_all / static[0]:.3f} (whole run)")
    print(f"imbalance static -> planned -> live: {static[1]:.3f} -> {planned[1]:.3f} -> {live_after[1]:.3f} "
          f"(target <= 1.15)")
    print(f"outputs identical static vs planned: {same}")
    print(f"expert critical path per step (sum over layers of the busiest server / even share): static "
          f"{static[4]:.3f}, planned {planned[4]:.3f}, live {live_after[4]:.3f}: with a core set per expert "
          f"server the expert phase would speed up {static[4] / planned[4]:.2f}x (planned), "
          f"{static[4] / live_after[4]:.2f}x (live)")
    print(f"rebalance (placement apply): {applied['duration_seconds']:.3f} s (load {applied['load_seconds']:.3f} s, "
          f"switch {applied['switch_seconds'] * 1e3:.2f} ms; {applied['experts_loaded']} experts loaded, "
          f"{applied['experts_dropped']} dropped)")
    print(f"worst inter-token gap during it: {worst_gap * 1e3:.1f} ms ({n_in} gaps) vs p99 outside "
          f"{p99 * 1e3:.1f} ms: {worst_gap / p99:.2f}x (target <= 2)")
    print(f"automatic mode: first rebalance {first_switch:.1f} s into the run, last took "
          f"{status['last_duration_seconds']:.3f} s; {status['succeeded']} succeeded, {status['failed']} failed")
    print(f"\nnote: {os.cpu_count()} cores shared by every server; an overloaded expert server slows a "
          "step only while the others wait for it, which cores that are busy anyway barely allow.")


if __name__ == "__main__":
    main()
