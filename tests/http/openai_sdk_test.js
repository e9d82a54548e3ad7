// The official OpenAI SDK (npm `openai`) against a running dsmoe cluster's HTTP API. Run by
// tests/http/openai_sdk_test.py, which starts the cluster (TLS, API keys), a second gateway with
// a tight rate limit, computes the single-process reference, and passes everything in the
// environment:
//   DSMOE_HTTP_URL, DSMOE_LIMITED_URL   https://127.0.0.1:PORT/v1 of the two gateways
//   DSMOE_API_KEY, DSMOE_MODEL          the key and the served model name
//   DSMOE_REFERENCE                     JSON: {prompt_ids, greedy_text, greedy_ids}: the single
//                                       process's greedy continuation (ignore_eos) of prompt_ids;
//                                       greedy_logprobs, greedy_top_logprobs: per greedy token,
//                                       its logprob and the 5 largest (log_softmax in double of
//                                       the single process's logits); chat: {messages, ids,
//                                       logprobs, top_logprobs}, the same for a chat whose
//                                       prompt `dsmoe chat-template --ids` rendered;
//                                       prompt_logprobs: each prompt token's logprob from the
//                                       2nd on, prompt_top1: the largest logprob at each prompt
//                                       position (the last: the first generated token's)
//   DSMOE_TOKENIZER_DIR                 the checkpoint's tokenizer.json + tokenizer_config.json
//   NODE_EXTRA_CA_CERTS                 the cluster's CA
"use strict";
const assert = require("assert");
const fs = require("fs");
const path = require("path");
const OpenAI = require(path.join(__dirname, "node_modules/openai")).default;
const { Template } = require(path.join(__dirname, "node_modules/@huggingface/jinja"));
const { TokenizerLoader } = require(path.join(__dirname, "node_modules/@lenml/tokenizers"));

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const MODEL = env("DSMOE_MODEL");
const REF = JSON.parse(env("DSMOE_REFERENCE"));
const client = new OpenAI({ baseURL: env("DSMOE_HTTP_URL"), apiKey: env("DSMOE_API_KEY"), maxRetries: 0 });

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test("models.list names the served model", async () => {
  const models = [];
  for await (const m of client.models.list()) models.push(m);
  assert.strictEqual(models.length, 1);
  assert.strictEqual(models[0].id, MODEL);
  assert.strictEqual(models[0].object, "model");
});

test("completions (token-id prompt, greedy) equal the single-process reference", async () => {
  const r = await client.completions.create({
    model: MODEL, prompt: REF.prompt_ids, max_tokens: REF.greedy_ids.length, temperature: 0,
    ignore_eos: true,
  });
  assert.strictEqual(r.object, "text_completion");
  assert.strictEqual(r.choices.length, 1);
  assert.strictEqual(r.choices[0].text, REF.greedy_text);
  assert.strictEqual(r.choices[0].finish_reason, "length");
  assert.deepStrictEqual(r.usage, {
    prompt_tokens: REF.prompt_ids.length, completion_tokens: REF.greedy_ids.length,
    total_tokens: REF.prompt_ids.length + REF.greedy_ids.length,
  });
});

test("completions: echo puts the prompt first; a list of prompts gets one choice each", async () => {
  const r = await client.completions.create({
    model: MODEL, prompt: ["Hello", "World"], max_tokens: 3, temperature: 0, echo: true,
  });
  assert.strictEqual(r.choices.length, 2);
  assert.ok(r.choices[0].text.startsWith("Hello"), r.choices[0].text);
  assert.ok(r.choices[1].text.startsWith("World"), r.choices[1].text);
});

test("completions streamed: the pieces add up to the whole, finish_reason last, usage", async () => {
  const stream = await client.completions.create({
    model: MODEL, prompt: REF.prompt_ids, max_tokens: REF.greedy_ids.length, temperature: 0,
    ignore_eos: true, stream: true, stream_options: { include_usage: true },
  });
  let text = "", finish = null, usage = null, afterFinish = 0;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (finish !== null) ++afterFinish;
      text += c.text;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.strictEqual(text, REF.greedy_text);
  assert.strictEqual(finish, "length");
  assert.strictEqual(afterFinish, 0);
  assert.strictEqual(usage.completion_tokens, REF.greedy_ids.length);
});

