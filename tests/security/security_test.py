#!/usr/bin/python3
"""Security of the dsmoe services with real certificates (made here with the openssl tool),
real processes and real gRPC (python3-grpcio) over 127.0.0.1.

TransportSecurity: an expert server with mutual TLS refuses clients without a certificate, with
one from another CA or an expired one (gRPC reports UNAVAILABLE for a failed handshake; the
server logs the handshake failure), serves one signed by its CA; a server whose certificate and
key do not match, whose certificate expired or is not signed by --tls-ca exits at start-up
with a message naming the problem; --insecure serves plain text and warns; the plain-text
health port answers Health/Check and nothing else.

GatewayAuth: a cluster from `dsmoe cluster up` (TLS + mutual TLS + API key, its defaults)
generates like the single-process engine; the gateway refuses a missing, malformed or unknown
API key with UNAUTHENTICATED, serves health and reflection without one, never shows a key in
its log or metrics; per-key rate limits answer RESOURCE_EXHAUSTED with a google.rpc.RetryInfo
and a retry-after trailer, and serve again after the wait.

Usage: security_test.py --dsmoe PATH --stubs DIR [unittest args]
"""
import json
import os
import socket
import subprocess
import sys
import time
import unittest
import urllib.request

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cluster"))
import cluster_util as cu  # noqa: E402

C = grpc.StatusCode


# ---- certificates -----------------------------------------------------------------------------

def openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {r.stderr}")


