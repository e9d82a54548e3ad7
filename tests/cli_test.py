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
        for sub in ["", "make-model", "logits", "generate", "route", "info"]:
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--tokenizer")
    a, rest = ap.parse_known_args()
    DSMOE = a.dsmoe
    TOKENIZER = a.tokenizer
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)
