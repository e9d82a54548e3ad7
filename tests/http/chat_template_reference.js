// The reference side of the chat-template conformance test: renders real chat templates (the
// tokenizer_config.json of the @lenml/tokenizer-* packages, and deepseek-moe-16b-chat's from
// issue 21) with Hugging Face's own Jinja implementation (@huggingface/jinja) over a corpus of
// conversations generated here from a fixed seed, and writes one JSON case per line:
//   {"template": name, "source": template text, "special": {bos_token, ...},
//    "messages": [...], "add_generation_prompt": bool, "expected": text | null, "error": bool}
// Usage: node chat_template_reference.js OUT.jsonl   (after tests/http/setup_clients.sh)
"use strict";
const fs = require("fs");
const path = require("path");
const { Template } = require(path.join(__dirname, "node_modules/@huggingface/jinja"));

const DEEPSEEK_MOE_CHAT =
  "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}" +
  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}" +
  "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}" +
  "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}" +
  "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}" +
  "{{ 'Assistant:' }}{% endif %}";

function tokenContent(v) {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof v.content === "string") return v.content;
  return null;
}

function templates() {
  const out = [{
    name: "deepseek-moe-16b-chat",
    source: DEEPSEEK_MOE_CHAT,
    special: { bos_token: "<｜begin▁of▁sentence｜>", eos_token: "<｜end▁of▁sentence｜>" },
  }];
  const dir = path.join(__dirname, "node_modules/@lenml");
  for (const pkg of fs.readdirSync(dir).sort()) {
    const file = path.join(dir, pkg, "models/tokenizer_config.json");
    if (!fs.existsSync(file)) continue;
    const config = JSON.parse(fs.readFileSync(file, "utf8"));
    if (typeof config.chat_template !== "string") continue;
    const special = {};
    for (const [k, v] of Object.entries(config)) {
      if (!k.endsWith("_token")) continue;
      const c = tokenContent(v);
      if (c !== null) special[k] = c;
    }
    out.push({ name: pkg, source: config.chat_template, special });
  }
  return out;
}

// A small deterministic PRNG (mulberry32), so the corpus is the same on every run.
function rng(seed) {
  return () => {
    seed |= 0; seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const TEXTS = [
  "Hello!", "What is the capital of France?", "", "  leading and trailing spaces  ",
  "Line one\nLine two\n\nLine four", "Ünïcödé: 日本語のテキスト, emoji 🚀🎉, Ελληνικά",
  "Quotes ' and \" and backslash \\ and braces {{ }} {% %}", "Tabs\tand\ttabs",
  "A longer answer. ".repeat(20).trim(), "<think>reasoning</think>The answer is 42.",
  "Code:\n```python\nprint('hi')\n```", "12345", "   ", "Ends with newline\n",
];

function conversations() {
  const r = rng(21);
  const pick = (a) => a[Math.floor(r() * a.length)];
  const out = [];
  // Hand-made shapes first.
  out.push([{ role: "user", content: "Hi" }]);
  out.push([{ role: "system", content: "You are helpful." }, { role: "user", content: "Hi" }]);
  out.push([{ role: "user", content: "Hi" }, { role: "assistant", content: "Hello! How can I help?" },
            { role: "user", content: "Tell me a joke." }]);
  out.push([{ role: "system", content: "" }, { role: "user", content: "" }]);
  out.push([{ role: "user", content: "日本語で答えて" }, { role: "assistant", content: "はい、わかりました。" }]);
  // Random ones: an optional system turn, then alternating user/assistant turns.
  for (let k = 0; k < 40; ++k) {
    const msgs = [];
    if (r() < 0.4) msgs.push({ role: "system", content: pick(TEXTS) });
    const turns = 1 + Math.floor(r() * (k % 5 === 0 ? 12 : 4));
    for (let t = 0; t < turns; ++t) {
      msgs.push({ role: t % 2 === 0 ? "user" : "assistant", content: pick(TEXTS) });
    }
    out.push(msgs);
  }
  // Shapes some templates refuse (two users in a row, assistant first): errors must agree.
  out.push([{ role: "user", content: "a" }, { role: "user", content: "b" }]);
  out.push([{ role: "assistant", content: "first" }, { role: "user", content: "then" }]);
  return out;
}

function main() {
  const outFile = process.argv[2];
  if (!outFile) throw new Error("usage: node chat_template_reference.js OUT.jsonl");
  const lines = [];
  for (const t of templates()) {
    const template = new Template(t.source);
    for (const messages of conversations()) {
      for (const add_generation_prompt of [false, true]) {
        let expected = null, error = false;
        try {
          expected = template.render({ messages, add_generation_prompt, ...t.special });
        } catch (e) {
          error = true;
        }
        lines.push(JSON.stringify({ template: t.name, source: t.source, special: t.special,
                                    messages, add_generation_prompt, expected, error }));
      }
    }
  }
  fs.writeFileSync(outFile, lines.join("\n") + "\n");
  console.log(`wrote ${lines.length} cases to ${outFile}`);
}

main();
