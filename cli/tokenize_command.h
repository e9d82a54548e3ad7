// `dsmoe tokenize` and `dsmoe detokenize`: thin command-line front ends of dsmoe::Tokenizer.
// cli/main.cc registers the flags (CLI11) and fills these structs; these functions do the
// work, print results on `out`, print one clear error line on `err`, and return the exit code
// (0 success, 1 failure such as an unreadable file or invalid UTF-8, 2 invalid options).
//
//   dsmoe tokenize --tokenizer FILE (--text T | --file F) [--jsonl] [--no-special-tokens]
//     --tokenizer FILE   tokenizer.json; tokenizer_config.json in the same directory is read too
//                        (BOS/EOS and add_bos_token).
//     --text T           the text to encode (exactly one of --text / --file).
//     --file F           a UTF-8 file to encode; without --jsonl the whole file is one text.
//     --jsonl            with --file: each input line (split on '\n'; the '\n' is not part of
//                        the text, a '\r' before it is) is encoded on its own and printed as one
//                        JSON array of ids per output line. A final line without '\n' counts;
//                        an empty file prints nothing. With --text it changes nothing.
//     --no-special-tokens  do not add the post-processor's special tokens (e.g. BOS).
//   Output without --jsonl: one JSON array of ids, then '\n'.
//
//   dsmoe detokenize --tokenizer FILE --ids 1,2,3 [--skip-special-tokens]
//     --ids              comma-separated token ids (spaces allowed).
//     --skip-special-tokens  drop special tokens (BOS/EOS/...) from the text.
//   Output: the decoded text, then '\n'.
#pragma once

#include <iosfwd>
#include <optional>
#include <string>

namespace dsmoe::cli {

struct TokenizeOptions {
  std::string tokenizer_path;       // --tokenizer (required)
  std::optional<std::string> text;  // --text
  std::optional<std::string> file;  // --file
  bool jsonl = false;               // --jsonl
  bool add_special_tokens = true;   // false with --no-special-tokens
};

struct DetokenizeOptions {
  std::string tokenizer_path;        // --tokenizer (required)
  std::string ids;                   // --ids "1,2,3" (required)
  bool skip_special_tokens = false;  // --skip-special-tokens
};

int RunTokenize(const TokenizeOptions& options, std::ostream& out, std::ostream& err);
int RunTokenize(const TokenizeOptions& options);  // stdout / stderr

int RunDetokenize(const DetokenizeOptions& options, std::ostream& out, std::ostream& err);
int RunDetokenize(const DetokenizeOptions& options);  // stdout / stderr

}  // namespace dsmoe::cli