// The chat prompt, as Hugging Face renders the checkpoint's template and its tokenizer encodes.
async function referencePromptTokens(messages) {
  const dir = env("DSMOE_TOKENIZER_DIR");
  const config = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const special = {};
  for (const [k, v] of Object.entries(config)) {
    if (!k.endsWith("_token")) continue;
    if (typeof v === "string") special[k] = v;
    else if (v && typeof v.content === "string") special[k] = v.content;
  }
  const text = new Template(config.chat_template).render({ messages, add_generation_prompt: true, ...special });
  const tokenizer = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8")),
    tokenizerConfig: config,
  });
  return tokenizer.encode(text, { add_special_tokens: false }).length;
}

test("chat: the checkpoint's template applied (prompt tokens as HF renders and encodes)", async () => {
  const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "Hi there, 日本語?" }];
  const r = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 5, temperature: 0 });
  assert.strictEqual(r.object, "chat.completion");
  assert.strictEqual(r.choices[0].message.role, "assistant");
  assert.strictEqual(typeof r.choices[0].message.content, "string");
  assert.ok(["stop", "length"].includes(r.choices[0].finish_reason));
  assert.strictEqual(r.usage.prompt_tokens, await referencePromptTokens(messages));
});

test("chat streamed equals chat not streamed (same seed); role first, finish last, usage", async () => {
  const req = { model: MODEL, messages: [{ role: "user", content: "Tell me a story" }], max_tokens: 12,
                temperature: 0.9, seed: 7, ignore_eos: true };
  const whole = await client.chat.completions.create(req);
  const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  let text = "", role = null, finish = null, usage = null, chunks = 0;
  for await (const chunk of stream) {
    ++chunks;
    assert.strictEqual(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      assert.strictEqual(finish, null, "nothing after finish_reason");
      text += c.delta.content || "";
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.strictEqual(role, "assistant");
  assert.strictEqual(text, whole.choices[0].message.content);
  assert.strictEqual(finish, "length");
  assert.deepStrictEqual(usage, whole.usage);
  assert.ok(chunks >= 3);
});

test("n=2: two choices, indices 0 and 1, usage counts the prompt once", async () => {
  const r = await client.chat.completions.create({
    model: MODEL, messages: [{ role: "user", content: "Hi" }], n: 2, max_tokens: 6, temperature: 1,
    seed: 3, ignore_eos: true,
  });
  assert.deepStrictEqual(r.choices.map((c) => c.index), [0, 1]);
  assert.strictEqual(r.usage.completion_tokens, 12);
  const one = await client.chat.completions.create({
    model: MODEL, messages: [{ role: "user", content: "Hi" }], max_tokens: 6, temperature: 1, seed: 3,
    ignore_eos: true,
  });
  assert.strictEqual(r.usage.prompt_tokens, one.usage.prompt_tokens);
  assert.strictEqual(r.choices[0].message.content, one.choices[0].message.content);
});

test("stop: the text ends before the stop string, finish_reason stop", async () => {
  const text = REF.greedy_text;
  // A stop string from the middle of the reference continuation.
  const chars = Array.from(text);
  const at = Math.floor(chars.length / 2);
  const stop = chars.slice(at, at + 2).join("");
  const expected = text.slice(0, text.indexOf(stop));
  const r = await client.completions.create({
    model: MODEL, prompt: REF.prompt_ids, max_tokens: REF.greedy_ids.length, temperature: 0,
    ignore_eos: true, stop: [stop, "never-appears-zzz"],
  });
  assert.strictEqual(r.choices[0].text, expected);
  assert.strictEqual(r.choices[0].finish_reason, "stop");
});

// Logprobs as the SDK types them: chat's ChatCompletionTokenLogprob (token, logprob, bytes,
// top_logprobs of TopLogprob) and completions' Completion.Choice.Logprobs (tokens,
// token_logprobs, top_logprobs dicts, text_offset), checked against the reference's values.
const TOP_N = 5;
const near = (a, b, what) => assert.ok(Math.abs(a - b) <= 1e-4, `${what}: ${a} vs ${b}`);

/**
 * @param {import("openai").OpenAI.Chat.Completions.ChatCompletionTokenLogprob[]} content
 * @param {{ids: number[], logprobs: number[], top_logprobs: number[][]}} ref
 */
function checkChatLogprobs(content, ref) {
  assert.strictEqual(content.length, ref.ids.length);
  content.forEach((t, i) => {
    assert.strictEqual(typeof t.token, "string");
    assert.deepStrictEqual(t.bytes, [...Buffer.from(t.token, "utf8")]);
    near(t.logprob, ref.logprobs[i], `content[${i}].logprob`);
    assert.strictEqual(t.top_logprobs.length, TOP_N);
    t.top_logprobs.forEach((alt, k) => {
      assert.deepStrictEqual(alt.bytes, [...Buffer.from(alt.token, "utf8")]);
      near(alt.logprob, ref.top_logprobs[i][k], `content[${i}].top_logprobs[${k}]`);
    });
  });
}

/** @param {import("openai").OpenAI.Completions.Completion.Choice.Logprobs} lp */
function checkCompletionLogprobs(lp) {
  const n = REF.greedy_ids.length;
  assert.strictEqual(lp.tokens.length, n);
  // Each token's own text: together the text, unless a token holds part of a character.
  if (!lp.tokens.join("").includes("\ufffd")) assert.strictEqual(lp.tokens.join(""), REF.greedy_text);
  let offset = 0;
  for (let i = 0; i < n; ++i) {
    near(lp.token_logprobs[i], REF.greedy_logprobs[i], `token_logprobs[${i}]`);
    assert.strictEqual(lp.text_offset[i], offset);
    offset += Array.from(lp.tokens[i]).length;
    const values = Object.values(lp.top_logprobs[i]).sort((a, b) => b - a);
    assert.ok(values.length >= 1 && values.length <= TOP_N);
    values.forEach((v, k) => near(v, REF.greedy_top_logprobs[i][k], `top_logprobs[${i}]`));
    assert.ok(lp.tokens[i] in lp.top_logprobs[i], "the chosen token is in its dict");
  }
}

test("logprobs: completions and chat, streamed and not, equal the reference", async () => {
  const comp = { model: MODEL, prompt: REF.prompt_ids, max_tokens: REF.greedy_ids.length, temperature: 0,
                 ignore_eos: true, logprobs: TOP_N };
  const whole = await client.completions.create(comp);
  checkCompletionLogprobs(whole.choices[0].logprobs);
  const streamed = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  for await (const chunk of await client.completions.create({ ...comp, stream: true })) {
    for (const c of chunk.choices) {
      if (!c.logprobs) continue;
      for (const k of Object.keys(streamed)) streamed[k].push(...c.logprobs[k]);
    }
  }
  assert.deepStrictEqual(streamed, whole.choices[0].logprobs);

  const chat = { model: MODEL, messages: REF.chat.messages, max_tokens: REF.chat.ids.length, temperature: 0,
                 ignore_eos: true, logprobs: true, top_logprobs: TOP_N };
  const r = await client.chat.completions.create(chat);
  checkChatLogprobs(r.choices[0].logprobs.content, REF.chat);
  const chunks = [];
  for await (const chunk of await client.chat.completions.create({ ...chat, stream: true })) {
    for (const c of chunk.choices) if (c.logprobs) chunks.push(...c.logprobs.content);
  }
  assert.deepStrictEqual(chunks, r.choices[0].logprobs.content);
  // Without logprobs there are none (the SDK's type: null).
  const plain = await client.chat.completions.create({ ...chat, logprobs: undefined, top_logprobs: undefined });
  assert.strictEqual(plain.choices[0].logprobs, null);
});

// What evaluation harnesses (lm-evaluation-harness's local-completions) ask to score a text:
// echo with logprobs. The legacy logprobs then cover the prompt, then the completion.
const PROMPT_TOLERANCE = 1e-5;
const nearPrompt = (a, b, what) => assert.ok(Math.abs(a - b) <= PROMPT_TOLERANCE, `${what}: ${a} vs ${b}`);

/** @param {import("openai").OpenAI.Completions.Completion.Choice} choice */
function checkEchoLogprobs(choice, generated) {
  const P = REF.prompt_ids.length;
  const lp = choice.logprobs;
  assert.strictEqual(lp.tokens.length, P + generated);
  assert.strictEqual(lp.token_logprobs.length, P + generated);
  assert.strictEqual(lp.top_logprobs.length, P + generated);
  assert.strictEqual(lp.text_offset.length, P + generated);
  // Nothing predicts the first prompt token.
  assert.strictEqual(lp.token_logprobs[0], null);
  assert.strictEqual(lp.top_logprobs[0], null);
  for (let p = 1; p < P; ++p) {
    nearPrompt(lp.token_logprobs[p], REF.prompt_logprobs[p - 1], `token_logprobs[${p}]`);
    assert.ok(lp.tokens[p] in lp.top_logprobs[p], "the prompt token is in its dict");
    nearPrompt(Math.max(...Object.values(lp.top_logprobs[p])), REF.prompt_top1[p - 1], `top_logprobs[${p}]`);
  }
  // Greedy: the first generated token is the most likely after the prompt.
  if (generated > 0) nearPrompt(lp.token_logprobs[P], REF.prompt_top1[P - 1], `token_logprobs[${P}]`);
  // text_offset: characters into the text (echo + completion), from 0, never decreasing; each
  // token's text is found at its offset (unless it holds part of a character).
  const chars = Array.from(choice.text);
  assert.strictEqual(lp.text_offset[0], 0);
  lp.tokens.forEach((tok, i) => {
    if (i > 0) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1], `text_offset[${i}]`);
    if (tok.includes("\ufffd")) return;
    const at = lp.text_offset[i];
    assert.strictEqual(chars.slice(at, at + Array.from(tok).length).join(""), tok, `token ${i} at ${at}`);
  });
}

