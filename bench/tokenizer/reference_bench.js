#!/usr/bin/env node
// Reference side of tokenizer_bench: encodes the documents of DOCS_JSONL (one JSON string per
// line) with Hugging Face `tokenizers` (npm), one document at a time on one thread, best of
// REPEATS runs. Prints one JSON object: {"seconds", "bytes", "tokens"}.
//   node reference_bench.js NODE_MODULES TOKENIZER_JSON DOCS_JSONL REPEATS
'use strict';
const fs = require('fs');
const path = require('path');
const [nodeModules, tokenizerPath, docsPath, repeatsArg] = process.argv.slice(2);
const { Tokenizer } = require(path.join(nodeModules, 'tokenizers'));
const docs = fs.readFileSync(docsPath, 'utf8').split('\n').filter((l) => l.length).map((l) => JSON.parse(l));
const bytes = docs.reduce((n, d) => n + Buffer.byteLength(d, 'utf8'), 0);
(async () => {
  const tok = Tokenizer.fromFile(tokenizerPath);
  await tok.encode(docs[0], null, { addSpecialTokens: false });  // warm-up
  let best = Infinity, tokens = 0;
  for (let r = 0; r < Number(repeatsArg || 3); ++r) {
    tokens = 0;
    const t0 = process.hrtime.bigint();
    for (const d of docs) tokens += (await tok.encode(d, null, { addSpecialTokens: false })).getIds().length;
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  console.log(JSON.stringify({ seconds: best, bytes, tokens }));
})().catch((e) => { console.error(e); process.exit(1); });
