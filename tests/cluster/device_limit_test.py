#!/usr/bin/python3
"""Device-limited routing on a real cluster (`dsmoe cluster up --device-limited-routing 1`, two
expert servers, separate processes). With M = 1 every token's routed experts sit on one expert
server per MoE layer, so the attention server sends each token's hidden row exactly once per MoE
layer: the rows it dispatched (dsmoe_dispatch_tokens_total, summed over the servers) times k
equal the assignments (dsmoe_dispatch_assignments_total), where unrestricted routing sends most
tokens to both servers. After `dsmoe placement apply` moves the experts to other servers this
still holds: the limit follows the placement in use (with the start-up membership, tokens would
span both servers of the new placement).

Usage: device_limit_test.py --dsmoe PATH --stubs DIR [unittest args]
"""
import json
import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

TOP_K = 4  # the tiny preset: 16 routed experts, top-4, MoE layers 1-3


def prompts(n=6, seed=8):
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(rng.randrange(4, 12))] for _ in range(n)]


def dispatched(cluster):
    """(rows, assignments) the attention server has sent to all expert servers so far."""
    url = cluster.processes("attention-server")[0]["metrics_url"]
    rows = sum(cu.metric(url, "dsmoe_dispatch_tokens_total", expert_server=str(s)) or 0 for s in (0, 1))
    assignments = sum(cu.metric(url, "dsmoe_dispatch_assignments_total", expert_server=str(s)) or 0
                      for s in (0, 1))
    return rows, assignments


def run_workload(cluster):
    """Generates a few greedy streams; returns the (rows, assignments) they dispatched."""
    rows0, assignments0 = dispatched(cluster)
    for p in prompts():
        ids, _, _ = cluster.generate(p, 8)
        assert len(ids) == 8, ids
    rows1, assignments1 = dispatched(cluster)
    return rows1 - rows0, assignments1 - assignments0


class DeviceLimitedRouting(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny", "tiny")

    def test_unrestricted_routing_sends_most_tokens_to_both_servers(self):
        cluster = cu.Cluster(self.model, experts=2)
        try:
            rows, assignments = run_workload(cluster)
            self.assertGreater(assignments, 0)
            self.assertGreater(rows * TOP_K, 1.5 * assignments)  # uniform top-4 of 16: 1.9 servers
        finally:
            cluster.close()

    def test_one_server_per_token_and_layer_before_and_after_a_placement_change(self):
        cluster = cu.Cluster(self.model, experts=2, extra=("--device-limited-routing", "1"))
        try:
            rows, assignments = run_workload(cluster)
            self.assertGreater(assignments, 0)
            self.assertEqual(rows * TOP_K, assignments)
            # Round-robin put even experts on one server and odd on the other; now contiguous
            # halves: each half mixes experts of both old groups.
            layers = [{"layer": layer, "servers": [[0] if e < 8 else [1] for e in range(16)]}
                      for layer in (1, 2, 3)]
            path = os.path.join(cu.TMP, "halves.json")
            with open(path, "w") as f:
                json.dump({"num_servers": 2, "layers": layers}, f)
            cu.run("placement", "apply", "--state-dir", cluster.state_dir, "--placement", path)
            shown = json.loads(cu.run("placement", "show", "--state-dir", cluster.state_dir,
                                      "--json").stdout)[0]
            self.assertEqual(shown["version"], "2")
            rows, assignments = run_workload(cluster)
            self.assertGreater(assignments, 0)
            self.assertEqual(rows * TOP_K, assignments)
        finally:
            cluster.close()

    def test_a_limit_beyond_the_expert_servers_is_refused(self):
        r = cu.run("cluster", "up", "--model", self.model, "--expert-servers", "2",
                   "--device-limited-routing", "3", "--state-dir", os.path.join(cu.TMP, "refused"),
                   check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--device-limited-routing 3: must be 1 to 2", r.stderr)


if __name__ == "__main__":
    cu.main()