test("echo with logprobs: the prompt's logprobs (first null) equal the reference; max_tokens 0", async () => {
  const P = REF.prompt_ids.length;
  const req = { model: MODEL, prompt: REF.prompt_ids, echo: true, logprobs: 1, max_tokens: 1, temperature: 0 };
  const r = await client.completions.create(req);
  checkEchoLogprobs(r.choices[0], 1);
  const echo = Array.from(r.choices[0].text).slice(0, r.choices[0].logprobs.text_offset[P]).join("");
  // Streamed: the same, the prompt's part with the echo in the first chunk.
  const streamed = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  let text = "", first = null;
  for await (const chunk of await client.completions.create({ ...req, stream: true })) {
    for (const c of chunk.choices) {
      if (first === null) first = c;
      text += c.text;
      if (!c.logprobs) continue;
      for (const k of Object.keys(streamed)) streamed[k].push(...c.logprobs[k]);
    }
  }
  assert.strictEqual(first.text, echo);
  assert.strictEqual(first.logprobs.tokens.length, P);
  assert.strictEqual(text, r.choices[0].text);
  assert.deepStrictEqual(streamed, r.choices[0].logprobs);
  // max_tokens 0 (as some harnesses send): nothing generated, the prompt and its logprobs.
  const only = await client.completions.create({ ...req, max_tokens: 0, logprobs: 5 });
  assert.strictEqual(only.choices[0].text, echo);
  assert.strictEqual(only.choices[0].finish_reason, "length");
  assert.strictEqual(only.usage.completion_tokens, 0);
  assert.strictEqual(only.usage.prompt_tokens, P);
  checkEchoLogprobs(only.choices[0], 0);
  for (let p = 1; p < P; ++p) {
    assert.ok(Object.keys(only.choices[0].logprobs.top_logprobs[p]).length <= 6);
    nearPrompt(only.choices[0].logprobs.token_logprobs[p], r.choices[0].logprobs.token_logprobs[p], `again ${p}`);
  }
});

