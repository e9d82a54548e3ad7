#!/usr/bin/python3
"""The gateway's admission with real processes on 127.0.0.1: a cluster (`dsmoe cluster up`, plain
text, no API keys) and a second gateway started by hand in front of its attention server with
--max-concurrent 1 --max-queued 1, so each limit is reached with a handful of streams. What is
checked: a request past --max-concurrent waits and then completes token for token as the
single-process engine computes it; one past --max-queued too is refused at once with
RESOURCE_EXHAUSTED naming both flags; a request cancelled while waiting gives its place back.
GetModelInfo's expert servers come from the attention server (this gateway knows none).

Usage: gateway_test.py --dsmoe PATH --stubs DIR [unittest args]
"""
import os
import subprocess
import sys
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

C = grpc.StatusCode


class GatewayAdmission(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny-gateway", "tiny")
        cls.cluster = cu.Cluster(cls.model, experts=1, extra=("--insecure", "--no-auth"))
        attention = cls.cluster.processes("attention-server")[0]["address"]
        port = cu.free_port()
        cls.log = os.path.join(cu.TMP, "gateway-limits.log")
        cls.log_file = open(cls.log, "a")
        cls.gateway_proc = subprocess.Popen(
            [os.path.join(os.path.dirname(cu.DSMOE), "dsmoe-gateway"), "--model", cls.model, "--attention-servers",
             attention, "--listen", f"127.0.0.1:{port}", "--insecure", "--no-auth", "--max-concurrent", "1",
             "--max-queued", "1"], stdout=cls.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        cls.gateway = cu.pbg.GatewayStub(cls.channel)
        cu.wait_for(lambda: cu.health_status(f"127.0.0.1:{port}") == "SERVING", 30, "the gateway SERVING")

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.gateway_proc.kill()
        cls.gateway_proc.wait()
        cls.log_file.close()
        cls.cluster.close()

    def running_stream(self):
        """A stream that holds the one place until cancelled (thousands of tokens)."""
        s = cu.Stream(self.gateway, [1, 2, 3], 3000)
        self.assertTrue(s.first.wait(30) and s.tokens, f"the first stream got no token: {s.code} {s.details}")
        return s

    def test_past_the_limit_requests_wait_and_past_the_queue_they_are_refused(self):
        first = self.running_stream()
        waiting = cu.Stream(self.gateway, [4, 5, 6], 10)
        time.sleep(0.5)  # had it been admitted, its first token would be here by now
        self.assertEqual(waiting.tokens, [])
        self.assertIsNone(waiting.code)
        refused = cu.Stream(self.gateway, [7, 8], 10).wait(10)
        self.assertEqual(refused.code, C.RESOURCE_EXHAUSTED, refused.details)
        self.assertIn("--max-concurrent", refused.details)
        self.assertIn("--max-queued", refused.details)
        first.call.cancel()
        waiting.wait(30)
        self.assertEqual(waiting.code, C.OK, waiting.details)
        self.assertEqual(waiting.tokens, cu.single_process_generate(self.model, [4, 5, 6], 10)["ids"])

    def test_a_request_cancelled_while_waiting_gives_its_place_back(self):
        first = self.running_stream()
        cancelled = cu.Stream(self.gateway, [4, 5, 6], 10)
        time.sleep(0.3)
        cancelled.call.cancel()
        cancelled.wait(10)
        self.assertEqual(cancelled.code, C.CANCELLED)
        # The queue's one place is free again once the gateway has seen the cancellation (the
        # client's cancel returns before it arrives there): a request waits instead of being
        # refused. Until then, requests are refused for the full queue, and only for that.
        deadline = time.time() + 5
        while True:
            waiting = cu.Stream(self.gateway, [9, 10], 8)
            time.sleep(0.2)
            if waiting.code is None or time.time() > deadline:
                break
            self.assertEqual(waiting.code, C.RESOURCE_EXHAUSTED, waiting.details)
        self.assertIsNone(waiting.code, waiting.details)
        first.call.cancel()
        waiting.wait(30)
        self.assertEqual(waiting.code, C.OK, waiting.details)
        self.assertEqual(waiting.tokens, cu.single_process_generate(self.model, [9, 10], 8)["ids"])

    def test_model_info_lists_the_expert_servers_an_attention_server_reports(self):
        # This gateway was given no expert servers: what it reports comes from the attention server,
        # which asks its expert server (one here, holding every routed expert of the 3 MoE layers).
        info = self.gateway.GetModelInfo(cu.pb.GetModelInfoRequest(), timeout=10)
        expert = self.cluster.processes("expert-server")[0]["address"]
        self.assertEqual([s.address for s in info.expert_servers], [expert])
        held = sorted(zip(info.expert_servers[0].layers, info.expert_servers[0].experts))
        layers = sorted(set(layer for layer, _ in held))
        self.assertEqual(len(layers), 3)
        self.assertEqual(held, [(layer, e) for layer in layers for e in range(16)])
        self.assertEqual(info.num_attention_servers, 1)


if __name__ == "__main__":
    cu.main()
