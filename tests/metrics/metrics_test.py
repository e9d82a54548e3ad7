#!/usr/bin/python3
"""The services' Prometheus metrics on a real local cluster (`dsmoe cluster up`):

- MetricsExactness: every /metrics endpoint passes `promtool check metrics`; after a known
  workload the attention side's dsmoe_expert_tokens_total equals the routing `dsmoe route`
  reports for the same tokens, the expert servers' counters add up to the same numbers, and
  the token, request and dispatch counters match the workload.
- DashboardQueries: a real Prometheus (Debian's, on 127.0.0.1 with a temporary data dir)
  scrapes the cluster while a workload runs; every PromQL expression of the Grafana dashboard
  (deploy/grafana) parses (promtool check rules) and returns data.

Usage: metrics_test.py --dsmoe build/bin/dsmoe --stubs build/proto/python [Suite]"""
import collections
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "..", "cluster"))
import cluster_util as cu  # noqa: E402

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dsmoe-cluster.json")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text, name):
    """{frozenset(labels minus model): value} of metric `name` in an exposition."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(LABEL.findall(m.group(3) or ""))
        labels.pop("model", None)
        out[frozenset(labels.items())] = float(m.group(4))
    return out


def by(series, *keys):
    """Sums series by the given label keys."""
    out = collections.Counter()
    for labels, v in series.items():
        d = dict(labels)
        out[tuple(d[k] for k in keys)] += v
    return out


def promtool_check_metrics(text):
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


class MetricsExactness(unittest.TestCase):
    PROMPTS = 5
    MAX_TOKENS = 6

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="dsmoe-metrics-")
        cls.model = cu.make_model(cls.tmp.name, "tiny", "tiny")
        # 3 expert servers, each routed expert on 2 of them: the dispatch planner splits each
        # expert's tokens over its holders, so only the sum over servers is fixed.
        cls.cluster = cu.Cluster(cls.model, attention=1, experts=3, replicas=2)
        cls.urls = {f'{p["role"]}-{p["index"]}': p["metrics_url"] for p in cls.cluster.state["processes"]}
        cls.before = {k: scrape(u) for k, u in cls.urls.items()}
        rng = random.Random(7)
        cls.requests = []
        for _ in range(cls.PROMPTS):
            prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))]
            out, finish, _ = cls.cluster.generate(prompt, cls.MAX_TOKENS)  # one at a time, greedy
            cls.requests.append((prompt, out, finish))
        # One refused request: a token outside the vocabulary.
        try:
            cls.cluster.generate([100000], 2)
            cls.refused = None
        except cu.grpc.RpcError as e:
            cls.refused = e.code()
        cls.after = {k: scrape(u) for k, u in cls.urls.items()}

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()
        cls.tmp.cleanup()

    def role(self, role):
        return [text for k, text in self.after.items() if k.startswith(role)]

    def test_metrics_url_of_every_process(self):
        for p in self.cluster.state["processes"]:
            self.assertRegex(p["metrics_url"], r"^http://127\.0\.0\.1:\d+/metrics$", p)
        self.assertEqual(len(set(self.urls.values())), 5)

    def test_every_endpoint_passes_promtool(self):
        for phase, texts in (("before", self.before), ("after", self.after)):
            for name, text in texts.items():
                with self.subTest(endpoint=name, phase=phase):
                    self.assertIn("dsmoe_", text)
                    r = promtool_check_metrics(text)
                    self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_every_dsmoe_series_carries_the_model_label(self):
        for name, text in self.after.items():
            for line in text.splitlines():
                if line.startswith("dsmoe_"):
                    self.assertIn('model="tiny"', line, f"{name}: {line}")

    def expected_routing(self):
        """(layer, expert) → assignments, from `dsmoe route` over every token the attention
        server fed: each prompt and each generated token except the last (never fed back)."""
        want = collections.Counter()
        shared = collections.Counter()
        for prompt, out, _ in self.requests:
            ids = prompt + out[:-1]
            r = cu.run("route", "--model", self.model, "--ids", ",".join(map(str, ids)), "--json", "--threads", "1")
            for layer in json.loads(r.stdout)["layers"]:
                shared[layer["layer"]] += len(layer["positions"])
                for pos in layer["positions"]:
                    for e in pos["experts"]:
                        want[(str(layer["layer"]), str(e))] += 1
        return want, shared

    def test_attention_expert_counts_equal_dsmoe_route(self):
        want, _ = self.expected_routing()
        got = by(samples(self.role("attention-server")[0], "dsmoe_expert_tokens_total"), "layer", "expert")
        self.assertGreater(sum(want.values()), 0)
        # Every (MoE layer, routed expert) has a series; those never chosen read 0.
        self.assertEqual(len(got), 3 * 16)
        self.assertEqual({k: v for k, v in got.items() if v}, dict(want))

    def test_expert_server_counts_add_up_to_the_attention_side(self):
        attention = by(samples(self.role("attention-server")[0], "dsmoe_expert_tokens_total"), "layer", "expert")
        total = collections.Counter()
        per_server = []
        for text in self.role("expert-server"):
            s = by(samples(text, "dsmoe_expert_server_tokens_total"), "layer", "expert")
            per_server.append(sum(s.values()))
            total.update(s)
            # A server exports series only for the experts it holds: 2 copies over 3 servers.
            self.assertLess(len(s), 3 * 16)
        self.assertEqual({k: v for k, v in total.items() if v}, {k: v for k, v in attention.items() if v})
        self.assertTrue(all(n > 0 for n in per_server), per_server)
        dispatched = by(samples(self.role("attention-server")[0], "dsmoe_dispatch_assignments_total"), "expert_server")
        self.assertEqual(sum(dispatched.values()), sum(attention.values()))
        ok_calls = samples(self.role("attention-server")[0], "dsmoe_dispatch_calls_total")
        self.assertGreater(sum(v for k, v in ok_calls.items() if ("code", "OK") in k), 0)
        self.assertEqual(sum(v for k, v in ok_calls.items() if ("code", "OK") not in k), 0)

    def test_shared_expert_and_token_counters(self):
        _, shared = self.expected_routing()
        att = self.role("attention-server")[0]
        got = by(samples(att, "dsmoe_shared_expert_tokens_total"), "layer")
        self.assertEqual({int(k[0]): v for k, v in got.items()}, dict(shared))
        prompt_tokens = sum(len(p) for p, _, _ in self.requests)
        gen_tokens = sum(len(o) for _, o, _ in self.requests)
        self.assertEqual(gen_tokens, self.PROMPTS * self.MAX_TOKENS)
        self.assertEqual(sum(samples(att, "dsmoe_prompt_tokens_total").values()), prompt_tokens)
        # Prefix caching (on by default): every prompt token is looked up; prompts shorter than
        # a page (16) can never hit, so every one was prefilled (above).
        self.assertEqual(sum(samples(att, "dsmoe_prefix_cache_queries_total").values()), prompt_tokens)
        self.assertEqual(sum(samples(att, "dsmoe_prefix_cache_hits_total").values()), 0)
        self.assertEqual(sum(samples(att, "dsmoe_generation_tokens_total").values()), gen_tokens)
        finished = by(samples(att, "dsmoe_sequences_finished_total"), "finish_reason")
        self.assertEqual(finished[("length",)], self.PROMPTS)
        self.assertEqual(sum(samples(att, "dsmoe_requests_running").values()), 0)
        self.assertEqual(sum(samples(att, "dsmoe_kv_cache_usage_ratio").values()), 0)
        self.assertEqual(samples(att, "dsmoe_request_queue_time_seconds_count")[frozenset()], self.PROMPTS)

    def test_gateway_request_metrics(self):
        gw = self.role("gateway")[0]
        self.assertEqual(self.refused, cu.grpc.StatusCode.INVALID_ARGUMENT)
        requests = by(samples(gw, "dsmoe_requests_total"), "method", "code")
        self.assertEqual(requests[("Generate", "OK")], self.PROMPTS)
        self.assertEqual(requests[("Generate", "INVALID_ARGUMENT")], 1)
        self.assertEqual(sum(requests.values()), self.PROMPTS + 1)
        self.assertEqual(len(requests), 5 * 17)  # every method × every code, from start-up on
        finished = by(samples(gw, "dsmoe_requests_finished_total"), "finish_reason")
        self.assertEqual(finished[("length",)], self.PROMPTS)
        self.assertEqual(samples(gw, "dsmoe_time_to_first_token_seconds_count")[frozenset()], self.PROMPTS)
        self.assertEqual(samples(gw, "dsmoe_e2e_request_latency_seconds_count")[frozenset()], self.PROMPTS)
        self.assertEqual(samples(gw, "dsmoe_inter_token_latency_seconds_count")[frozenset()],
                         self.PROMPTS * (self.MAX_TOKENS - 1))
        self.assertEqual(samples(gw, "dsmoe_requests_in_flight")[frozenset()], 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_queries():
    """(where, PromQL) of every panel target and query variable of the dashboard."""
    with open(DASHBOARD) as f:
        d = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f'panel "{p["title"]}" {t["refId"]}', t["expr"]))
            walk(p.get("panels", []))
    walk(d["panels"])
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append((f'variable {v["name"]}', v["query"]))
    return out


def substitute(expr, model):
    """Grafana's variables, as Grafana would expand them for a 1-minute-old dashboard."""
    for var, value in (("$__rate_interval", "1m"), ("$__range", "5m"), ("$__interval", "15s"),
                       ("$model", model), ("$layer", ".+")):
        expr = expr.replace(var, value)
    return expr