async function expectError(promise, Type, status, param) {
  try {
    await promise;
  } catch (e) {
    assert.ok(e instanceof Type, `expected ${Type.name}, got ${e.constructor.name}: ${e.message}`);
    assert.strictEqual(e.status, status);
    if (param !== undefined) assert.strictEqual(e.param, param, e.message);
    assert.ok(e.error && typeof e.error.message === "string" && e.error.message.length > 0);
    return e;
  }
  assert.fail(`expected ${Type.name}`);
}

test("errors: 400 naming the parameter (unknown, wrong type, bad value)", async () => {
  await expectError(client.completions.create({ model: MODEL, prompt: "x", bogus_option: 1 }),
                    OpenAI.BadRequestError, 400, "bogus_option");
  await expectError(client.completions.create({ model: MODEL, prompt: "x", temperature: -1 }),
                    OpenAI.BadRequestError, 400, "temperature");
  await expectError(client.chat.completions.create({ model: MODEL, messages: [], max_tokens: 2 }),
                    OpenAI.BadRequestError, 400, "messages");
  await expectError(client.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }],
                                                    max_tokens: "many" }),
                    OpenAI.BadRequestError, 400, "max_tokens");
  await expectError(client.completions.create({ model: MODEL, prompt: "x", max_tokens: 100000000 }),
                    OpenAI.BadRequestError, 400, "max_tokens");
  await expectError(client.completions.create({ model: MODEL, prompt: "x", logprobs: 21 }),
                    OpenAI.BadRequestError, 400, "logprobs");
  await expectError(client.completions.create({ model: MODEL, prompt: "x", echo: true, logprobs: 21 }),
                    OpenAI.BadRequestError, 400, "logprobs");
  // max_tokens 0 only with echo (nothing else to answer).
  await expectError(client.completions.create({ model: MODEL, prompt: "x", max_tokens: 0 }),
                    OpenAI.BadRequestError, 400, "max_tokens");
  await expectError(client.completions.create({ model: MODEL, prompt: "x", max_tokens: 0, logprobs: 1 }),
                    OpenAI.BadRequestError, 400, "max_tokens");
  await expectError(client.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }],
                                                    logprobs: true, top_logprobs: 21 }),
                    OpenAI.BadRequestError, 400, "top_logprobs");
  await expectError(client.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }],
                                                    top_logprobs: 2 }),
                    OpenAI.BadRequestError, 400, "top_logprobs");
});

