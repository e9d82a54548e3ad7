#!/usr/bin/python3
"""Integration tests of the dsmoe cluster: real processes (`dsmoe cluster up`), real gRPC over
127.0.0.1 sockets. The single-process engine (`dsmoe generate`, `dsmoe logits`), itself checked
against the PyTorch reference, is the ground truth.

Usage: cluster_test.py --dsmoe PATH --stubs DIR [unittest args]
"""
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import unittest

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

def prompts(n, vocab, seed=1, lo=3, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


class GreedyMatchesSingleProcess(unittest.TestCase):
    """Token for token, the cluster's greedy output equals the single-process engine's, whatever
    the number of expert servers, replicas or attention servers."""

    LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 4, 1), (1, 2, 2), (2, 2, 1)]  # (attention, experts, replicas)

    def check_preset(self, name, preset):
        model = cu.make_model(cu.TMP, name, preset)
        cases = prompts(3, 512, seed=hash(name) & 0xff)
        want = [cu.single_process_generate(model, p, 12)["ids"] for p in cases]
        for attention, experts, replicas in self.LAYOUTS:
            with self.subTest(preset=preset, attention=attention, experts=experts, replicas=replicas):
                c = cu.Cluster(model, attention, experts, replicas)
                try:
                    for p, w in zip(cases, want):
                        got, finish, _ = c.generate(p, 12)
                        self.assertEqual(got, w, f"prompt {p}")
                        self.assertEqual(finish, "FINISH_REASON_LENGTH")
                finally:
                    c.close()

    def test_tiny(self):
        self.check_preset("tiny", "tiny")

    def test_gshard(self):
        self.check_preset("gshard", "gshard")

    def test_nccl_transport_falls_back_to_grpc_off_gpus(self):
        """--expert-transport nccl where no channel can open (attention and experts on the CPU):
        the attention server says why and carries the tensors by gRPC, with the same output."""
        model = cu.make_model(cu.TMP, "tiny", "tiny")
        cases = prompts(2, 512, seed=3)
        want = [cu.single_process_generate(model, p, 8)["ids"] for p in cases]
        c = cu.Cluster(model, 1, 2, 1, extra=("--expert-transport", "nccl"))
        try:
            for p, w in zip(cases, want):
                got, _, _ = c.generate(p, 8)
                self.assertEqual(got, w, f"prompt {p}")
            log = cu.read(c.processes("attention-server")[0]["log"], "r")
            self.assertIn("--expert-transport nccl: ", log)
            self.assertIn("using gRPC", log)
            self.assertTrue("computes on the CPU" in log or "no CUDA backend" in log, log)
        finally:
            c.close()


def cpu_list(text):
    """A Cpus_allowed_list ("0-3,6") as a list of CPUs: the kernel's format, read here directly."""
    cpus = []
    for item in filter(None, text.strip().split(",")):
        lo, _, hi = item.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpus_allowed(pid, tid=None):
    """The CPUs the kernel lets process `pid` (or its thread `tid`) run on."""
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    with open(path) as f:
        return cpu_list(next(l.split(":", 1)[1] for l in f if l.startswith("Cpus_allowed_list")))


