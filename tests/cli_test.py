#!/usr/bin/python3
"""The `dsmoe` command line as a person uses it: help everywhere, bad flags and values refused
with a clear message and a non-zero exit, never a crash."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import unittest

DSMOE = None
TOKENIZER = None  # a real tokenizer.json (tests/tokenizer/setup_reference.sh installs it)


def run(*args):
    return subprocess.run([DSMOE, *args], capture_output=True, text=True, timeout=120)


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model = os.path.join(cls.tmp.name, "tiny")
        r = run("make-model", "--preset", "tiny", "--out", cls.model, "--seed", "5")
        assert r.returncode == 0, r.stderr

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assertRefused(self, r, *fragments):
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertLess(r.returncode, 128, "killed by a signal")
        for f in fragments:
            self.assertIn(f, r.stderr + r.stdout)

    def test_help_on_every_subcommand(self):
        for sub in ["", "make-model", "logits", "generate", "route", "info", "chat-template"]:
            r = run(*([sub] if sub else []), "--help")
            self.assertEqual(r.returncode, 0, sub)
            self.assertIn("--", r.stdout)

    def test_unknown_flag_and_subcommand(self):
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--bogus"), "--bogus")
        self.assertRefused(run("frobnicate"), "frobnicate")
        self.assertRefused(run())

    def test_bad_values(self):
        self.assertRefused(run("make-model", "--preset", "huge", "--out", "x"), "huge")
        self.assertRefused(run("make-model", "--dtype", "f8", "--out", "x"), "f8")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1,x,3"), "'x' is not a token id")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1,99999"),
                           "token id 99999 is outside the model's vocabulary [0, 512)")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--max-tokens", "0"), "max-tokens")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--temperature", "-1"), "temperature")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--top-p", "1.5"), "top-p")
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--threads", "0"), "threads")
        for bad in ["fp16", "BF16", ""]:
            self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--kv-dtype", bad),
                               "--kv-dtype", "is not one of auto, f32, bf16")
        self.assertRefused(run("cluster", "up", "--model", self.model, "--kv-dtype", "q8"),
                           "--kv-dtype", "\"q8\" is not one of auto, f32, bf16")
        self.assertRefused(run("generate", "--model", self.model), "one of --ids or --prompt is required")
        self.assertRefused(run("generate", "--model", self.model, "--prompt", "hello"), "tokenizer")
        self.assertRefused(run("logits", "--model", "/nonexistent", "--ids", "1", "--out", "x.npy"), "nonexistent")
        self.assertRefused(run("make-model", "--preset", "tiny", "--heads", "5", "--out",
                               os.path.join(self.tmp.name, "bad")), "not divisible by num_attention_heads")

    def test_client_flags_shared_with_generate(self):
        # One set of sampling flags for both commands: the same limits, refused before any call.
        for cmd in (["generate", "--model", self.model], ["client", "generate", "--gateway", "127.0.0.1:1"]):
            self.assertRefused(run(*cmd, "--ids", "1", "--max-tokens", str(2**20 + 1)), "max-tokens")
            self.assertRefused(run(*cmd, "--ids", "1", "--top-p", "0"), "top-p")
        # A deadline too far away to represent is refused, not turned into DEADLINE_EXCEEDED.
        self.assertRefused(run("client", "generate", "--gateway", "127.0.0.1:1", "--ids", "1", "--timeout", "1e13"),
                           "--timeout")
        self.assertRefused(run("placement", "show", "--attention", "127.0.0.1:1", "--timeout", "1e13"), "--timeout")

    def test_broken_checkpoint_is_refused_not_crashed(self):
        broken = os.path.join(self.tmp.name, "broken")
        run("make-model", "--preset", "tiny", "--out", broken)
        with open(os.path.join(broken, "model.safetensors"), "r+b") as f:
            f.write(b"\xff" * 8)  # header length now absurd
        r = run("generate", "--model", broken, "--ids", "1,2")
        self.assertRefused(r, "model.safetensors", "invalid safetensors file")

    def test_generate_json_shape(self):
        r = run("generate", "--model", self.model, "--ids", "3,4,5", "--max-tokens", "5", "--ignore-eos", "--json",
                "--threads", "1")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(len(out["ids"]), 5)
        self.assertEqual(out["finish_reason"], "length")
        self.assertIn("text", out)
        sampled = [json.loads(run("generate", "--model", self.model, "--ids", "3,4,5", "--max-tokens", "8",
                                  "--ignore-eos", "--json", "--temperature", "1.0", "--seed", str(s)).stdout)["ids"]
                   for s in (1, 1, 2)]
        self.assertEqual(sampled[0], sampled[1], "same seed, same output")
        self.assertNotEqual(sampled[0], sampled[2], "another seed, another output")

    def test_generate_logprobs_are_the_log_softmax_of_the_logits(self):
        # The reference: log_softmax in double (numpy) of `dsmoe logits` for prompt + output, a
        # whole-sequence prefill, where generate decodes token by token. Sampled at a high
        # temperature with top-k: the logprobs are of the raw logits, before both.
        import numpy as np
        prompt = [1, 7, 42]
        r = run("generate", "--model", self.model, "--ids", "1,7,42", "--max-tokens", "6", "--temperature", "1.5",
                "--top-k", "3", "--seed", "4", "--ignore-eos", "--json", "--logprobs", "4")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        npy = os.path.join(self.tmp.name, "logprobs-ref.npy")
        ids = prompt + out["ids"][:-1]
        self.assertEqual(run("logits", "--model", self.model, "--ids", ",".join(map(str, ids)), "--out",
                             npy).returncode, 0)
        logits = np.load(npy).astype(np.float64)[len(prompt) - 1:]
        self.assertEqual(len(out["logprobs"]), len(out["ids"]))
        for row, tid, lp in zip(logits, out["ids"], out["logprobs"]):
            ref = row - row.max() - np.log(np.exp(row - row.max()).sum())
            self.assertEqual(lp["id"], tid)
            self.assertAlmostEqual(lp["logprob"], ref[tid], delta=1e-4)
            ranked = np.sort(ref)[::-1]
            self.assertEqual(len(lp["top_logprobs"]), 4)
            for k, t in enumerate(lp["top_logprobs"]):
                self.assertAlmostEqual(t["logprob"], ref[t["id"]], delta=1e-4)
                self.assertAlmostEqual(t["logprob"], ranked[k], delta=1e-4)
        self.assertNotIn("logprobs", json.loads(run("generate", "--model", self.model, "--ids", "1", "--json").stdout))
        self.assertRefused(run("generate", "--model", self.model, "--ids", "1", "--json", "--logprobs", "21"),
                           "--logprobs")

    def test_route_json_shape(self):
        r = run("route", "--model", self.model, "--ids", "3,4", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        layers = json.loads(r.stdout)["layers"]
        self.assertEqual([l["layer"] for l in layers], [1, 2, 3])  # layer 0 is dense
        for l in layers:
            self.assertEqual(len(l["positions"]), 2)
            for p in l["positions"]:
                self.assertEqual(len(p["experts"]), 4)
                self.assertEqual(p["weights"], sorted(p["weights"], reverse=True))

    def test_cluster_up_refuses_bad_cpu_pins_before_starting_anything(self):
        """--cpus: each mistake named, and nothing made (no state dir, so no process started)."""
        with open("/proc/self/status") as f:
            allowed = next(l.split(":")[1].strip() for l in f if l.startswith("Cpus_allowed_list"))
        state = os.path.join(self.tmp.name, "pins")
        beyond = os.cpu_count() + 7  # on no machine this command runs on
        for spec, fragments in [
                ("frontend=0", ["unknown role 'frontend'", "gateway, attention, experts"]),
                (f"attention={beyond}", [f"CPU {beyond} is not on this machine", f"(CPUs {allowed})"]),
                ("experts=", ["experts= names no CPUs"]),
                ("attention=0;attention=0", ["role 'attention' is given twice"]),
                ("0,attention=0", ["'0' comes before any role"]),
                ("experts=3-1", ["'3-1'", "not a CPU number or a range"]),
                ("experts=one", ["'one'", "not a CPU number or a range"])]:
            with self.subTest(spec=spec):
                r = run("cluster", "up", "--model", self.model, "--state-dir", state, "--cpus", spec)
                self.assertRefused(r, f"--cpus '{spec}'", *fragments)
                self.assertFalse(os.path.exists(state), "refused after it started making the cluster")
        r = run("cluster", "up", "--help")
        self.assertIn("--cpus", r.stdout)
        self.assertIn("gateway, attention, experts", r.stdout)

    def test_info(self):
        r = run("info", "--model", self.model, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        info = json.loads(r.stdout)
        self.assertEqual(info["routed_experts"], 16)
        self.assertEqual(info["shared_experts"], 2)


class PromptsWithTheCheckpointsTokenizer(unittest.TestCase):
    """logits, route and generate take --prompt, tokenize and detokenize --model: all read the
    checkpoint's own tokenizer.json, and --prompt means exactly the ids tokenize gives."""

    @classmethod
    def setUpClass(cls):
        if not TOKENIZER or not os.path.exists(TOKENIZER):
            raise unittest.SkipTest(f"no tokenizer.json at {TOKENIZER} (run tests/tokenizer/setup_reference.sh)")
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model = os.path.join(cls.tmp.name, "tiny-text")
        r = run("make-model", "--preset", "tiny", "--tokenizer", TOKENIZER, "--out", cls.model)
        assert r.returncode == 0, r.stderr

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_prompt_equals_its_ids(self):
        text = "Experts, routed and shared"
        ids = json.loads(run("tokenize", "--model", self.model, "--text", text).stdout)
        self.assertEqual(ids, json.loads(run("tokenize", "--tokenizer", TOKENIZER, "--text", text).stdout))
        joined = ",".join(map(str, ids))
        for cmd in (["route", "--json"], ["generate", "--json", "--max-tokens", "4"]):
            by_text = run(*cmd, "--model", self.model, "--prompt", text)
            by_ids = run(*cmd, "--model", self.model, "--ids", joined)
            self.assertEqual(by_text.returncode, 0, by_text.stderr)
            self.assertEqual(json.loads(by_text.stdout), json.loads(by_ids.stdout), cmd)
        a, b = os.path.join(self.tmp.name, "a.npy"), os.path.join(self.tmp.name, "b.npy")
        self.assertEqual(run("logits", "--model", self.model, "--prompt", text, "--out", a).returncode, 0)
        self.assertEqual(run("logits", "--model", self.model, "--ids", joined, "--out", b).returncode, 0)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            self.assertEqual(fa.read(), fb.read())
        out = run("detokenize", "--model", self.model, "--ids", joined)
        self.assertEqual(out.stdout, "<｜begin▁of▁sentence｜>" + text + "\n")

    def test_a_tokenizer_source_is_required(self):
        r = run("tokenize", "--text", "hi")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--tokenizer or --model", r.stderr)


