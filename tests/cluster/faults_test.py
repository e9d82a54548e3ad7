#!/usr/bin/python3
"""Fault injection with real processes (`dsmoe cluster up`, kill -9, SIGSTOP/SIGCONT, restarts on
the same port) and real gRPC over 127.0.0.1. Every test predicts which requests finish
correctly — token for token what the single-process engine generates — and which fail with
which gRPC code, and checks exactly that. Health checks run every 200 ms here.

Usage: faults_test.py --dsmoe PATH --stubs DIR [unittest args]
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

FAST_HEALTH = ("--health-check-period-ms", "200", "--health-check-timeout-ms", "500")
C = grpc.StatusCode


def prompts(n, seed, lo=3, hi=10, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


class FaultTest(unittest.TestCase):
    model = None

    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny-faults", "tiny")

    def clean(self, ids, n):
        return cu.single_process_generate(self.model, ids, n)["ids"]

    def assert_identical(self, stream, want, label):
        self.assertEqual(stream.code, C.OK, f"{label}: {stream.code} {stream.details}")
        self.assertEqual(stream.tokens, want, label)

    def assert_failed_mid_stream(self, stream, want, label, code=C.UNAVAILABLE):
        """Failed with `code` after delivering a correct prefix, and said how many tokens."""
        self.assertEqual(stream.code, code, f"{label}: {stream.details}")
        self.assertGreater(len(stream.tokens), 0, label)
        self.assertEqual(stream.tokens, want[:len(stream.tokens)], f"{label}: the tokens sent must be right")
        m = re.search(r"after (\d+) tokens were delivered", stream.details)
        self.assertIsNotNone(m, f"{label}: {stream.details}")
        self.assertEqual(int(m.group(1)), len(stream.tokens), f"{label}: {stream.details}")


class ExpertServerFaults(FaultTest):
    """Expert servers killed, frozen and restarted while streams run; the attention server's
    health checks and readiness follow."""

    def test_kill_mid_stream_with_replicas_changes_nothing(self):
        cases = prompts(6, seed=21)
        want = [self.clean(p, 300) for p in cases]
        c = cu.Cluster(self.model, experts=2, replicas=2, extra=FAST_HEALTH)
        try:
            attention = c.processes("attention-server")[0]
            streams = [cu.Stream(c.gateway, p, 300) for p in cases]
            for s in streams:
                self.assertTrue(s.first.wait(30))
            os.kill(c.processes("expert-server")[0]["pid"], signal.SIGKILL)
            for i, (s, w) in enumerate(zip(streams, want)):
                self.assert_identical(s.wait(), w, f"stream {i}")
            # The replicas cover every expert: the attention server stays ready, and says why
            # its first expert server is out.
            self.assertEqual(c.health(attention["address"]), "SERVING")
            cu.wait_for(lambda: "expert server 0 at" in cu.read(attention["log"], "r"), 5, "the log line")
            self.assertRegex(cu.read(attention["log"], "r"), r"expert server 0 at \S+ is down")
            self.assert_identical(cu.Stream(c.gateway, cases[0], 300).wait(), want[0], "after the kill")
        finally:
            c.close()

    def one_expert_placement(self, layer, expert):
        """Two expert servers: server 1 holds only routed expert (layer, expert), server 0 the rest."""
        with open(os.path.join(self.model, "config.json")) as f:
            cfg = json.load(f)
        layers = [dict(layer=l, servers=[[1] if (l, e) == (layer, expert) else [0]
                                         for e in range(cfg["n_routed_experts"])])
                  for l in range(cfg["num_hidden_layers"]) if l >= cfg["first_k_dense_replace"]]
        path = os.path.join(cu.TMP, f"placement-{layer}-{expert}.json")
        with open(path, "w") as f:
            json.dump(dict(num_servers=2, layers=layers), f)
        return path

    # The cluster batches tokens differently from the single process, so its gate logits differ
    # by rounding (~1e-6 measured); a choice closer than this to the top-k boundary could flip.
    CLEAR = 2e-5

    def routing(self, ids):
        """Per MoE layer, per position of `ids`, the set of routed experts the single process
        picks; None if some choice, at any layer, is not clear (within CLEAR of the boundary
        between the k-th and (k+1)-th largest gate logits: softmax keeps their order)."""
        out = json.loads(cu.run("route", "--model", self.model, "--ids", ",".join(map(str, ids)), "--json").stdout)
        for l in out["layers"]:
            for p in l["positions"]:
                logits = sorted(p["gate_logits"], reverse=True)
                k = len(p["experts"])
                if logits[k - 1] - logits[k] < self.CLEAR:
                    return None
        return {l["layer"]: [set(p["experts"]) for p in l["positions"]] for l in out["layers"]}

    def clearly_routed(self, cases, max_tokens, least):
        """The cases (prompt, its clean output, routing) whose every routing choice is clear."""
        kept = []
        for p in cases:
            want = self.clean(p, max_tokens)
            r = self.routing(p + want[:-1])
            if r is not None:
                kept.append((p, want, r))
        self.assertGreaterEqual(len(kept), least, "too few candidates route clear of near-ties")
        return kept

    def test_kill_without_replica_fails_only_requests_that_need_its_expert(self):
        # Expert server 1 holds one routed expert E of the last MoE layer, without a replica.
        # A request fails exactly when a position it still has to compute routes to E; every
        # other request — even one batched with a failing one — finishes identical to a clean run.
        # Candidates whose routing has a near-tie anywhere are left out: the cluster could
        # decide one the other way, and then E's use would not be predicted.
        long_cases, long_want, long_routes = zip(*self.clearly_routed(prompts(3, seed=31), 300, 2))
        short_cases, short_want, short_routes = zip(*self.clearly_routed(
            prompts(24, seed=33, lo=3, hi=4), 3, 16))
        layer = max(short_routes[0])
        uses = {e: [any(e in pos for pos in r[layer]) for r in short_routes] for e in range(16)}
        expert = min(range(16), key=lambda e: sum(uses[e]))  # so that both outcomes occur
        self.assertTrue(0 < sum(uses[expert]) < len(short_cases), f"expert use {uses[expert]}")
        placement = self.one_expert_placement(layer, expert)
        c = cu.Cluster(self.model, experts=2, extra=FAST_HEALTH + ("--placement", placement))
        try:
            attention, gateway = c.processes("attention-server")[0], c.processes("gateway")[0]
            self.assertEqual(c.health(attention["address"]), "SERVING")
            dead = c.processes("expert-server")[1]
            argv = cu.command_line(dead["pid"])

            # 1. Killed mid-stream: each long stream fails at the first position after the kill
            #    that needs E, having delivered a correct prefix, and says how far it got.
            streams = [cu.Stream(c.gateway, p, 300) for p in long_cases]
            for s in streams:
                self.assertTrue(s.first.wait(30))
            os.kill(dead["pid"], signal.SIGKILL)
            for i, (s, w) in enumerate(zip(streams, long_want)):
                self.assert_failed_mid_stream(s.wait(), w, f"long request {i}")
                self.assertIn(f"routed experts of layer {layer} [{expert}]", s.details)
                failed_at = len(long_cases[i]) + len(s.tokens) - 1  # the position it was computing
                self.assertIn(expert, long_routes[i][layer][failed_at], f"long request {i}")

            # Readiness follows: the attention server (and so the gateway, whose only attention
            # server it is) is no longer ready, but alive.
            cu.wait_for(lambda: c.health(attention["address"]) == "NOT_SERVING", 5, "attention NOT_SERVING")
            cu.wait_for(lambda: c.health(gateway["address"]) == "NOT_SERVING", 5, "gateway NOT_SERVING")
            self.assertEqual(c.health(attention["address"], "dsmoe.internal.v1.AttentionService"), "SERVING")
            # ... and says why, to an operator: one expert server down, one routed expert with no
            # live copy (metrics), and the reason in the log.
            url = attention["metrics_url"]
            self.assertEqual(cu.metric(url, "dsmoe_servers_out_of_service", role="expert_server", reason="down"), 1)
            self.assertEqual(cu.metric(url, "dsmoe_servers_out_of_service", role="expert_server",
                                       reason="not_serving"), 0)
            self.assertEqual(cu.metric(url, "dsmoe_routed_experts_without_live_copy"), 1)

            # 2. While it is down, 24 concurrent requests: exactly those routed to E fail, at
            #    the first position that needs it; the others are untouched.
            streams = [cu.Stream(c.gateway, p, 3) for p in short_cases]
            for i, (s, w, needs) in enumerate(zip(streams, short_want, uses[expert])):
                s.wait()
                if not needs:
                    self.assert_identical(s, w, f"short request {i} (does not need expert {expert})")
                    continue
                self.assertEqual(s.code, C.UNAVAILABLE, f"short request {i}: {s.details}")
                self.assertIn(f"routed experts of layer {layer} [{expert}]", s.details)
                self.assertEqual(s.tokens, w[:len(s.tokens)])
                first = next(t for t, pos in enumerate(short_routes[i][layer]) if expert in pos)
                self.assertEqual(len(s.tokens), max(0, first - len(short_cases[i]) + 1), f"short request {i}")

            # 3. Back on its port, the server rejoins by itself and everything works again.
            proc = cu.spawn(cu.same_port(argv, dead["address"]), dead["log"])
            try:
                cu.wait_for(lambda: c.health(attention["address"]) == "SERVING", 15, "attention SERVING again")
                cu.wait_for(lambda: c.health(gateway["address"]) == "SERVING", 5, "gateway SERVING again")
                self.assertEqual(cu.metric(url, "dsmoe_servers_out_of_service", role="expert_server", reason="down"), 0)
                self.assertEqual(cu.metric(url, "dsmoe_routed_experts_without_live_copy"), 0)
                streams = [cu.Stream(c.gateway, p, 3) for p in short_cases]
                for i, (s, w) in enumerate(zip(streams, short_want)):
                    self.assert_identical(s.wait(), w, f"short request {i} after the restart")
            finally:
                cu.stop(proc)
        finally:
            c.close()

    def test_frozen_expert_server_is_taken_out_and_rejoins(self):
        cases = prompts(4, seed=44)
        want = [self.clean(p, 200) for p in cases]
        c = cu.Cluster(self.model, experts=2, replicas=1, extra=FAST_HEALTH + ("--dispatch-deadline-ms", "500"))
        pid = c.processes("expert-server")[1]["pid"]
        attention = c.processes("attention-server")[0]
        try:
            streams = [cu.Stream(c.gateway, p, 200) for p in cases]
            for s in streams:
                self.assertTrue(s.first.wait(30))
            os.kill(pid, signal.SIGSTOP)
            start = time.time()
            # Without a replica, every stream in flight needs its experts (each token of the tiny
            # model uses half of them): each ends at the dispatch deadline or, once the health
            # checks took the server out, at once — never hanging to the client's deadline.
            for i, (s, w) in enumerate(zip(streams, want)):
                s.wait(30)
                self.assertIn(s.code, (C.UNAVAILABLE, C.DEADLINE_EXCEEDED), f"stream {i}: {s.details}")
                self.assertEqual(s.tokens, w[:len(s.tokens)])
                self.assertIn("tokens were delivered", s.details)
            self.assertLess(time.time() - start, 5)
            cu.wait_for(lambda: c.health(attention["address"]) == "NOT_SERVING", 5, "attention NOT_SERVING")
            # Taken out: a new request fails at once, without waiting for a deadline.
            start = time.time()
            s = cu.Stream(c.gateway, cases[0], 200).wait()
            self.assertEqual(s.code, C.UNAVAILABLE, s.details)
            self.assertIn("routed expert", s.details)
            self.assertLess(time.time() - start, 0.45)
            os.kill(pid, signal.SIGCONT)
            cu.wait_for(lambda: c.health(attention["address"]) == "SERVING", 5, "attention SERVING again")
            for i, (p, w) in enumerate(zip(cases, want)):
                self.assert_identical(cu.Stream(c.gateway, p, 200).wait(), w, f"request {i} after SIGCONT")
        finally:
            os.kill(pid, signal.SIGCONT)
            c.close()

    def test_attention_server_is_ready_only_once_its_expert_server_is(self):
        # Started before its expert server (as Kubernetes may): it serves gRPC at once but is not
        # ready, writes no ready file, and becomes ready by itself when the expert server starts.
        # (Plain text: these two are started by hand, without the cluster's certificates.)
        port = cu.free_port()
        bin_dir = os.path.dirname(cu.DSMOE)
        d = tempfile.mkdtemp(dir=cu.TMP)
        ready = os.path.join(d, "attention.port")
        att = cu.spawn([os.path.join(bin_dir, "dsmoe-attention-server"), "--model", self.model, "--expert-servers",
                     f"127.0.0.1:{port}", "--ready-file", ready, "--threads", "1", "--insecure", *FAST_HEALTH],
                    os.path.join(d, "attention.log"))
        expert = None
        try:
            cu.wait_for(lambda: "serving on" in cu.read(os.path.join(d, "attention.log"), "r"), 30, "attention start")
            address = re.search(r"serving on (\S+)", cu.read(os.path.join(d, "attention.log"), "r")).group(1)
            self.assertEqual(cu.health_status(address), "NOT_SERVING")
            self.assertEqual(cu.health_status(address, "dsmoe.internal.v1.AttentionService"), "SERVING")
            time.sleep(0.5)
            self.assertFalse(os.path.exists(ready))
            expert = cu.spawn([os.path.join(bin_dir, "dsmoe-expert-server"), "--model", self.model, "--server-index", "0",
                            "--listen", f"127.0.0.1:{port}", "--threads", "1", "--insecure"],
                           os.path.join(d, "expert.log"))
            cu.wait_for(lambda: cu.health_status(address) == "SERVING", 30, "attention SERVING")
            cu.wait_for(lambda: os.path.exists(ready), 5, "the ready file")
            ids = [5, 6, 7]
            got = cu.apbg.AttentionServiceStub(grpc.insecure_channel(address)).Generate(
                cu.apb.AttentionGenerateRequest(prompt_token_ids=ids, max_tokens=8, top_p=1.0, ignore_eos=True), timeout=30)
            self.assertEqual([t for m in got for t in m.token_ids], self.clean(ids, 8))
        finally:
            cu.stop(att)
            cu.stop(expert)


class AttentionServerFaults(FaultTest):
    """Two attention servers behind the gateway; one is killed, frozen, restarted."""

    def start(self):
        # One slot per attention server: a request waits in its server's queue until the one
        # running there finishes, which makes "queued, no token yet" a state the test can set up.
        c = cu.Cluster(self.model, attention=2, experts=1, extra=FAST_HEALTH + ("--num-slots", "1"))
        self.att = c.processes("attention-server")
        return c

    def load(self, c, i):
        r = c.attention(i).GetLoad(cu.apb.GetLoadRequest(), timeout=5)
        return r.running, r.waiting

    def setup_queue(self, c):
        """A long request running on each attention server, short ones queued behind them;
        returns (the long stream on server 0, its clean output, the short streams, theirs)."""
        long_ids = [[3, 4, 5], [6, 5, 4]]
        # Long enough that all six short requests are queued (checked one by one) before the one on
        # server 1 ends, even on a busy machine; that one ends sooner: the queue behind it drains.
        long_n = [4000, 3000]
        long_want = [self.clean(p, n) for p, n in zip(long_ids, long_n)]
        longs = []
        for i, (p, n) in enumerate(zip(long_ids, long_n)):
            longs.append(cu.Stream(c.gateway, p, n))
            self.assertTrue(longs[-1].first.wait(30))
            self.assertEqual(self.load(c, i), (1, 0), f"long request {i} runs on attention server {i}")
        shorts = prompts(6, seed=55)
        short_want = [self.clean(p, 8) for p in shorts]
        streams = []
        for k, p in enumerate(shorts):
            streams.append(cu.Stream(c.gateway, p, 8))
            # The gateway sends each to the server with fewer requests in flight: they alternate.
            cu.wait_for(lambda: self.load(c, 0)[1] + self.load(c, 1)[1] == k + 1, 10, f"short request {k} queued")
        self.assertEqual(self.load(c, 0), (1, 3))
        self.longs = longs
        return longs[0], long_want[0], streams + [longs[1]], short_want + [long_want[1]]

    def test_killed_attention_server_queued_requests_are_retried_started_ones_fail(self):
        c = self.start()
        try:
            long, long_want, streams, short_want = self.setup_queue(c)
            argv = cu.command_line(self.att[0]["pid"])
            os.kill(self.att[0]["pid"], signal.SIGKILL)
            # The stream under way fails and says how far it got; the requests queued there had
            # no token yet and finish on attention server 1, identical to a clean run.
            self.assert_failed_mid_stream(long.wait(), long_want, "the long request")
            for i, (s, w) in enumerate(zip(streams, short_want)):
                self.assert_identical(s.wait(), w, f"short request {i}")
            self.assertEqual(c.health(c.gateway_address), "SERVING")  # attention 1 still is
            # Restarted on the same port, it gets requests again.
            proc = cu.spawn(cu.same_port(argv, self.att[0]["address"]), self.att[0]["log"])
            try:
                self.check_rejoins(c)
            finally:
                cu.stop(proc)
        finally:
            c.close()

    def test_frozen_attention_server_is_dropped_and_restored(self):
        c = self.start()
        pid = self.att[0]["pid"]
        try:
            long, long_want, streams, short_want = self.setup_queue(c)
            os.kill(pid, signal.SIGSTOP)
            start = time.time()
            # The gateway's health checks stop getting answers: it ends the stream under way there
            # (UNAVAILABLE, with the count) and moves the queued requests to attention server 1.
            self.assert_failed_mid_stream(long.wait(), long_want, "the long request")
            self.assertIn("is down", long.details)
            self.assertLess(time.time() - start, 5)
            for i, (s, w) in enumerate(zip(streams, short_want)):
                self.assert_identical(s.wait(), w, f"short request {i}")
            os.kill(pid, signal.SIGCONT)
            self.check_rejoins(c)
        finally:
            os.kill(pid, signal.SIGCONT)
            c.close()

    def check_rejoins(self, c):
        """Attention server 0 gets requests again: with one request running on each server's
        single slot, two concurrent requests run on both at once."""
        cu.wait_for(lambda: c.health(self.att[0]["address"]) == "SERVING", 15, "attention 0 SERVING")
        cu.wait_for(lambda: self.load(c, 0) == (0, 0), 10, "attention 0 idle")
        # The gateway's own health checks have seen it serve again (a fixed sleep was not enough
        # on a busy machine: both requests then went to attention server 1).
        url = c.processes("gateway")[0]["metrics_url"]
        for reason in ("down", "not_serving"):
            cu.wait_for(lambda: cu.metric(url, "dsmoe_servers_out_of_service", role="attention_server",
                                          reason=reason) == 0, 15, f"the gateway counts no attention server {reason}")
        ids = [[7, 8, 9], [9, 8, 7]]
        want = [self.clean(p, 1500) for p in ids]
        streams = [cu.Stream(c.gateway, p, 1500) for p in ids]
        for s in streams:
            self.assertTrue(s.first.wait(30))
        self.assertEqual((self.load(c, 0)[0], self.load(c, 1)[0]), (1, 1), "one request on each attention server")
        for i, (s, w) in enumerate(zip(streams, want)):
            self.assert_identical(s.wait(), w, f"request {i}")


if __name__ == "__main__":
    cu.main()