EXTENSIONS = """[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


class Pki:
    """CAs and certificates in one directory; names are file stems (NAME.pem, NAME.key)."""

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        with open(self.path("ext.cnf"), "w") as f:
            f.write(EXTENSIONS)

    def path(self, name):
        return os.path.join(self.dir, name)

    def ca(self, name):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
                "-config", self._req_config(), "-extensions", "ca", cwd=self.dir)
        return self.path(f"{name}.pem")

    def _req_config(self):
        path = self.path("req.cnf")
        with open(path, "w") as f:
            f.write("[req]\ndistinguished_name = dn\n[dn]\n" + EXTENSIONS)
        return path

    def leaf(self, name, ca, days="30", key_of=None):
        """A certificate signed by `ca` (days -1: expired yesterday); key_of: reuse that key."""
        key = f"{key_of or name}.key"
        new_key = [] if key_of else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        openssl("req", "-new", *new_key, *(["-key", key] if key_of else ["-keyout", key]),
                "-out", f"{name}.csr", "-subj", f"/CN={name}", "-config", self._req_config(), cwd=self.dir)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", days, "-extfile", "ext.cnf", "-extensions", "leaf",
                "-out", f"{name}.pem", cwd=self.dir)
        return self.path(f"{name}.pem"), self.path(key)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_check(channel, timeout=10):
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=cu.health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=cu.health_pb2.HealthCheckResponse.FromString)
    return check(cu.health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


class Server:
    """A dsmoe server process started by hand, with its log in a file."""

    def __init__(self, binary, args, name):
        self.log = os.path.join(cu.TMP, f"{name}.log")
        self.ready = os.path.join(cu.TMP, f"{name}.ready")
        if os.path.exists(self.ready):
            os.remove(self.ready)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([os.path.join(os.path.dirname(cu.DSMOE), binary), *args,
                                          "--ready-file", self.ready, "--metrics-listen", "127.0.0.1:0"],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise AssertionError(f"{name} exited ({self.proc.returncode}):\n{self.text()}")
            if time.time() > deadline:
                self.stop()
                raise AssertionError(f"{name} did not start:\n{self.text()}")
            time.sleep(0.05)
        lines = cu.read(self.ready, "r").split()
        self.address = f"127.0.0.1:{lines[0]}"
        self.metrics_url = f"http://127.0.0.1:{lines[1]}/metrics"

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_log(self, needle, timeout=10):
        """The log once it contains `needle` (gRPC may log a handshake failure just after the call fails)."""
        deadline = time.time() + timeout
        while needle not in self.text() and time.time() < deadline:
            time.sleep(0.05)
        return self.text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def run_server(binary, args, timeout=60):
    """Runs a server that is expected to exit at start-up; returns (exit code, output)."""
    r = subprocess.run([os.path.join(os.path.dirname(cu.DSMOE), binary), *args, "--metrics-listen", ""],
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


class TransportSecurity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny", "tiny")
        cls.pki = Pki(os.path.join(cu.TMP, "pki"))
        p = cls.pki
        cls.ca = p.ca("cluster-ca")
        p.ca("rogue-ca")
        cls.server_cert, cls.server_key = p.leaf("server", "cluster-ca")
        cls.client = p.leaf("client", "cluster-ca")
        cls.rogue_client = p.leaf("rogue-client", "rogue-ca")
        cls.expired_client = p.leaf("expired-client", "cluster-ca", days="-1")
        cls.expired_server = p.leaf("expired-server", "cluster-ca", days="-1")
        cls.rogue_server = p.leaf("rogue-server", "rogue-ca")
        # A certificate of the cluster CA whose key is the client's: not the server's key.
        cls.other_cert, _ = p.leaf("other", "cluster-ca", key_of="client")
        cls.health_port = free_port()
        cls.server = Server("dsmoe-expert-server", [
            "--model", cls.model, "--servers", "1", "--threads", "1",
            "--tls-cert", cls.server_cert, "--tls-key", cls.server_key, "--tls-ca", cls.ca,
            "--health-listen", f"127.0.0.1:{cls.health_port}"], "expert-mtls")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def call(self, creds, timeout=10):
        """GetExperts over a fresh channel with `creds`; returns the response or raises RpcError."""
        ch = grpc.secure_channel(self.server.address, creds) if creds else grpc.insecure_channel(self.server.address)
        try:
            return cu.epbg.ExpertServiceStub(ch).GetExperts(cu.epb.GetExpertsRequest(), timeout=timeout)
        finally:
            ch.close()

    def assertRefusedInHandshake(self, creds, server_says):
        before = self.server.text().count("Handshake failed")
        with self.assertRaises(grpc.RpcError) as ctx:
            self.call(creds)
        # A failed TLS handshake never reaches a method: gRPC reports UNAVAILABLE.
        self.assertEqual(ctx.exception.code(), C.UNAVAILABLE, ctx.exception.details())
        log = self.server.wait_log(server_says)
        self.assertGreater(log.count("Handshake failed"), before, log[-2000:])
        self.assertIn(server_says, log)

    def test_client_certificate_of_the_cluster_ca_is_served(self):
        resp = self.call(cu.tls_credentials(self.ca, *self.client))
        self.assertEqual(len(resp.experts), 16 * 3)  # tiny: every routed expert of 3 MoE layers

    def test_no_client_certificate_is_refused(self):
        self.assertRefusedInHandshake(cu.tls_credentials(self.ca), "peer did not return a certificate")

    def test_client_certificate_of_another_ca_is_refused(self):
        self.assertRefusedInHandshake(cu.tls_credentials(self.ca, *self.rogue_client), "certificate verify failed")

    def test_expired_client_certificate_is_refused(self):
        self.assertRefusedInHandshake(cu.tls_credentials(self.ca, *self.expired_client), "certificate verify failed")

    def test_client_that_does_not_trust_the_server_refuses_it(self):
        rogue_ca = self.pki.path("rogue-ca.pem")
        with self.assertRaises(grpc.RpcError) as ctx:
            self.call(cu.tls_credentials(rogue_ca, *self.client))
        self.assertEqual(ctx.exception.code(), C.UNAVAILABLE)

    def test_plain_text_client_is_refused(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.call(None)
        self.assertEqual(ctx.exception.code(), C.UNAVAILABLE)

    def test_health_port_answers_health_checks_and_nothing_else_in_plain_text(self):
        ch = grpc.insecure_channel(f"127.0.0.1:{self.health_port}")
        try:
            self.assertEqual(health_check(ch), cu.health_pb2.HealthCheckResponse.SERVING)
            with self.assertRaises(grpc.RpcError) as ctx:
                cu.epbg.ExpertServiceStub(ch).GetExperts(cu.epb.GetExpertsRequest(), timeout=10)
            self.assertEqual(ctx.exception.code(), C.UNIMPLEMENTED)
            self.assertIn("only grpc.health.v1.Health/Check", ctx.exception.details())
        finally:
            ch.close()

    def test_gateway_requires_client_certificates_when_configured(self):
        gateway = Server("dsmoe-gateway", ["--model", self.model, "--attention-servers", "127.0.0.1:1", "--no-auth",
                                           "--tls-cert", self.server_cert, "--tls-key", self.server_key,
                                           "--tls-ca", self.ca, "--tls-client-auth", "require"], "gateway-mtls")
        try:
            self.assertIn("--no-auth", gateway.text())  # the warning names the flag
            for creds, ok in ((cu.tls_credentials(self.ca, *self.client), True), (cu.tls_credentials(self.ca), False)):
                ch = grpc.secure_channel(gateway.address, creds)
                try:
                    if ok:
                        # Answered over mutual TLS; NOT_SERVING because readiness means "can
                        # serve" and its only attention server does not exist.
                        self.assertEqual(health_check(ch), cu.health_pb2.HealthCheckResponse.NOT_SERVING)
                    else:
                        with self.assertRaises(grpc.RpcError) as ctx:
                            health_check(ch)
                        self.assertEqual(ctx.exception.code(), C.UNAVAILABLE)
                finally:
                    ch.close()
            self.assertIn("peer did not return a certificate", gateway.wait_log("peer did not return a certificate"))
            # The gateway cannot say why in the handshake it ends; `dsmoe client` says what to pass.
            r = cu.run("client", "generate", "--gateway", gateway.address, "--ca", self.ca, "--ids", "1,2",
                       "--timeout", "5", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("requires a client certificate", r.stderr)
            self.assertIn("pass --cert and --key", r.stderr)
        finally:
            gateway.stop()

    def server_args(self, cert, key, ca=None):
        return ["--model", self.model, "--servers", "1", "--threads", "1", "--tls-cert", cert, "--tls-key", key,
                "--tls-ca", ca or self.ca, "--listen", "127.0.0.1:0"]

    def test_certificate_and_key_that_do_not_match_stop_the_server(self):
        rc, out = run_server("dsmoe-expert-server", self.server_args(self.other_cert, self.server_key))
        self.assertNotEqual(rc, 0)
        self.assertIn(f"the key {self.server_key} does not match the certificate {self.other_cert}", out)
        self.assertNotIn("PRIVATE KEY", out)

    def test_expired_server_certificate_stops_the_server(self):
        rc, out = run_server("dsmoe-expert-server", self.server_args(*self.expired_server))
        self.assertNotEqual(rc, 0)
        self.assertIn("expired on", out)

    def test_server_certificate_of_another_ca_stops_the_server(self):
        rc, out = run_server("dsmoe-expert-server", self.server_args(*self.rogue_server))
        self.assertNotEqual(rc, 0)
        self.assertIn("does not verify against", out)

    def test_every_server_refuses_to_start_without_a_certificate_or_insecure(self):
        for binary, args in (("dsmoe-expert-server", ["--model", self.model]),
                             ("dsmoe-attention-server", ["--model", self.model]),
                             ("dsmoe-gateway", ["--model", self.model, "--attention-servers", "127.0.0.1:1",
                                                "--no-auth"])):
            rc, out = run_server(binary, [*args, "--listen", "127.0.0.1:0"])
            self.assertNotEqual(rc, 0, binary)
            self.assertIn("TLS needs a server certificate and key", out, binary)

    def test_insecure_serves_plain_text_and_warns(self):
        server = Server("dsmoe-expert-server", ["--model", self.model, "--servers", "1", "--threads", "1",
                                                "--insecure"], "expert-insecure")
        try:
            self.assertIn("WARNING: serving PLAINTEXT gRPC", server.text())
            ch = grpc.insecure_channel(server.address)
            self.assertEqual(len(cu.epbg.ExpertServiceStub(ch).GetExperts(cu.epb.GetExpertsRequest(),
                                                                          timeout=10).experts), 48)
            ch.close()
        finally:
            server.stop()


class GatewayAuth(unittest.TestCase):
    """A default (secure) `dsmoe cluster up`, and a second gateway with rate limits in front of
    the same attention server."""

    KEY_A = "key-a-0123456789abcdef"  # in the key file as itself
    KEY_B = "key-b-0123456789abcdef"  # in the key file as its SHA-256 digest

    @classmethod
    def setUpClass(cls):
        cls.model = cu.make_model(cu.TMP, "tiny", "tiny")
        cls.cluster = cu.Cluster(cls.model, attention=1, experts=2)
        s = cls.cluster.security
        assert s["tls"] and s["api_key_file"], s
        import hashlib
        keys = os.path.join(cu.TMP, "api-keys")
        with open(keys, "w") as f:
            f.write(f"# test keys\n{cls.KEY_A}\nsha256:{hashlib.sha256(cls.KEY_B.encode()).hexdigest()}  # b\n")
        cls.limited = Server("dsmoe-gateway", [
            "--model", cls.model, "--attention-servers", cls.cluster.processes("attention-server")[0]["address"],
            "--tls-cert", s["server_cert"], "--tls-key", s["server_key"], "--tls-ca", s["ca"],
            "--api-keys", keys, "--rate-limit-rps", "1", "--rate-limit-burst", "2",
            "--rate-limit-tokens-per-minute", "60", "--rate-limit-token-burst", "10"], "gateway-limited")

    @classmethod
    def tearDownClass(cls):
        cls.limited.stop()
        cls.cluster.close()

    def gateway(self, address=None, key=None, header=None):
        """A Gateway stub over TLS (the cluster's CA, no client certificate) sending `key` as a
        bearer token, or the raw `header` as the authorization metadata."""
        creds = cu.tls_credentials(self.cluster.security["ca"])
        if key:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(key))
        ch = grpc.secure_channel(address or self.cluster.gateway_address, creds)
        self.addCleanup(ch.close)
        stub = cu.pbg.GatewayStub(ch)
        if header is None:
            return stub
        metadata = (("authorization", header),)

        class WithHeader:
            def __getattr__(self, name):
                method = getattr(stub, name)
                return lambda req, **kw: method(req, metadata=metadata, **kw)
        return WithHeader()

    def test_the_secure_cluster_generates_like_one_process(self):
        ids = [3, 14, 15, 92, 65]
        want = cu.single_process_generate(self.model, ids, 8)["ids"]
        got, finish, _ = self.cluster.generate(ids, 8)  # TLS, mutual TLS inside, API key
        self.assertEqual(got, want)
        # And through the CLI, which reads the CA, client certificate and key from the state.
        r = cu.run("client", "generate", "--state-dir", self.cluster.state_dir, "--ids", ",".join(map(str, ids)),
                   "--max-tokens", "8", "--ignore-eos", "--json")
        self.assertEqual(json.loads(r.stdout)["ids"], want)

    def test_missing_malformed_or_unknown_keys_are_unauthenticated(self):
        req = cu.pb.GetModelInfoRequest()
        for name, stub in (("no key", self.gateway()),
                           ("unknown key", self.gateway(key="not-a-key-of-this-cluster")),
                           ("basic auth", self.gateway(header="Basic " + self.cluster.api_key)),
                           ("empty bearer", self.gateway(header="Bearer "))):
            with self.subTest(name):
                with self.assertRaises(grpc.RpcError) as ctx:
                    stub.GetModelInfo(req, timeout=10)
                self.assertEqual(ctx.exception.code(), C.UNAUTHENTICATED)
                self.assertNotIn(self.cluster.api_key, ctx.exception.details())
        with self.assertRaises(grpc.RpcError) as ctx:
            list(self.gateway().Generate(cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[1, 2])), timeout=10))
        self.assertEqual(ctx.exception.code(), C.UNAUTHENTICATED)
        self.assertIn("authorization: Bearer", ctx.exception.details())
        # The CLI without the key: refused, with the code.
        r = cu.run("client", "generate", "--gateway", self.cluster.gateway_address, "--ca",
                   self.cluster.security["ca"], "--ids", "1,2", "--max-tokens", "2", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("gRPC code 16", r.stderr)
        # A bearer header in any case of "Bearer" is accepted (RFC 6750 schemes are case-insensitive).
        info = self.gateway(header="bearer " + self.cluster.api_key).GetModelInfo(req, timeout=10)
        self.assertEqual(info.num_routed_experts, 16)

    def test_health_and_reflection_need_no_key(self):
        ch = grpc.secure_channel(self.cluster.gateway_address, cu.tls_credentials(self.cluster.security["ca"]))
        self.addCleanup(ch.close)
        self.assertEqual(health_check(ch), cu.health_pb2.HealthCheckResponse.SERVING)
        from dsmoe_std.reflection.v1alpha import reflection_pb2 as refl
        info = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                request_serializer=refl.ServerReflectionRequest.SerializeToString,
                                response_deserializer=refl.ServerReflectionResponse.FromString)
        replies = list(info(iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
        names = [s.name for s in replies[0].list_services_response.service]
        self.assertIn("dsmoe.v1.Gateway", names)

    def test_no_key_in_logs_or_metrics(self):
        # Refused and accepted calls both happened by now in this test.
        list(self.cluster.gateway.Generate(cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[5, 6]),
                                                                 max_tokens=2), timeout=60))
        with self.assertRaises(grpc.RpcError):
            self.gateway(key="wrong-key-0123456789").GetModelInfo(cu.pb.GetModelInfoRequest(), timeout=10)
        gateway = self.cluster.processes("gateway")[0]
        metrics = urllib.request.urlopen(gateway["metrics_url"], timeout=10).read().decode()
        self.assertRegex(metrics, r'dsmoe_auth_refused_total\{[^}]*reason="invalid_key"[^}]*\} [1-9]')
        for secret in (self.cluster.api_key, "wrong-key-0123456789", self.KEY_A, self.KEY_B):
            self.assertNotIn(secret, metrics)
            for p in self.cluster.state["processes"]:
                with open(p["log"], errors="replace") as f:
                    self.assertNotIn(secret, f.read(), p["log"])
            self.assertNotIn(secret, self.limited.text())

    def assertRetryInfo(self, error, low, high):
        """RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo in [low, high] s and a retry-after trailer."""
        from google.rpc import error_details_pb2, status_pb2
        self.assertEqual(error.code(), C.RESOURCE_EXHAUSTED, error.details())
        trailers = dict(error.trailing_metadata())
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        self.assertEqual(status.code, C.RESOURCE_EXHAUSTED.value[0])
        retry = error_details_pb2.RetryInfo()
        self.assertTrue(status.details[0].Unpack(retry))
        delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        self.assertGreaterEqual(delay, low)
        self.assertLessEqual(delay, high)
        self.assertEqual(int(trailers["retry-after"]), max(1, int(-(-delay // 1))))
        return delay

    def test_request_rate_limit_then_recovery(self):
        a = self.gateway(self.limited.address, key=self.KEY_A)
        req = cu.pb.GetModelInfoRequest()
        a.GetModelInfo(req, timeout=10)
        a.GetModelInfo(req, timeout=10)  # the burst of 2
        with self.assertRaises(grpc.RpcError) as ctx:
            a.GetModelInfo(req, timeout=10)
        delay = self.assertRetryInfo(ctx.exception, 0.001, 1.0)  # 1 request/s
        self.assertIn("requests per second", ctx.exception.details())
        self.assertNotIn(self.KEY_A, ctx.exception.details())
        time.sleep(delay + 0.05)
        self.assertEqual(a.GetModelInfo(req, timeout=10).num_routed_experts, 16)

    def test_token_rate_limit_then_recovery(self):
        b = self.gateway(self.limited.address, key=self.KEY_B)
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=[7, 8, 9]), max_tokens=12, ignore_eos=True,
                                    temperature=0.0)
        got = list(b.Generate(req, timeout=60))  # 12 tokens from a bucket of 10: 2 in debt
        self.assertEqual(got[-1].usage.completion_tokens, 12)
        with self.assertRaises(grpc.RpcError) as ctx:
            list(b.Generate(req, timeout=60))
        # (1 + 2) tokens at 1 per second, less the time since the stream ended.
        delay = self.assertRetryInfo(ctx.exception, 1.0, 3.0)
        self.assertIn("generated tokens per minute", ctx.exception.details())
        time.sleep(delay + 0.05)
        got = list(b.Generate(req, timeout=60))
        self.assertEqual(got[-1].finish_reason, cu.pb.FINISH_REASON_LENGTH)


if __name__ == "__main__":
    cu.main()