def cgroup_cpu_quota():
    """Whole CPUs of this cgroup's quota (cgroup v2 cpu.max), or None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


class ProcessPlacement(unittest.TestCase):
    """Where `cluster up` puts its processes and what it says about them: --cpus pins each role
    to its CPUs (read back from the kernel's Cpus_allowed_list of every process and thread),
    each server's compute threads follow its set, and cluster.json records both."""

    def test_cpus_pin_each_role_and_its_threads(self):
        allowed = cpus_allowed(os.getpid())
        if len(allowed) < 2:
            self.skipTest(f"needs 2 CPUs, this process may use {allowed}")
        a, e = allowed[0], allowed[-1]
        model = cu.make_model(cu.TMP, "tiny", "tiny")
        cases = prompts(2, 512, seed=7)
        want = [cu.single_process_generate(model, p, 8)["ids"] for p in cases]
        c = cu.Cluster(model, 1, 2, 1, extra=("--cpus", f"attention={a};experts={e}"))
        try:
            expected = {"attention-server": [a], "expert-server": [e], "gateway": allowed}
            quota = cgroup_cpu_quota()
            for p in c.state["processes"]:
                with self.subTest(role=p["role"], index=p["index"]):
                    kernel = cpus_allowed(p["pid"])
                    self.assertEqual(kernel, expected[p["role"]])
                    self.assertEqual(cpu_list(p["cpus"]), kernel, "cluster.json")
                    # Every thread (gRPC's, the compute pool's) inherited the pin.
                    for tid in os.listdir(f"/proc/{p['pid']}/task"):
                        self.assertEqual(cpus_allowed(p["pid"], tid), kernel, f"thread {tid}")
                    if p["role"] == "gateway":
                        continue
                    argv = cu.command_line(p["pid"])
                    threads = int(argv[argv.index("--threads") + 1])
                    self.assertEqual(threads, min(len(kernel), quota or len(kernel)))
                    self.assertEqual(p["threads"], threads, "cluster.json")
            for p, w in zip(cases, want):
                self.assertEqual(c.generate(p, 8)[0], w, f"prompt {p}")
        finally:
            c.close()


    def test_every_process_reports_its_ephemeral_health_port(self):
        """cluster up asks each server for a plain-text health port as 127.0.0.1:0: cluster.json
        names the port bound (it answers health checks without TLS while the cluster's own
        ports require it), and so does the process's start-up log."""
        model = cu.make_model(cu.TMP, "tiny", "tiny")
        c = cu.Cluster(model, 1, 2, 1)
        try:
            self.assertTrue(c.security["tls"])
            for p in c.state["processes"]:
                with self.subTest(role=p["role"], index=p["index"]):
                    address = p["health_address"]
                    self.assertRegex(address, r"^127\.0\.0\.1:\d+$")
                    self.assertNotEqual(address, p["address"])
                    self.assertEqual(cu.health_status(address), "SERVING")  # plain text
                    self.assertNotEqual(cu.health_status(p["address"]), "SERVING")  # TLS only
                    self.assertIn(f"plain-text health checks (grpc.health.v1 Check only) on {address} "
                                  "(--health-listen 127.0.0.1:0)", cu.read(p["log"], "r"))
        finally:
            c.close()


class ClusterBehaviour(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny-bf16", "tiny", "--dtype", "bf16")
        cls.cluster = cu.Cluster(cls.model, attention=1, experts=2)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def test_a_second_cluster_up_on_the_same_state_dir_names_it(self):
        r = cu.run("cluster", "up", "--model", self.model, "--state-dir", self.cluster.state_dir, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"a cluster is already up with state dir {self.cluster.state_dir}", r.stderr)
        self.assertIn(f"`dsmoe cluster down --state-dir {self.cluster.state_dir}`", r.stderr)

    def test_logits_match_single_process(self):
        ids = prompts(1, 512, seed=5, lo=20, hi=21)[0]
        npy = os.path.join(cu.TMP, "single.npy")
        cu.run("logits", "--model", self.model, "--ids", ",".join(map(str, ids)), "--out", npy)
        want = np.load(npy).astype(np.float64)
        resp = self.cluster.attention().ComputeLogits(cu.apb.ComputeLogitsRequest(token_ids=ids), timeout=60)
        got = np.frombuffer(resp.logits, dtype="<f4").reshape(resp.num_tokens, resp.vocab_size).astype(np.float64)
        rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        self.assertLess(rel.max(), 1e-5, f"relative L2 per position: {rel}")

    def test_32_concurrent_streams_each_equal_their_single_stream_result(self):
        cases = prompts(32, 512, seed=9, lo=2, hi=30)
        lengths = [4 + (i * 7) % 20 for i in range(32)]
        seeds = list(range(32))
        # Half greedy, half sampled with a seed: batching must change neither.
        kws = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, seed=seeds[i]) for i in range(32)]
        want = [cu.single_process_generate(self.model, p, n, **kw)["ids"] for p, n, kw in zip(cases, lengths, kws)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(self.cluster.generate, p, n, 300, **kw) for p, n, kw in zip(cases, lengths, kws)]
            results = [f.result() for f in futures]
        for i, ((got, finish, _), w) in enumerate(zip(results, want)):
            self.assertEqual(got, w, f"stream {i}")
            self.assertEqual(finish, "FINISH_REASON_LENGTH")

    def test_streaming_messages_and_usage(self):
        ids = [5, 6, 7, 8]
        got, finish, msgs = self.cluster.generate(ids, 9)
        self.assertEqual(len(got), 9)
        self.assertGreater(len(msgs), 2, "tokens should arrive in several messages")
        last = msgs[-1]
        self.assertEqual(last.usage.prompt_tokens, 4)
        self.assertEqual(last.usage.completion_tokens, 9)
        self.assertGreater(last.usage.time_to_first_token_seconds, 0)
        complete = self.cluster.gateway.Complete(cu.pb.GenerateRequest(
            token_ids=cu.pb.TokenIds(ids=ids), max_tokens=9, temperature=0.0, ignore_eos=True), timeout=60)
        self.assertEqual(list(complete.token_ids), got)

    def test_stop_token_ids(self):
        ids = [5, 6, 7, 8]
        full, _, _ = self.cluster.generate(ids, 9)
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=ids), max_tokens=9, temperature=0.0,
                                    ignore_eos=True, stop_token_ids=[full[3]])
        resp = self.cluster.gateway.Complete(req, timeout=60)
        self.assertEqual(list(resp.token_ids), full[:full.index(full[3]) + 1])
        self.assertEqual(resp.finish_reason, cu.pb.FINISH_REASON_STOP)

    def test_device_flag(self):
        """--device on both servers that compute: a name that is not a device is refused; cuda:N
        where dsmoe was built without CUDA, or where there is no GPU, stops the server at start-up
        with the reason."""
        model = cu.make_model(cu.TMP, "device-flag", "tiny")
        for name in ("dsmoe-attention-server", "dsmoe-expert-server"):
            server = os.path.join(os.path.dirname(cu.DSMOE), name)
            for device, why in (("gpu0", 'device "gpu0" is not one of cpu, cuda, cuda:N'),
                                ("cuda:0", ("no CUDA backend", "no CUDA device"))):
                r = subprocess.run([server, "--model", model, "--device", device, "--insecure",
                                    "--listen", "127.0.0.1:0", "--metrics-listen", ""],
                                   capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 1, (name, r.stderr))
                reasons = (why,) if isinstance(why, str) else why
                self.assertTrue(any(w in r.stderr for w in reasons), (name, r.stderr))

    def test_bad_input_gets_the_right_code_and_the_servers_keep_serving(self):
        pb, g = cu.pb, self.cluster.gateway
        C = grpc.StatusCode
        cases = [
            (pb.GenerateRequest(), C.INVALID_ARGUMENT, "prompt is required"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), C.INVALID_ARGUMENT, "empty"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 512])), C.INVALID_ARGUMENT, "outside the vocabulary"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), max_tokens=0), C.INVALID_ARGUMENT, "max_tokens"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), max_tokens=10**9), C.INVALID_ARGUMENT, "max_tokens"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), temperature=-0.5), C.INVALID_ARGUMENT, "temperature"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), top_p=0.0), C.INVALID_ARGUMENT, "top_p"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), top_p=1.5), C.INVALID_ARGUMENT, "top_p"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), model="gpt-9"), C.NOT_FOUND, "gpt-9"),
            (pb.GenerateRequest(text="hello"), C.INVALID_ARGUMENT, "tokenizer"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 5000)), C.INVALID_ARGUMENT, "exceeds the limit"),
            (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[511] * 3_000_000)), C.RESOURCE_EXHAUSTED, ""),  # 6 MB
        ]
        for req, code, fragment in cases:
            for call in (lambda r: list(g.Generate(r, timeout=30)), lambda r: g.Complete(r, timeout=30)):
                with self.assertRaises(grpc.RpcError) as ctx:
                    call(req)
                self.assertEqual(ctx.exception.code(), code, f"{req} → {ctx.exception.details()}")
                self.assertIn(fragment, ctx.exception.details() or "")
        got, finish, _ = self.cluster.generate([1, 2, 3], 3)  # still serving
        self.assertEqual(len(got), 3)

    def test_invalid_utf8_in_a_string_field_is_invalid_argument_naming_it(self):
        """Bytes that are not UTF-8 where the API has a `string` (no client library lets one set
        them, so they are sent as raw request bytes): INVALID_ARGUMENT naming the field and the
        first bad byte, counted in dsmoe_requests_total; the gateway keeps serving."""
        pb, C = cu.pb, grpc.StatusCode

        def field(number, data):  # a length-delimited field, as the wire format writes it
            return bytes([number << 3 | 2, len(data)]) + data

        ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), max_tokens=2).SerializeToString()
        generate_cases = [
            (field(1, b"hello, w\xffrld"), "text is not valid UTF-8 (byte 8)"),
            (ids + field(8, b"ok") + field(8, b"ab\xc3("), "stop[1] is not valid UTF-8 (byte 2)"),
            (ids + field(11, b"\xed\xa0\x80"), "model is not valid UTF-8 (byte 0)"),  # a surrogate
            (ids + field(8, b"\xc0\xaf"), "stop[0] is not valid UTF-8 (byte 0)"),  # overlong '/'
        ]
        url = self.cluster.processes("gateway")[0]["metrics_url"]
        before = {m: cu.metric(url, "dsmoe_requests_total", method=m, code="INVALID_ARGUMENT") or 0
                  for m in ("Generate", "Complete", "Tokenize")}
        ch = self.cluster.channel
        calls = {"Generate": lambda b: list(ch.unary_stream("/dsmoe.v1.Gateway/Generate")(b, timeout=30)),
                 "Complete": lambda b: ch.unary_unary("/dsmoe.v1.Gateway/Complete")(b, timeout=30),
                 "Tokenize": lambda b: ch.unary_unary("/dsmoe.v1.Gateway/Tokenize")(b, timeout=30)}
        cases = [(m, b, w) for m in ("Generate", "Complete") for b, w in generate_cases]
        cases.append(("Tokenize", field(1, b"caf\xc3\xa9 \xe2\x82"), "text is not valid UTF-8 (byte 6)"))
        for method, data, want in cases:
            with self.subTest(method=method, want=want):
                with self.assertRaises(grpc.RpcError) as ctx:
                    calls[method](data)
                self.assertEqual(ctx.exception.code(), C.INVALID_ARGUMENT, ctx.exception.details())
                self.assertEqual(ctx.exception.details(), want)
        for m, n in (("Generate", 4), ("Complete", 4), ("Tokenize", 1)):
            self.assertEqual(cu.metric(url, "dsmoe_requests_total", method=m, code="INVALID_ARGUMENT"),
                             before[m] + n, m)
        # Valid UTF-8 in the same raw form still works (here: no tokenizer, so text is refused for that).
        with self.assertRaises(grpc.RpcError) as ctx:
            calls["Complete"](field(1, "héllo ✓".encode()))
        self.assertIn("tokenizer", ctx.exception.details())
        got, _, _ = self.cluster.generate([1, 2, 3], 3)  # still serving
        self.assertEqual(len(got), 3)

    def test_expert_server_refuses_an_expert_it_does_not_hold(self):
        placement = json.load(open(self.cluster.state["placement"]))
        layer = placement["layers"][0]
        not_held = next(e for e, servers in enumerate(layer["servers"]) if 0 not in servers)
        req = cu.epb.ComputeExpertsRequest(layer=layer["layer"], num_tokens=1, hidden=b"\0" * 4 * 64,
                                           token=[0], expert=[not_held], weight=[1.0])
        with self.assertRaises(grpc.RpcError) as ctx:
            self.cluster.expert(0).ComputeExperts(req, timeout=10)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn(f"(layer {layer['layer']}, expert {not_held}) is not held", ctx.exception.details())
        bad = cu.epb.ComputeExpertsRequest(layer=layer["layer"], num_tokens=1, hidden=b"\0" * 8,
                                           token=[0], expert=[0], weight=[1.0])
        with self.assertRaises(grpc.RpcError) as ctx:
            self.cluster.expert(0).ComputeExperts(bad, timeout=10)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_nccl_channel_requests_on_a_cpu_expert_server(self):
        """The NCCL transport's set-up and data calls, refused with the reason by an expert server
        that computes on the CPU; the server keeps serving."""
        C, expert = grpc.StatusCode, self.cluster.expert(0)
        placement = json.load(open(self.cluster.state["placement"]))
        layer = placement["layers"][0]
        held = next(e for e, servers in enumerate(layer["servers"]) if 0 in servers)
        cases = [
            (expert.OpenNcclChannel, cu.epb.OpenNcclChannelRequest(nccl_unique_id=b"\1" * 128),
             C.FAILED_PRECONDITION, ("on the CPU", "no CUDA backend")),
            (expert.OpenNcclChannel, cu.epb.OpenNcclChannelRequest(nccl_unique_id=b"\1" * 5),
             C.INVALID_ARGUMENT, ("5 bytes, not 128",)),
            (expert.OpenNcclChannel, cu.epb.OpenNcclChannelRequest(nccl_unique_id=b"\1" * 128, timeout_ms=10**9),
             C.INVALID_ARGUMENT, ("timeout_ms",)),
            (expert.ComputeExperts, cu.epb.ComputeExpertsRequest(
                layer=layer["layer"], num_tokens=1, token=[0], expert=[held], weight=[1.0], nccl_channel=7),
             C.NOT_FOUND, ("no NCCL channel 7",)),
            (expert.ComputeExperts, cu.epb.ComputeExpertsRequest(
                layer=layer["layer"], num_tokens=1, hidden=b"\0" * 4 * 64, token=[0], expert=[held], weight=[1.0],
                nccl_channel=7),
             C.INVALID_ARGUMENT, ("hidden must be empty",)),
        ]
        for method, req, code, fragments in cases:
            with self.subTest(code=code, fragments=fragments):
                with self.assertRaises(grpc.RpcError) as ctx:
                    method(req, timeout=10)
                self.assertEqual(ctx.exception.code(), code, ctx.exception.details())
                self.assertTrue(any(f in ctx.exception.details() for f in fragments), ctx.exception.details())
        ok = expert.ComputeExperts(cu.epb.ComputeExpertsRequest(
            layer=layer["layer"], num_tokens=1, hidden=b"\0" * 4 * 64, token=[0], expert=[held], weight=[1.0]),
            timeout=10)
        self.assertEqual(len(ok.output), 4 * 64)

    def test_cancelling_a_stream_frees_its_slot(self):
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[1, 2, 3]), max_tokens=3000, temperature=0.0,
                                    ignore_eos=True)
        stream = self.cluster.gateway.Generate(req, timeout=60)
        next(stream)
        load = self.cluster.attention().GetLoad(cu.apb.GetLoadRequest(), timeout=10)
        self.assertEqual(load.running, 1)
        stream.cancel()
        deadline = time.time() + 5
        while time.time() < deadline:
            if self.cluster.attention().GetLoad(cu.apb.GetLoadRequest(), timeout=10).running == 0:
                break
            time.sleep(0.05)
        self.assertEqual(self.cluster.attention().GetLoad(cu.apb.GetLoadRequest(), timeout=10).running, 0)

    def test_client_deadline_is_honoured(self):
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[1, 2, 3]), max_tokens=3000, temperature=0.0,
                                    ignore_eos=True)
        start = time.time()
        with self.assertRaises(grpc.RpcError) as ctx:
            list(self.cluster.gateway.Generate(req, timeout=0.3))
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(time.time() - start, 3)

    def test_health_and_model_info(self):
        for p in self.cluster.state["processes"]:
            ch = self.cluster.channel_to(p["address"])  # mutual TLS, as every client of the cluster
            check = ch.unary_unary("/grpc.health.v1.Health/Check",
                                   request_serializer=cu.health_pb2.HealthCheckRequest.SerializeToString,
                                   response_deserializer=cu.health_pb2.HealthCheckResponse.FromString)
            resp = check(cu.health_pb2.HealthCheckRequest(service=""), timeout=10)
            self.assertEqual(resp.status, cu.health_pb2.HealthCheckResponse.SERVING, p["role"])
            ch.close()
        info = self.cluster.gateway.GetModelInfo(cu.pb.GetModelInfoRequest(), timeout=10)
        self.assertEqual(info.architecture, "DeepseekForCausalLM")
        self.assertEqual(info.num_routed_experts, 16)
        self.assertEqual(info.num_shared_experts, 2)
        self.assertEqual(len(info.expert_servers), 2)
        held = sum(len(s.experts) for s in info.expert_servers)
        self.assertEqual(held, 16 * 3)  # every routed expert of the 3 MoE layers, once