test("errors: 401 without a valid key, 404 for another model", async () => {
  const bad = new OpenAI({ baseURL: env("DSMOE_HTTP_URL"), apiKey: "not-a-key", maxRetries: 0 });
  await expectError(bad.models.list(), OpenAI.AuthenticationError, 401);
  await expectError(bad.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }] }),
                    OpenAI.AuthenticationError, 401);
  await expectError(client.completions.create({ model: "no-such-model", prompt: "x" }),
                    OpenAI.NotFoundError, 404, "model");
});

test("errors: 429 with Retry-After past the key's rate limit", async () => {
  const limited = new OpenAI({ baseURL: env("DSMOE_LIMITED_URL"), apiKey: env("DSMOE_API_KEY"), maxRetries: 0 });
  const req = { model: MODEL, prompt: REF.prompt_ids, max_tokens: 1 };
  await limited.completions.create(req);  // the burst of one
  const e = await expectError(limited.completions.create(req), OpenAI.RateLimitError, 429);
  assert.ok(Number(e.headers["retry-after"]) >= 1, JSON.stringify(e.headers));
});

(async () => {
  let failed = 0;
  for (const t of tests) {
    try {
      await t.fn();
      console.log(`ok   ${t.name}`);
    } catch (e) {
      ++failed;
      console.log(`FAIL ${t.name}\n     ${e.stack || e}`);
    }
  }
  console.log(`${tests.length - failed}/${tests.length} passed`);
  process.exit(failed ? 1 : 0);
})();
