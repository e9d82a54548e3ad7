#include "cli/tokenize_command.h"

#include <charconv>
#include <fstream>
#include <iostream>
#include <sstream>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace dsmoe::cli {
namespace {

void PrintIds(const std::vector<int32_t>& ids, std::ostream& out) {
  out << '[';
  for (size_t i = 0; i < ids.size(); ++i) out << (i ? "," : "") << ids[i];
  out << "]\n";
}

std::string StatusText(const absl::Status& s) { return std::string(s.message()); }

}  // namespace

int RunTokenize(const TokenizeOptions& options, std::ostream& out, std::ostream& err) {
  if (options.tokenizer_path.empty()) {
    err << "dsmoe tokenize: --tokenizer FILE is required\n";
    return 2;
  }
  if (options.text.has_value() == options.file.has_value()) {
    err << "dsmoe tokenize: give exactly one of --text or --file\n";
    return 2;
  }
  auto tok = Tokenizer::FromFile(options.tokenizer_path);
  if (!tok.ok()) {
    err << "dsmoe tokenize: cannot load tokenizer: " << StatusText(tok.status()) << "\n";
    return 1;
  }
  std::string text;
  if (options.text) {
    text = *options.text;
  } else {
    std::ifstream in(*options.file, std::ios::binary);
    if (!in) {
      err << "dsmoe tokenize: cannot open " << *options.file << "\n";
      return 1;
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    text = std::move(ss).str();
  }
  auto encode = [&](std::string_view t, size_t line) -> bool {
    auto ids = (*tok)->Encode(t, options.add_special_tokens);
    if (!ids.ok()) {
      err << "dsmoe tokenize: "
          << (options.jsonl && options.file ? "line " + std::to_string(line) + ": " : "")
          << StatusText(ids.status()) << "\n";
      return false;
    }
    PrintIds(*ids, out);
    return true;
  };
  if (!(options.jsonl && options.file)) return encode(text, 0) ? 0 : 1;
  size_t start = 0, line = 1;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    if (!encode(std::string_view(text).substr(start, end - start), line)) return 1;
    start = end + 1;
    ++line;
  }
  return 0;
}

int RunTokenize(const TokenizeOptions& options) {
  return RunTokenize(options, std::cout, std::cerr);
}

int RunDetokenize(const DetokenizeOptions& options, std::ostream& out, std::ostream& err) {
  if (options.tokenizer_path.empty()) {
    err << "dsmoe detokenize: --tokenizer FILE is required\n";
    return 2;
  }
  std::vector<int32_t> ids;
  std::string_view rest = options.ids;
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    int32_t id = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), id);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size() || id < 0) {
      err << "dsmoe detokenize: --ids: expected comma-separated non-negative integers, got '"
          << item << "'\n";
      return 2;
    }
    ids.push_back(id);
  }
  auto tok = Tokenizer::FromFile(options.tokenizer_path);
  if (!tok.ok()) {
    err << "dsmoe detokenize: cannot load tokenizer: " << StatusText(tok.status()) << "\n";
    return 1;
  }
  auto text = (*tok)->Decode(ids, options.skip_special_tokens);
  if (!text.ok()) {
    err << "dsmoe detokenize: " << StatusText(text.status()) << "\n";
    return 1;
  }
  out << *text << "\n";
  return 0;
}

int RunDetokenize(const DetokenizeOptions& options) {
  return RunDetokenize(options, std::cout, std::cerr);
}

}  // namespace dsmoe::cli