class ExpertServerFaults(unittest.TestCase):
    def setUp(self):
        self.model = cu.make_model(cu.TMP, "tiny-faults", "tiny")
        self.want = cu.single_process_generate(self.model, [4, 5, 6], 10)["ids"]

    def test_killed_expert_server_without_replica_fails_requests_promptly(self):
        c = cu.Cluster(self.model, experts=2, replicas=1)
        try:
            self.assertEqual(c.generate([4, 5, 6], 10)[0], self.want)
            os.kill(c.processes("expert-server")[1]["pid"], signal.SIGKILL)
            start = time.time()
            with self.assertRaises(grpc.RpcError) as ctx:
                c.generate([4, 5, 6], 10, timeout=30)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("routed expert", ctx.exception.details())
            self.assertLess(time.time() - start, 10)
        finally:
            c.close()

    def test_killed_expert_server_with_replicas_changes_nothing(self):
        c = cu.Cluster(self.model, experts=2, replicas=2)
        try:
            self.assertEqual(c.generate([4, 5, 6], 10)[0], self.want)
            os.kill(c.processes("expert-server")[0]["pid"], signal.SIGKILL)
            for _ in range(3):
                self.assertEqual(c.generate([4, 5, 6], 10, timeout=30)[0], self.want)
        finally:
            c.close()

    def test_frozen_expert_server_hits_the_dispatch_deadline(self):
        c = cu.Cluster(self.model, experts=2, replicas=1, extra=("--dispatch-deadline-ms", "500"))
        pid = c.processes("expert-server")[1]["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)
            start = time.time()
            with self.assertRaises(grpc.RpcError) as ctx:
                c.generate([4, 5, 6], 10, timeout=30)
            self.assertIn(ctx.exception.code(), (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE))
            self.assertLess(time.time() - start, 5)
            os.kill(pid, signal.SIGCONT)
            time.sleep(2.5)  # its health checks (every 1 s by default) let it rejoin
            self.assertEqual(c.generate([4, 5, 6], 10, timeout=30)[0], self.want)
        finally:
            os.kill(pid, signal.SIGCONT)
            c.close()


class GracefulShutdown(unittest.TestCase):
    def test_sigterm_lets_streams_in_flight_finish(self):
        model = cu.make_model(cu.TMP, "tiny-shutdown", "tiny")
        c = cu.Cluster(model, experts=1)
        try:
            gateway_pid = c.processes("gateway")[0]["pid"]
            req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[1, 2]), max_tokens=300, temperature=0.0,
                                        ignore_eos=True)
            stream = c.gateway.Generate(req, timeout=120)
            first = next(stream)
            os.kill(gateway_pid, signal.SIGTERM)
            rest = list(stream)
            total = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
            self.assertEqual(total, 300)
            self.assertEqual(rest[-1].finish_reason, cu.pb.FINISH_REASON_LENGTH)
            # The gateway exits by itself, and new calls are refused.
            deadline = time.time() + 15
            while time.time() < deadline and os.path.exists(f"/proc/{gateway_pid}") and \
                    open(f"/proc/{gateway_pid}/stat").read().split(")")[1].split()[0] != "Z":
                time.sleep(0.05)
            alive = os.path.exists(f"/proc/{gateway_pid}") and \
                open(f"/proc/{gateway_pid}/stat").read().split(")")[1].split()[0] != "Z"
            self.assertFalse(alive, "gateway still running after SIGTERM")
            log = open(c.processes("gateway")[0]["log"]).read()
            self.assertIn("stopped", log)
        finally:
            c.close()