class DashboardQueries(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="dsmoe-prometheus-")
        cls.model = cu.make_model(cls.tmp.name, "tiny", "tiny")
        cls.cluster = cu.Cluster(cls.model, attention=1, experts=2)
        targets = {p["role"]: [] for p in cls.cluster.state["processes"]}
        for p in cls.cluster.state["processes"]:
            targets[p["role"]].append(p["metrics_url"].split("/")[2])
        config = os.path.join(cls.tmp.name, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n")
            for role, hosts in targets.items():
                f.write(f"  - job_name: dsmoe-{role}\n    static_configs: [{{targets: {json.dumps(hosts)}}}]\n")
        r = subprocess.run([PROMTOOL, "check", "config", config], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        cls.port = free_port()
        cls.prom_log = open(os.path.join(cls.tmp.name, "prometheus.log"), "w")
        cls.prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                                     f"--storage.tsdb.path={os.path.join(cls.tmp.name, 'data')}",
                                     f"--web.listen-address=127.0.0.1:{cls.port}", "--storage.tsdb.retention.time=1h"],
                                    stdout=cls.prom_log, stderr=subprocess.STDOUT)
        # A workload that runs until the queries are done, so every rate has data.
        cls.stop = threading.Event()
        cls.errors = []

        def work():
            rng = random.Random(3)
            rebalance_at = time.time() + 4  # once Prometheus has scraped: the rebalance panels have data
            while not cls.stop.is_set():
                try:
                    if rebalance_at and time.time() > rebalance_at:
                        rebalance_at = None
                        try:
                            cu.run("placement", "apply", "--state-dir", cls.cluster.state_dir)
                        except AssertionError as e:
                            cls.errors.append(e)
                    cls.cluster.generate([rng.randrange(3, 500) for _ in range(rng.randrange(3, 20))], 8)
                    if rng.random() < 0.2:
                        cls.cluster.generate([100000], 1)  # INVALID_ARGUMENT: the errors panel has data
                except cu.grpc.RpcError as e:
                    if e.code() != cu.grpc.StatusCode.INVALID_ARGUMENT:
                        cls.errors.append(e)
        cls.worker = threading.Thread(target=work, daemon=True)
        cls.worker.start()
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cls.port}/-/ready", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or cls.prom.poll() is not None:
                    raise AssertionError("prometheus did not start: " + open(cls.prom_log.name).read()[-2000:])
                time.sleep(0.2)

    @classmethod
    def tearDownClass(cls):
        cls.stop.set()
        cls.worker.join(timeout=120)
        cls.prom.terminate()
        cls.prom.wait(timeout=30)
        cls.prom_log.close()
        cls.cluster.close()
        cls.tmp.cleanup()

    def query(self, expr):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def test_every_dashboard_expression_parses(self):
        queries = dashboard_queries()
        rules = os.path.join(self.tmp.name, "rules.yml")
        with open(rules, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (_, expr) in enumerate(queries):
                if expr.startswith("label_values("):
                    continue  # a Grafana function, not PromQL
                f.write(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(substitute(expr, 'tiny'))}\n")
        r = subprocess.run([PROMTOOL, "check", "rules", rules], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_every_dashboard_query_returns_data(self):
        queries = dashboard_queries()
        self.assertGreater(len(queries), 25)
        pending = dict(queries)
        results = {}
        # Prometheus needs a few scrapes (and rate() two samples) before data shows: poll.
        deadline = time.time() + 90
        while pending and time.time() < deadline:
            for where, expr in list(pending.items()):
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
                if m:  # a variable: the label's values among the metric's series
                    resp = self.query(f"count by ({m.group(2)}) ({substitute(m.group(1), 'tiny')})")
                else:
                    resp = self.query(substitute(expr, "tiny"))
                self.assertEqual(resp["status"], "success", f"{where}: {resp}")
                values = [float(s["value"][1]) for s in resp["data"]["result"]]
                results[where] = values
                if values and any(math.isfinite(v) for v in values):
                    del pending[where]
            if pending:
                time.sleep(1)
        self.assertFalse(self.errors, self.errors[:3])
        self.assertEqual(pending, {}, "queries without data: " + json.dumps({w: results.get(w) for w in pending}))
        # Data, not just series: the load and throughput panels show real traffic.
        load = self.query('sum(rate(dsmoe_expert_tokens_total{model="tiny"}[1m]))')["data"]["result"]
        self.assertGreater(float(load[0]["value"][1]), 0)
        layers = self.query('count by (layer) (dsmoe_expert_load_imbalance{model="tiny"} >= 1)')["data"]["result"]
        self.assertEqual(sorted(s["metric"]["layer"] for s in layers), ["1", "2", "3"])


if __name__ == "__main__":
    cu.main()