HTTP_NODE_MODULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "http", "node_modules")


def reference_deviates(case):
    """As tests/chat_template_test.cc's ReferenceDeviates: @huggingface/jinja ignores the
    characters argument of strip() (we follow Python, as transformers); such cases are not
    compared."""
    if "strip('" not in case["source"] and 'strip("' not in case["source"]:
        return False
    return any(isinstance(m.get("content"), str) and m["content"] and
               (m["content"][0] in " \t\r" or m["content"][-1] in " \t\r") for m in case["messages"])


class ChatTemplateCommand(unittest.TestCase):
    """`dsmoe chat-template` renders byte-identically to Hugging Face's @huggingface/jinja (the
    corpus tests/http/chat_template_reference.js writes: real templates x generated
    conversations), and `make-model --chat-template` writes a template it renders."""

    @classmethod
    def setUpClass(cls):
        if not os.path.isdir(os.path.join(HTTP_NODE_MODULES, "@huggingface", "jinja")):
            raise unittest.SkipTest("no @huggingface/jinja (run tests/http/setup_clients.sh)")
        cls.tmp = tempfile.TemporaryDirectory()
        corpus = os.path.join(cls.tmp.name, "corpus.jsonl")
        script = os.path.join(os.path.dirname(HTTP_NODE_MODULES), "chat_template_reference.js")
        r = subprocess.run(["node", script, corpus], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with open(corpus) as f:
            cls.cases = [json.loads(line) for line in f if line.strip()]

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def write(self, name, text):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_renders_as_huggingface_jinja(self):
        groups = {}
        for c in self.cases:
            if not c["error"] and not reference_deviates(c):
                groups.setdefault((c["template"], c["add_generation_prompt"]), []).append(c)
        self.assertGreaterEqual(len({t for t, _ in groups}), 2)
        compared = 0
        for (template, agp), cases in sorted(groups.items()):
            config = dict(cases[0]["special"], chat_template=cases[0]["source"])
            config_path = self.write(f"{template}.json", json.dumps(config))
            messages = self.write("messages.jsonl", "".join(json.dumps(c["messages"]) + "\n" for c in cases))
            args = ["chat-template", "--tokenizer-config", config_path, "--messages", messages, "--jsonl"]
            r = run(*args, *(["--add-generation-prompt"] if agp else []))
            self.assertEqual(r.returncode, 0, r.stderr)
            got = [json.loads(line) for line in r.stdout.splitlines()]
            self.assertEqual(len(got), len(cases))
            for c, text in zip(cases, got):
                self.assertEqual(text, c["expected"], f"{template}, add_generation_prompt={agp}: {c['messages']}")
                compared += 1
        self.assertGreater(compared, 100)

    def test_one_conversation_prints_the_text_as_is_and_reads_stdin(self):
        c = next(c for c in self.cases if c["template"] == "deepseek-moe-16b-chat" and c["add_generation_prompt"]
                 and not c["error"] and len(c["messages"]) > 2)
        config = self.write("ds.json", json.dumps(dict(c["special"], chat_template=c["source"])))
        r = subprocess.run([DSMOE, "chat-template", "--tokenizer-config", config, "--messages", "-",
                            "--add-generation-prompt"], input=json.dumps(c["messages"]).encode(),
                           capture_output=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.decode(), c["expected"])  # nothing added, not even a newline

    def test_make_model_writes_a_builtin_template(self):
        if not TOKENIZER or not os.path.exists(TOKENIZER):
            self.skipTest(f"no tokenizer.json at {TOKENIZER}")
        model = os.path.join(self.tmp.name, "chat-model")
        r = run("make-model", "--preset", "tiny", "--tokenizer", TOKENIZER, "--chat-template", "deepseek-moe",
                "--out", model)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(model, "tokenizer_config.json")) as f:
            config = json.load(f)
        # The reference renders deepseek-moe-16b-chat's template (its own copy of the text, from
        # issue 21) with the checkpoint's special tokens.
        cases = [c for c in self.cases if c["template"] == "deepseek-moe-16b-chat" and not c["error"]]
        self.assertEqual(config["chat_template"], cases[0]["source"])
        def content(token):  # a string or an AddedToken {"content": ...}
            return token["content"] if isinstance(token, dict) else token
        self.assertEqual((content(config["bos_token"]), content(config["eos_token"])),
                         (cases[0]["special"]["bos_token"], cases[0]["special"]["eos_token"]))
        for c in cases[:12]:
            messages = self.write("m.json", json.dumps(c["messages"]))
            args = ["chat-template", "--model", model, "--messages", messages]
            if c["add_generation_prompt"]:
                args.append("--add-generation-prompt")
            r = run(*args)
            self.assertEqual((r.returncode, r.stdout), (0, c["expected"]), r.stderr)
            # --ids: the text tokenized without special tokens added (the template wrote the BOS).
            r = run(*args, "--ids")
            out = json.loads(r.stdout)
            self.assertEqual(out["text"], c["expected"])
            tokenized = run("tokenize", "--model", model, "--no-special-tokens", "--text", c["expected"])
            self.assertEqual(out["ids"], json.loads(tokenized.stdout))
        # A template file works as well; a broken one, an unknown name, no tokenizer: refused.
        jinja = self.write("t.jinja", "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
        other = os.path.join(self.tmp.name, "file-model")
        r = run("make-model", "--preset", "tiny", "--tokenizer", TOKENIZER, "--chat-template", jinja, "--out", other)
        self.assertEqual(r.returncode, 0, r.stderr)
        msgs = self.write("m2.json", json.dumps([{"role": "user", "content": "hi"}]))
        self.assertEqual(run("chat-template", "--model", other, "--messages", msgs).stdout, "[user]hi")
        broken = self.write("broken.jinja", "{% for m in messages %}")
        self.assertRefused(run("make-model", "--preset", "tiny", "--tokenizer", TOKENIZER, "--chat-template", broken,
                               "--out", os.path.join(self.tmp.name, "x")), "broken.jinja")
        self.assertRefused(run("make-model", "--preset", "tiny", "--tokenizer", TOKENIZER, "--chat-template",
                               "no-such-template", "--out", os.path.join(self.tmp.name, "x")),
                           "neither a file nor a built-in", "deepseek-moe")
        self.assertRefused(run("make-model", "--preset", "tiny", "--chat-template", "deepseek-moe", "--out",
                               os.path.join(self.tmp.name, "x")), "needs --tokenizer")

    def test_bad_input_is_refused(self):
        c = self.cases[0]
        config = self.write("c.json", json.dumps(dict(c["special"], chat_template=c["source"])))
        self.assertRefused(run("chat-template", "--tokenizer-config", config, "--messages",
                               self.write("bad.json", '{"role": "user"}')), "JSON list")
        self.assertRefused(run("chat-template", "--tokenizer-config", config, "--messages",
                               self.write("bad.jsonl", '[]\nnot json\n'), "--jsonl"), "line 2")
        self.assertRefused(run("chat-template", "--messages", self.write("ok.json", "[]")),
                           "--model DIR or --tokenizer-config")
        raising = self.write("r.json", json.dumps({"chat_template": "{{ raise_exception('no system role') }}"}))
        self.assertRefused(run("chat-template", "--tokenizer-config", raising, "--messages",
                               self.write("m.json", "[]")), "no system role")
        self.assertRefused(run("chat-template", "--tokenizer-config", self.write("none.json", "{}"), "--messages",
                               self.write("m.json", "[]")), "has no chat_template")

    assertRefused = CliTest.assertRefused


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--tokenizer")
    a, rest = ap.parse_known_args()
    DSMOE = a.dsmoe
    TOKENIZER = a.tokenizer
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)