class TextThroughTheGateway(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        tokenizer = cu.ARGS.tokenizer
        if not tokenizer or not os.path.exists(tokenizer):
            raise unittest.SkipTest(f"no tokenizer.json at {tokenizer} (run tests/tokenizer/setup_reference.sh)")
        cls.model = cu.make_model(cu.TMP, "tiny-text", "tiny", "--tokenizer", tokenizer)
        cls.cluster = cu.Cluster(cls.model, experts=2)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.close()

    def test_text_prompt_equals_single_process_and_pieces_concatenate(self):
        want = json.loads(cu.run("generate", "--model", self.model, "--prompt", "The experts are", "--max-tokens",
                                 "16", "--ignore-eos", "--json").stdout)
        req = cu.pb.GenerateRequest(text="The experts are", max_tokens=16, temperature=0.0, ignore_eos=True)
        msgs = list(self.cluster.gateway.Generate(req, timeout=60))
        ids = [i for m in msgs for i in m.token_ids]
        self.assertEqual(ids, want["ids"])
        self.assertEqual("".join(m.text for m in msgs), want["text"])
        for m in msgs:
            m.text.encode("utf-8")  # every piece is whole UTF-8

    def test_stop_string_truncates_and_stops(self):
        req = cu.pb.GenerateRequest(text="The experts are", max_tokens=16, temperature=0.0, ignore_eos=True)
        full = self.cluster.gateway.Complete(req, timeout=60).text
        self.assertGreater(len(full), 6)
        for stop in (full[3:6], full[1:2], full[-3:]):
            req.ClearField("stop")
            req.stop.extend(["never-appears-here", stop])
            want = full[:full.index(stop)]
            resp = self.cluster.gateway.Complete(req, timeout=60)
            self.assertEqual(resp.finish_reason, cu.pb.FINISH_REASON_STOP, stop)
            self.assertEqual(resp.text, want, stop)
            streamed = "".join(m.text for m in self.cluster.gateway.Generate(req, timeout=60))
            self.assertEqual(streamed, want, stop)

    def test_the_python_example_streams_over_tls_with_the_api_key(self):
        """examples/python/generate.py, as proto/README.md tells a Python user to run it."""
        example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python",
                               "generate.py")
        want = json.loads(cu.run("generate", "--model", self.model, "--prompt", "The experts are", "--max-tokens",
                                 "12", "--json").stdout)
        sec = self.cluster.security
        r = subprocess.run([sys.executable, example, "--gateway", self.cluster.gateway_address, "--ca", sec["ca"],
                            "--api-key-file", sec["api_key_file"], "--prompt", "The experts are", "--max-tokens",
                            "12"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=cu.PY_STUBS))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, want["text"] + "\n")
        self.assertIn(f"completion_tokens={len(want['ids'])}", r.stderr)
        # Without the key the gateway refuses, and the example says so.
        r = subprocess.run([sys.executable, example, "--gateway", self.cluster.gateway_address, "--ca", sec["ca"],
                            "--prompt", "x"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=cu.PY_STUBS))
        self.assertEqual(r.returncode, 1)
        self.assertIn("UNAUTHENTICATED", r.stderr)

    def test_client_stop_strings_and_text_only_output(self):
        """`dsmoe client generate --prompt --stop` prints the text up to the stop string and
        nothing else (no token ids, even where a token's text is held back)."""
        req = cu.pb.GenerateRequest(text="The experts are", max_tokens=16, temperature=0.0, ignore_eos=True)
        full = self.cluster.gateway.Complete(req, timeout=60).text
        stop = full[4:7]
        r = cu.run("client", "generate", "--state-dir", self.cluster.state_dir, "--prompt", "The experts are",
                   "--max-tokens", "16", "--ignore-eos", "--stop", "never-here", "--stop", stop)
        self.assertEqual(r.stdout, full[:full.index(stop)] + "\n")
        self.assertIn("finish_reason=stop", r.stderr)

    def test_client_json_keeps_what_was_delivered_before_a_failure(self):
        # A deadline far shorter than 4,000 tokens take: the stream fails part-way.
        r = cu.run("client", "generate", "--state-dir", self.cluster.state_dir, "--ids", "5,6,7", "--max-tokens",
                   "4000", "--ignore-eos", "--timeout", "0.5", "--json", check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        got = json.loads(r.stdout)
        self.assertEqual(got["error"]["code"], 4, got["error"])  # DEADLINE_EXCEEDED
        self.assertGreater(len(got["ids"]), 0)
        self.assertLess(len(got["ids"]), 4000)
        want = json.loads(cu.run("generate", "--model", self.model, "--ids", "5,6,7", "--max-tokens",
                                 str(len(got["ids"])), "--ignore-eos", "--json").stdout)
        self.assertEqual(got["ids"], want["ids"])

    def test_tokenize_and_detokenize(self):
        g = self.cluster.gateway
        ids = g.Tokenize(cu.pb.TokenizeRequest(text="Hello, 世界!"), timeout=10).token_ids
        text = g.Detokenize(cu.pb.DetokenizeRequest(token_ids=ids), timeout=10).text
        self.assertEqual(text, "Hello, 世界!")
        # An id past the vocabulary is refused, as Generate refuses it, not decoded to nothing.
        vocab = g.GetModelInfo(cu.pb.GetModelInfoRequest(), timeout=10).vocab_size
        with self.assertRaises(grpc.RpcError) as e:
            g.Detokenize(cu.pb.DetokenizeRequest(token_ids=[ids[0], vocab]), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(f"token_ids[1] = {vocab} is outside the vocabulary [0, {vocab})", e.exception.details())


if __name__ == "__main__":
    cu.main(tokenizer="a tokenizer.json for the text tests")
