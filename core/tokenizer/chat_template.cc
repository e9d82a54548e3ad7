// The Jinja subset of chat templates: lexer (with trim_blocks / lstrip_blocks and `-`
// whitespace control), a recursive-descent parser following jinja2/parser.py's precedence
// (or, and, not, comparisons, + -, ~, * / // %, **, unary, postfix with filters and tests),
// and a tree-walking renderer over Python-like values.
#include "core/tokenizer/chat_template.h"

#include <cmath>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace dsmoe {

namespace jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion order, as Python's dict
struct Macro;
using Builtin =
    std::function<Value(std::vector<Value>&, std::vector<std::pair<std::string, Value>>&)>;

struct Undefined {};
struct None {};

struct Value {
  std::variant<Undefined, None, bool, int64_t, double, std::string, std::shared_ptr<List>,
               std::shared_ptr<Dict>, std::shared_ptr<Macro>, std::shared_ptr<Builtin>>
      v;
  bool is_namespace = false;  // a Dict made by namespace(): attributes may be set
  Value() = default;
  template <class T>
  Value(T x) : v(std::move(x)) {}  // NOLINT: values convert freely, as in Python
  Value(const char* s) : v(std::string(s)) {}
  Value(int x) : v(int64_t{x}) {}
  Value(size_t x) : v(static_cast<int64_t>(x)) {}

  bool undefined() const { return std::holds_alternative<Undefined>(v); }
  bool none() const { return std::holds_alternative<None>(v); }
  bool is_str() const { return std::holds_alternative<std::string>(v); }
  bool is_int() const { return std::holds_alternative<int64_t>(v); }
  bool is_float() const { return std::holds_alternative<double>(v); }
  bool is_bool() const { return std::holds_alternative<bool>(v); }
  bool is_num() const { return is_int() || is_float(); }
  bool is_list() const { return std::holds_alternative<std::shared_ptr<List>>(v); }
  bool is_dict() const { return std::holds_alternative<std::shared_ptr<Dict>>(v); }
  const std::string& str() const { return std::get<std::string>(v); }
  int64_t i() const { return is_bool() ? std::get<bool>(v) : std::get<int64_t>(v); }
  double f() const { return is_float() ? std::get<double>(v) : static_cast<double>(i()); }
  List& list() const { return *std::get<std::shared_ptr<List>>(v); }
  Dict& dict() const { return *std::get<std::shared_ptr<Dict>>(v); }
};

Value MakeList(List l = {}) { return Value(std::make_shared<List>(std::move(l))); }
Value MakeDict(Dict d = {}) { return Value(std::make_shared<Dict>(std::move(d))); }

// A render-time error (raise_exception, a type error); caught once in Render.
struct Error {
  std::string message;
};
[[noreturn]] void Fail(const std::string& m) { throw Error{m}; }

const Value* Find(const Dict& d, const std::string& key) {
  for (const auto& [k, v] : d)
    if (k == key) return &v;
  return nullptr;
}

Value FromJson(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return None{};
    case nlohmann::json::value_t::boolean:
      return j.get<bool>();
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
      return j.get<int64_t>();
    case nlohmann::json::value_t::number_float:
      return j.get<double>();
    case nlohmann::json::value_t::string:
      return j.get<std::string>();
    case nlohmann::json::value_t::array: {
      List l;
      for (const auto& x : j) l.push_back(FromJson(x));
      return MakeList(std::move(l));
    }
    case nlohmann::json::value_t::object: {
      Dict d;
      for (const auto& [k, x] : j.items()) d.emplace_back(k, FromJson(x));
      return MakeDict(std::move(d));
    }
    default:
      return Undefined{};
  }
}

bool Truthy(const Value& x) {
  return std::visit(
      [](const auto& a) -> bool {
        using T = std::decay_t<decltype(a)>;
        if constexpr (std::is_same_v<T, Undefined> || std::is_same_v<T, None>)
          return false;
        else if constexpr (std::is_same_v<T, bool>)
          return a;
        else if constexpr (std::is_same_v<T, int64_t>)
          return a != 0;
        else if constexpr (std::is_same_v<T, double>)
          return a != 0;
        else if constexpr (std::is_same_v<T, std::string>)
          return !a.empty();
        else if constexpr (std::is_same_v<T, std::shared_ptr<List>>)
          return !a->empty();
        else if constexpr (std::is_same_v<T, std::shared_ptr<Dict>>)
          return !a->empty();
        else
          return true;
      },
      x.v);
}

std::string PyFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == std::floor(d) && std::fabs(d) < 1e16) return absl::StrFormat("%.1f", d);
  return absl::StrFormat("%.17g", d);  // close enough to repr for chat templates
}

std::string Repr(const Value& x);
std::string ToString(const Value& x) {
  if (x.is_str()) return x.str();
  if (x.undefined()) return "";
  return Repr(x);
}
std::string QuoteRepr(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + q;
}
std::string Repr(const Value& x) {
  if (x.undefined()) return "";
  if (x.none()) return "None";
  if (x.is_bool()) return std::get<bool>(x.v) ? "True" : "False";
  if (x.is_int()) return std::to_string(x.i());
  if (x.is_float()) return PyFloat(x.f());
  if (x.is_str()) return QuoteRepr(x.str());
  if (x.is_list()) {
    std::vector<std::string> parts;
    for (const Value& e : x.list()) parts.push_back(Repr(e));
    return "[" + absl::StrJoin(parts, ", ") + "]";
  }
  if (x.is_dict()) {
    std::vector<std::string> parts;
    for (const auto& [k, e] : x.dict()) parts.push_back(QuoteRepr(k) + ": " + Repr(e));
    return "{" + absl::StrJoin(parts, ", ") + "}";
  }
  return "<function>";
}

// JSON as Python's json.dumps(ensure_ascii=False) writes it (what transformers' tojson uses).
void ToJson(const Value& x, int indent, int depth, std::string* out) {
  auto newline = [&](int d) {
    if (indent > 0) *out += "\n" + std::string(indent * d, ' ');
  };
  if (x.undefined() || x.none()) {
    *out += "null";
  } else if (x.is_bool()) {
    *out += std::get<bool>(x.v) ? "true" : "false";
  } else if (x.is_int()) {
    *out += std::to_string(x.i());
  } else if (x.is_float()) {
    *out += PyFloat(x.f());
  } else if (x.is_str()) {
    *out += nlohmann::json(x.str()).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else if (x.is_list()) {
    if (x.list().empty()) {
      *out += "[]";
      return;
    }
    *out += "[";
    bool first = true;
    for (const Value& e : x.list()) {
      if (!first) *out += indent > 0 ? "," : ", ";
      first = false;
      newline(depth + 1);
      ToJson(e, indent, depth + 1, out);
    }
    newline(depth);
    *out += "]";
  } else if (x.is_dict()) {
    if (x.dict().empty()) {
      *out += "{}";
      return;
    }
    *out += "{";
    bool first = true;
    for (const auto& [k, e] : x.dict()) {
      if (!first) *out += indent > 0 ? "," : ", ";
      first = false;
      newline(depth + 1);
      ToJson(Value(k), indent, depth + 1, out);
      *out += ": ";
      ToJson(e, indent, depth + 1, out);
    }
    newline(depth);
    *out += "}";
  } else {
    Fail("tojson: a function cannot be serialized");
  }
}

// Code points, for Python's indexing and len() of strings.
std::vector<std::string> Chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool Equal(const Value& a, const Value& b) {
  if (a.is_num() && b.is_num()) return a.f() == b.f();
  if ((a.is_bool() || a.is_num()) && (b.is_bool() || b.is_num())) return a.f() == b.f();
  if (a.is_str() && b.is_str()) return a.str() == b.str();
  if (a.none() && b.none()) return true;
  if (a.undefined() && b.undefined()) return true;
  if (a.is_list() && b.is_list()) {
    if (a.list().size() != b.list().size()) return false;
    for (size_t i = 0; i < a.list().size(); ++i)
      if (!Equal(a.list()[i], b.list()[i])) return false;
    return true;
  }
  if (a.is_dict() && b.is_dict()) return &a.dict() == &b.dict();
  return false;
}

constexpr uint64_t kMaxString = 16 << 20;  // bytes of one string or the output
// Statements executed per render. Real chat templates take a few per message; a render runs
// on the request path, so a template that loops far beyond that is refused early.
constexpr int64_t kMaxSteps = 100'000;

// ---- Lexer ----

struct Tok {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind;
  std::string text;
  int line;
};

struct Segment {
  enum Kind { kText, kOutput, kStatement } kind;
  std::string text;  // the text, or the tag's inside
  int line;
};

absl::StatusOr<std::vector<Segment>> Split(const std::string& src) {
  std::vector<Segment> out;
  size_t pos = 0;
  int line = 1;
  bool trim_next_newline = false;  // trim_blocks after a block tag
  bool strip_next = false;         // a `-` before the previous tag's end
  auto count_lines = [](const std::string& s) {
    return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
  };
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#') {
      open = src.find('{', open + 1);
    }
    if (open != std::string::npos && open + 1 >= src.size()) open = std::string::npos;
    std::string text = src.substr(pos, open == std::string::npos ? std::string::npos : open - pos);
    bool at_line_start = pos == 0 || src[pos - 1] == '\n';
    if (trim_next_newline && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
      at_line_start = true;
    }
    if (strip_next) {
      const size_t first = text.find_first_not_of(" \t\r\n");
      text.erase(0, first == std::string::npos ? text.size() : first);
    }
    trim_next_newline = strip_next = false;
    if (open == std::string::npos) {
      if (!text.empty()) out.push_back({Segment::kText, text, line});
      break;
    }
    const char kind = src[open + 1];
    const bool minus_left = open + 2 < src.size() && src[open + 2] == '-';
    const bool plus_left = open + 2 < src.size() && src[open + 2] == '+';
    if (minus_left) {
      const size_t keep = text.find_last_not_of(" \t\r\n");
      text.erase(keep == std::string::npos ? 0 : keep + 1);
    } else if (kind != '{' && !plus_left) {
      // lstrip_blocks: spaces and tabs between a line's start and a block tag go.
      const size_t nl = text.find_last_of('\n');
      const size_t start = nl == std::string::npos ? 0 : nl + 1;
      if (text.find_first_not_of(" \t", start) == std::string::npos &&
          (nl != std::string::npos || at_line_start)) {
        text.erase(start);
      }
    }
    if (!text.empty()) out.push_back({Segment::kText, text, line});
    line += count_lines(src.substr(pos, open - pos));
    const std::string close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t inner = open + 2 + ((minus_left || plus_left) ? 1 : 0);
    size_t end = src.find(close, inner);
    // A string literal may contain the closing characters.
    if (kind != '#') {
      char quote = 0;
      end = std::string::npos;
      for (size_t i = inner; i + 1 < src.size(); ++i) {
        if (quote) {
          if (src[i] == '\\')
            ++i;
          else if (src[i] == quote)
            quote = 0;
        } else if (src[i] == '\'' || src[i] == '"') {
          quote = src[i];
        } else if (src.compare(i, 2, close) == 0) {
          end = i;
          break;
        }
      }
    }
    if (end == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line, ": a tag opened with '{",
                                                     std::string(1, kind), "' is never closed"));
    }
    bool minus_right = end > inner && src[end - 1] == '-';
    std::string body = src.substr(inner, end - inner - (minus_right ? 1 : 0));
    if (kind == '{') out.push_back({Segment::kOutput, body, line});
    if (kind == '%') out.push_back({Segment::kStatement, body, line});
    line += count_lines(src.substr(open, end + 2 - open));
    pos = end + 2;
    strip_next = minus_right;
    trim_next_newline = kind != '{';
  }
  return out;
}

absl::StatusOr<std::vector<Tok>> Lex(const std::string& s, int line) {
  std::vector<Tok> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      if (c == '\n') ++line;
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::kName, s.substr(i, j - i), line});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      bool is_float = false;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      out.push_back({is_float ? Tok::kFloat : Tok::kInt, s.substr(i, j - i), line});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          const char e = s[++j];
          v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        } else {
          v += s[j];
        }
      }
      if (j >= s.size())
        return absl::InvalidArgumentError(absl::StrCat("line ", line, ": unterminated string"));
      out.push_back({Tok::kString, v, line});
      i = j + 1;
    } else {
      static const char* kOps[] = {"==", "!=", "<=", ">=", "//", "**", "(", ")", "[",
                                   "]",  "{",  "}",  ",",  ":",  ".",  "|", "+", "-",
                                   "*",  "/",  "%",  "~",  "<",  ">",  "="};
      bool found = false;
      for (const char* op : kOps) {
        if (s.compare(i, std::strlen(op), op) == 0) {
          out.push_back({Tok::kOp, op, line});
          i += std::strlen(op);
          found = true;
          break;
        }
      }
      if (!found) {
        return absl::InvalidArgumentError(
            absl::StrCat("line ", line, ": unexpected character '", std::string(1, c), "'"));
      }
    }
  }
  out.push_back({Tok::kEnd, "", line});
  return out;
}

// ---- Syntax tree ----

struct Expr;
using ExprP = std::shared_ptr<Expr>;
struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kUnary,
    kBinary,
    kAnd,
    kOr,
    kNot,
    kCond,
    kConcat
  } kind;
  Value literal;
  std::string name;  // name, attribute, filter, test, operator
  std::vector<ExprP> args;
  std::vector<std::pair<std::string, ExprP>> kwargs;
  bool negated = false;  // `is not`, `not in`
  int line = 0;
};

struct Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kBlock } kind;
  std::string text;
  ExprP expr;  // output, set value, for iterable
  std::vector<std::pair<ExprP, std::vector<std::shared_ptr<Node>>>> branches;  // if
  std::vector<std::shared_ptr<Node>> body, else_body;
  std::vector<std::string> targets;                   // for variables; set: name (and attribute)
  ExprP filter;                                       // for ... if
  std::vector<std::pair<std::string, ExprP>> params;  // macro
  int line = 0;
};
using NodeP = std::shared_ptr<Node>;

const std::set<std::string> kFilters = {
    "trim",       "tojson",  "length",     "count",      "upper",     "lower",   "title",
    "capitalize", "default", "d",          "join",       "first",     "last",    "list",
    "string",     "int",     "float",      "abs",        "replace",   "reverse", "safe",
    "items",      "indent",  "selectattr", "rejectattr", "map",       "e",       "escape",
    "unique",     "round",   "sort",       "dictsort",   "wordcount", "center",  "truncate",
    "batch",      "select",  "reject",     "min",        "max",       "sum"};
const std::set<std::string> kTests = {
    "defined",  "undefined", "none",    "string",      "number",  "integer", "float", "mapping",
    "iterable", "sequence",  "boolean", "true",        "false",   "even",    "odd",   "divisibleby",
    "equalto",  "eq",        "ne",      "callable",    "lower",   "upper",   "in",    "gt",
    "ge",       "lt",        "le",      "greaterthan", "lessthan"};

class Parser {
 public:
  Parser(std::vector<Tok> toks) : t_(std::move(toks)) {}
  const Tok& Peek(int k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool IsOp(const char* op, int k = 0) const {
    return Peek(k).kind == Tok::kOp && Peek(k).text == op;
  }
  bool IsName(const char* n, int k = 0) const {
    return Peek(k).kind == Tok::kName && Peek(k).text == n;
  }
  bool AtEnd() const { return Peek().kind == Tok::kEnd; }
  Tok Next() { return t_[std::min(p_++, t_.size() - 1)]; }
  void Expect(const char* op) {
    if (!IsOp(op)) Err(absl::StrCat("expected '", op, "', found '", Peek().text, "'"));
    ++p_;
  }
  std::string ExpectName() {
    if (Peek().kind != Tok::kName) Err(absl::StrCat("expected a name, found '", Peek().text, "'"));
    return Next().text;
  }
  [[noreturn]] void Err(const std::string& m) const {
    throw Error{absl::StrCat("line ", Peek().line, ": ", m)};
  }

  ExprP Make(Expr::Kind k) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = Peek().line;
    return e;
  }

  ExprP Expression() {  // the conditional expression
    // Nesting is bounded (the parser recurses): deeper is refused, not a stack overflow.
    struct Depth {
      int& d;
      explicit Depth(int& depth) : d(depth) { ++d; }
      ~Depth() { --d; }
    } depth(depth_);
    if (depth_ > 100) Err("expressions nested too deeply");
    ExprP e = Or();
    if (IsName("if")) {
      ++p_;
      ExprP c = Make(Expr::kCond);
      ExprP cond = Or();
      ExprP other;
      if (IsName("else")) {
        ++p_;
        other = Expression();
      }
      c->args = {cond, e, other};
      return c;
    }
    return e;
  }
  ExprP Or() {
    ExprP e = And();
    while (IsName("or")) {
      ++p_;
      ExprP o = Make(Expr::kOr);
      o->args = {e, And()};
      e = o;
    }
    return e;
  }
  ExprP And() {
    ExprP e = Not();
    while (IsName("and")) {
      ++p_;
      ExprP o = Make(Expr::kAnd);
      o->args = {e, Not()};
      e = o;
    }
    return e;
  }
  ExprP Not() {
    if (IsName("not")) {
      ++p_;
      ExprP o = Make(Expr::kNot);
      o->args = {Not()};
      return o;
    }
    return Compare();
  }
  ExprP Compare() {
    ExprP e = Math1();
    for (;;) {
      std::string op;
      bool neg = false;
      if (Peek().kind == Tok::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" || Peek().text == ">" ||
           Peek().text == "<=" || Peek().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        ++p_;
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        p_ += 2;
        op = "in";
        neg = true;
      } else {
        return e;
      }
      ExprP b = Make(Expr::kBinary);
      b->name = op;
      b->negated = neg;
      b->args = {e, Math1()};
      e = b;
    }
  }
  ExprP Math1() {
    ExprP e = Concat();
    while (IsOp("+") || IsOp("-")) {
      ExprP b = Make(Expr::kBinary);
      b->name = Next().text;
      b->args = {e, Concat()};
      e = b;
    }
    return e;
  }
  ExprP Concat() {
    ExprP e = Math2();
    while (IsOp("~")) {
      ++p_;
      ExprP b = Make(Expr::kConcat);
      b->args = {e, Math2()};
      e = b;
    }
    return e;
  }
  ExprP Math2() {
    ExprP e = Pow();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      ExprP b = Make(Expr::kBinary);
      b->name = Next().text;
      b->args = {e, Pow()};
      e = b;
    }
    return e;
  }
  ExprP Pow() {
    ExprP e = Unary();
    while (IsOp("**")) {
      ++p_;
      ExprP b = Make(Expr::kBinary);
      b->name = "**";
      b->args = {e, Unary()};
      e = b;
    }
    return e;
  }
  ExprP Unary() {
    if (++unary_ > 1000) Err("too many unary operators");
    if (IsOp("-") || IsOp("+")) {
      ExprP u = Make(Expr::kUnary);
      u->name = Next().text;
      u->args = {Unary()};
      return u;
    }
    return FilterExpr(Postfix(Primary()));
  }
  void Args(ExprP call) {  // after '('
    while (!IsOp(")")) {
      if (Peek().kind == Tok::kName && IsOp("=", 1)) {
        std::string k = Next().text;
        ++p_;
        call->kwargs.emplace_back(k, Expression());
      } else {
        call->args.push_back(Expression());
      }
      if (!IsOp(",")) break;
      ++p_;
    }
    Expect(")");
  }
  ExprP Postfix(ExprP e) {
    for (;;) {
      if (IsOp(".")) {
        ++p_;
        ExprP a = Make(Expr::kAttr);
        a->name = ExpectName();
        a->args = {e};
        e = a;
      } else if (IsOp("[")) {
        ++p_;
        ExprP lo, hi, step;
        bool slice = false;
        if (!IsOp(":")) lo = Expression();
        if (IsOp(":")) {
          slice = true;
          ++p_;
          if (!IsOp(":") && !IsOp("]")) hi = Expression();
          if (IsOp(":")) {
            ++p_;
            if (!IsOp("]")) step = Expression();
          }
        }
        Expect("]");
        ExprP s = Make(slice ? Expr::kSlice : Expr::kItem);
        s->args = {e, lo, hi, step};
        e = s;
      } else if (IsOp("(")) {
        ++p_;
        ExprP c = Make(Expr::kCall);
        c->args.push_back(e);
        Args(c);
        e = c;
      } else {
        return e;
      }
    }
  }
  ExprP FilterExpr(ExprP e) {
    for (;;) {
      if (IsOp("|")) {
        ++p_;
        ExprP f = Make(Expr::kFilter);
        f->name = ExpectName();
        if (kFilters.count(f->name) == 0)
          Err(absl::StrCat("the filter '", f->name, "' is not supported"));
        f->args.push_back(e);
        if (IsOp("(")) {
          ++p_;
          Args(f);
        }
        e = f;
      } else if (IsName("is")) {
        ++p_;
        ExprP t = Make(Expr::kTest);
        if (IsName("not")) {
          ++p_;
          t->negated = true;
        }
        t->name = ExpectName();
        if (kTests.count(t->name) == 0)
          Err(absl::StrCat("the test '", t->name, "' is not supported"));
        t->args.push_back(e);
        if (IsOp("(")) {
          ++p_;
          Args(t);
        } else if (Peek().kind == Tok::kString || Peek().kind == Tok::kInt ||
                   (Peek().kind == Tok::kName && !IsName("and") && !IsName("or") &&
                    !IsName("else") && !IsName("if"))) {
          t->args.push_back(Primary());  // `is divisibleby 3`
        }
        e = t;
      } else {
        return e;
      }
    }
  }
  ExprP Primary() {
    const Tok tok = Peek();
    if (tok.kind == Tok::kString) {
      std::string s;
      while (Peek().kind == Tok::kString) s += Next().text;  // adjacent literals join
      ExprP l = Make(Expr::kLiteral);
      l->literal = s;
      return l;
    }
    if (tok.kind == Tok::kInt || tok.kind == Tok::kFloat) {
      ++p_;
      ExprP l = Make(Expr::kLiteral);
      if (tok.kind == Tok::kInt)
        l->literal = static_cast<int64_t>(std::stoll(tok.text));
      else
        l->literal = std::stod(tok.text);
      return l;
    }
    if (tok.kind == Tok::kName) {
      ++p_;
      ExprP l = Make(Expr::kLiteral);
      if (tok.text == "true" || tok.text == "True")
        l->literal = true;
      else if (tok.text == "false" || tok.text == "False")
        l->literal = false;
      else if (tok.text == "none" || tok.text == "None")
        l->literal = None{};
      else {
        l->kind = Expr::kName;
        l->name = tok.text;
      }
      return l;
    }
    if (IsOp("(")) {
      ++p_;
      ExprP e = Expression();
      if (IsOp(",")) {  // a tuple: a list here
        ExprP l = Make(Expr::kList);
        l->args.push_back(e);
        while (IsOp(",")) {
          ++p_;
          if (IsOp(")")) break;
          l->args.push_back(Expression());
        }
        e = l;
      }
      Expect(")");
      return e;
    }
    if (IsOp("[")) {
      ++p_;
      ExprP l = Make(Expr::kList);
      while (!IsOp("]")) {
        l->args.push_back(Expression());
        if (!IsOp(",")) break;
        ++p_;
      }
      Expect("]");
      return l;
    }
    if (IsOp("{")) {
      ++p_;
      ExprP d = Make(Expr::kDict);
      while (!IsOp("}")) {
        ExprP k = Expression();
        Expect(":");
        d->args.push_back(k);
        d->args.push_back(Expression());
        if (!IsOp(",")) break;
        ++p_;
      }
      Expect("}");
      return d;
    }
    Err(absl::StrCat("unexpected '", tok.text, "'"));
  }

 private:
  std::vector<Tok> t_;
  size_t p_ = 0;
  int depth_ = 0;
  int unary_ = 0;
};

// Statements: the segments into a tree.
class TreeBuilder {
 public:
  explicit TreeBuilder(std::vector<Segment> segs) : s_(std::move(segs)) {}

  std::vector<NodeP> Body(const std::set<std::string>& ends, std::string* end_tag,
                          std::unique_ptr<Parser>* end_parser) {
    if (++depth_ > 100) throw Error{"blocks nested too deeply"};
    std::vector<NodeP> out;
    while (i_ < s_.size()) {
      const Segment& seg = s_[i_++];
      if (seg.kind == Segment::kText) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kText;
        n->text = seg.text;
        out.push_back(n);
        continue;
      }
      auto toks = Lex(seg.text, seg.line);
      if (!toks.ok()) throw Error{std::string(toks.status().message())};
      auto p = std::make_unique<Parser>(std::move(*toks));
      if (seg.kind == Segment::kOutput) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kOutput;
        n->line = seg.line;
        n->expr = p->Expression();
        if (!p->AtEnd()) p->Err(absl::StrCat("unexpected '", p->Peek().text, "'"));
        out.push_back(n);
        continue;
      }
      const std::string word = p->ExpectName();
      if (ends.count(word) > 0) {
        *end_tag = word;
        *end_parser = std::move(p);
        --depth_;
        return out;
      }
      out.push_back(Statement(word, *p, seg.line));
    }
    if (!ends.empty()) {
      throw Error{
          absl::StrCat("the template ends inside a block (missing {% ", *ends.rbegin(), " %})")};
    }
    return out;
  }

 private:
  void Done(Parser& p) {
    if (!p.AtEnd()) p.Err(absl::StrCat("unexpected '", p.Peek().text, "'"));
  }
  NodeP Statement(const std::string& word, Parser& p, int line) {
    auto n = std::make_shared<Node>();
    n->line = line;
    std::string end;
    std::unique_ptr<Parser> ep;
    if (word == "if") {
      n->kind = Node::kIf;
      ExprP cond = p.Expression();
      Done(p);
      for (;;) {
        auto body = Body({"elif", "else", "endif"}, &end, &ep);
        n->branches.emplace_back(cond, std::move(body));
        if (end == "elif") {
          cond = ep->Expression();
          Done(*ep);
          continue;
        }
        if (end == "else") {
          Done(*ep);
          n->else_body = Body({"endif"}, &end, &ep);
        }
        Done(*ep);
        return n;
      }
    }
    if (word == "for") {
      n->kind = Node::kFor;
      n->targets.push_back(p.ExpectName());
      while (p.IsOp(",")) {
        p.Next();
        n->targets.push_back(p.ExpectName());
      }
      if (!p.IsName("in")) p.Err("expected 'in'");
      p.Next();
      n->expr = p.Or();  // not the conditional: `if` filters
      if (p.IsName("if")) {
        p.Next();
        n->filter = p.Expression();
      }
      if (p.IsName("recursive")) p.Err("recursive loops are not supported");
      Done(p);
      n->body = Body({"else", "endfor"}, &end, &ep);
      if (end == "else") {
        Done(*ep);
        n->else_body = Body({"endfor"}, &end, &ep);
      }
      Done(*ep);
      return n;
    }
    if (word == "set") {
      n->targets.push_back(p.ExpectName());
      if (p.IsOp(".")) {
        p.Next();
        n->targets.push_back(p.ExpectName());
      }
      if (p.IsOp("=")) {
        p.Next();
        n->kind = Node::kSet;
        n->expr = p.Expression();
        Done(p);
        return n;
      }
      if (p.IsOp(",")) p.Err("unpacking in set is not supported");
      Done(p);
      n->kind = Node::kSetBlock;
      n->body = Body({"endset"}, &end, &ep);
      Done(*ep);
      return n;
    }
    if (word == "macro") {
      n->kind = Node::kMacro;
      n->targets.push_back(p.ExpectName());
      p.Expect("(");
      while (!p.IsOp(")")) {
        std::string name = p.ExpectName();
        ExprP def;
        if (p.IsOp("=")) {
          p.Next();
          def = p.Expression();
        }
        n->params.emplace_back(name, def);
        if (!p.IsOp(",")) break;
        p.Next();
      }
      p.Expect(")");
      Done(p);
      n->body = Body({"endmacro"}, &end, &ep);
      Done(*ep);
      return n;
    }
    if (word == "break" || word == "continue") {
      n->kind = word == "break" ? Node::kBreak : Node::kContinue;
      Done(p);
      return n;
    }
    if (word == "generation") {  // transformers' marker of assistant text: renders its body
      n->kind = Node::kBlock;
      Done(p);
      n->body = Body({"endgeneration"}, &end, &ep);
      Done(*ep);
      return n;
    }
    throw Error{absl::StrCat("line ", line, ": the statement '", word, "' is not supported")};
  }

  std::vector<Segment> s_;
  size_t i_ = 0;
  int depth_ = 0;
};

struct Macro {
  NodeP node;
};

// ---- Rendering ----

struct LoopControl {
  bool brk;
};

class Renderer {
 public:
  explicit Renderer(Dict globals) { scopes_.push_back(std::move(globals)); }

  void Render(const std::vector<NodeP>& body, std::string* out) {
    for (const NodeP& n : body) Exec(*n, out);
  }

 private:
  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (const Value* v = Find(*it, name)) return *v;
    }
    return Undefined{};
  }
  void Assign(const std::string& name, Value v) {
    Dict& d = scopes_.back();
    for (auto& [k, x] : d) {
      if (k == name) {
        x = std::move(v);
        return;
      }
    }
    d.emplace_back(name, std::move(v));
  }

  void Exec(const Node& n, std::string* out) {
    // Bounded work and output, whatever the template (a runaway loop is an error, not a hang).
    if (++steps_ > kMaxSteps) Fail("the template runs too long (over 100,000 steps)");
    if (out->size() > kMaxString) Fail("the template's output is too long");
    switch (n.kind) {
      case Node::kText:
        *out += n.text;
        return;
      case Node::kOutput:
        *out += ToString(Eval(*n.expr));
        return;
      case Node::kBlock:
        return Render(n.body, out);
      case Node::kIf:
        for (const auto& [cond, body] : n.branches) {
          if (Truthy(Eval(*cond))) return Render(body, out);
        }
        return Render(n.else_body, out);
      case Node::kSet: {
        Value v = Eval(*n.expr);
        if (n.targets.size() == 2) {
          Value ns = Lookup(n.targets[0]);
          if (!ns.is_dict() || !ns.is_namespace)
            Fail(absl::StrCat("line ", n.line, ": '", n.targets[0], "' is not a namespace"));
          for (auto& [k, x] : ns.dict()) {
            if (k == n.targets[1]) {
              x = std::move(v);
              return;
            }
          }
          ns.dict().emplace_back(n.targets[1], std::move(v));
          return;
        }
        return Assign(n.targets[0], std::move(v));
      }
      case Node::kSetBlock: {
        std::string s;
        Render(n.body, &s);
        return Assign(n.targets[0], s);
      }
      case Node::kMacro:
        return Assign(n.targets[0],
                      Value(std::make_shared<Macro>(Macro{std::make_shared<Node>(n)})));
      case Node::kBreak:
        throw LoopControl{true};
      case Node::kContinue:
        throw LoopControl{false};
      case Node::kFor:
        return For(n, out);
    }
  }

  void For(const Node& n, std::string* out) {
    Value it = Eval(*n.expr);
    List items;
    if (it.is_list()) {
      items = it.list();
    } else if (it.is_dict()) {
      for (const auto& [k, v] : it.dict()) items.push_back(k);
    } else if (it.is_str()) {
      for (auto& c : Chars(it.str())) items.push_back(c);
    } else if (!it.undefined() && !it.none()) {
      Fail(absl::StrCat("line ", n.line, ": cannot loop over ", Repr(it)));
    }
    // The `if` filter applies before loop variables count.
    auto bind = [&](const Value& item) {
      if (n.targets.size() == 1) {
        Assign(n.targets[0], item);
      } else {
        if (!item.is_list() || item.list().size() != n.targets.size())
          Fail(absl::StrCat("line ", n.line, ": cannot unpack ", Repr(item)));
        for (size_t k = 0; k < n.targets.size(); ++k) Assign(n.targets[k], item.list()[k]);
      }
    };
    List kept;
    if (n.filter) {
      for (const Value& item : items) {
        scopes_.emplace_back();
        bind(item);
        const bool keep = Truthy(Eval(*n.filter));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
    } else {
      kept = std::move(items);
    }
    if (kept.empty()) return Render(n.else_body, out);
    const int64_t len = static_cast<int64_t>(kept.size());
    for (int64_t k = 0; k < len; ++k) {
      scopes_.emplace_back();
      bind(kept[k]);
      Dict loop = {{"index", k + 1},
                   {"index0", k},
                   {"revindex", len - k},
                   {"revindex0", len - k - 1},
                   {"first", k == 0},
                   {"last", k == len - 1},
                   {"length", len},
                   {"previtem", k > 0 ? kept[k - 1] : Value()},
                   {"nextitem", k + 1 < len ? kept[k + 1] : Value()}};
      Assign("loop", MakeDict(std::move(loop)));
      bool stop = false;
      try {
        Render(n.body, out);
      } catch (const LoopControl& c) {
        stop = c.brk;
      }
      // Jinja scoping: assignments inside a loop do not leave it.
      scopes_.pop_back();
      if (stop) break;
    }
  }

  Value CallMacro(const Macro& m, std::vector<Value>& args,
                  std::vector<std::pair<std::string, Value>>& kwargs) {
    const Node& n = *m.node;
    Dict scope;
    for (size_t k = 0; k < n.params.size(); ++k) {
      Value v;
      if (k < args.size()) {
        v = args[k];
      } else {
        bool found = false;
        for (auto& [name, x] : kwargs) {
          if (name == n.params[k].first) {
            v = x;
            found = true;
          }
        }
        if (!found && n.params[k].second) v = Eval(*n.params[k].second);
      }
      scope.emplace_back(n.params[k].first, v);
    }
    if (scopes_.size() > 200) Fail("macro calls nested too deeply");
    scopes_.push_back(std::move(scope));
    std::string s;
    Render(n.body, &s);
    scopes_.pop_back();
    return s;
  }

  Value Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLiteral:
        return e.literal;
      case Expr::kName:
        return Lookup(e.name);
      case Expr::kList: {
        List l;
        for (const auto& a : e.args) l.push_back(Eval(*a));
        return MakeList(std::move(l));
      }
      case Expr::kDict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = Eval(*e.args[k]);
          d.emplace_back(ToString(key), Eval(*e.args[k + 1]));
        }
        return MakeDict(std::move(d));
      }
      case Expr::kAttr:
        return Attr(Eval(*e.args[0]), e.name);
      case Expr::kItem:
        return Item(Eval(*e.args[0]), Eval(*e.args[1]));
      case Expr::kSlice:
        return Slice(e);
      case Expr::kCall:
        return Call(e);
      case Expr::kFilter:
        return Filter(e);
      case Expr::kTest: {
        bool r = Test(e);
        return e.negated ? !r : r;
      }
      case Expr::kUnary: {
        Value v = Eval(*e.args[0]);
        if (!v.is_num() && !v.is_bool()) Fail(absl::StrCat("bad operand for unary ", e.name));
        if (e.name == "+") return v;
        if (v.is_float()) return -v.f();
        if (v.i() == INT64_MIN) Fail("integer overflow");
        return -v.i();
      }
      case Expr::kNot:
        return !Truthy(Eval(*e.args[0]));
      case Expr::kAnd: {
        Value a = Eval(*e.args[0]);
        return Truthy(a) ? Eval(*e.args[1]) : a;
      }
      case Expr::kOr: {
        Value a = Eval(*e.args[0]);
        return Truthy(a) ? a : Eval(*e.args[1]);
      }
      case Expr::kCond:
        if (Truthy(Eval(*e.args[0]))) return Eval(*e.args[1]);
        return e.args[2] ? Eval(*e.args[2]) : Value();
      case Expr::kConcat:
        return ToString(Eval(*e.args[0])) + ToString(Eval(*e.args[1]));
      case Expr::kBinary:
        return Binary(e);
    }
    return Undefined{};
  }

  Value Binary(const Expr& e) {
    Value a = Eval(*e.args[0]);
    Value b = Eval(*e.args[1]);
    const std::string& op = e.name;
    auto where = [&] { return absl::StrCat("line ", e.line, ": "); };
    if (op == "==") return Equal(a, b);
    if (op == "!=") return !Equal(a, b);
    if (op == "in") {
      bool r = false;
      if (b.is_str() && a.is_str())
        r = b.str().find(a.str()) != std::string::npos;
      else if (b.is_list()) {
        for (const Value& x : b.list()) r = r || Equal(a, x);
      } else if (b.is_dict() && a.is_str())
        r = Find(b.dict(), a.str()) != nullptr;
      else if (b.undefined() || b.none())
        Fail(where() + "'in' on an undefined value");
      return e.negated ? !r : r;
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      if (a.is_str() && b.is_str())
        c = a.str().compare(b.str());
      else if ((a.is_num() || a.is_bool()) && (b.is_num() || b.is_bool()))
        c = a.f() < b.f() ? -1 : a.f() > b.f() ? 1 : 0;
      else
        Fail(where() + "cannot compare " + Repr(a) + " and " + Repr(b));
      return op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
    }
    if (op == "+") {
      if (a.is_str() && b.is_str()) return a.str() + b.str();
      if (a.is_list() && b.is_list()) {
        List l = a.list();
        l.insert(l.end(), b.list().begin(), b.list().end());
        return MakeList(std::move(l));
      }
    }
    if (op == "*" && a.is_str() && b.is_int()) {
      if (b.i() > 0 && a.str().size() * static_cast<uint64_t>(b.i()) > kMaxString)
        Fail(where() + "string repetition too long");
      std::string s;
      for (int64_t k = 0; k < b.i(); ++k) s += a.str();
      return s;
    }
    if (!(a.is_num() || a.is_bool()) || !(b.is_num() || b.is_bool()))
      Fail(where() + "unsupported operands for " + op + ": " + Repr(a) + " and " + Repr(b));
    const bool ints = !a.is_float() && !b.is_float();
    if (ints && (op == "+" || op == "-" || op == "*" || op == "**")) {
      // Python's integers do not overflow; ours refuse to (no undefined behaviour).
      int64_t r = 0;
      bool overflow = false;
      if (op == "+") overflow = __builtin_add_overflow(a.i(), b.i(), &r);
      if (op == "-") overflow = __builtin_sub_overflow(a.i(), b.i(), &r);
      if (op == "*") overflow = __builtin_mul_overflow(a.i(), b.i(), &r);
      if (op == "**") {
        if (b.i() < 0) return std::pow(a.f(), b.f());
        r = 1;
        for (int64_t k = 0; k < b.i() && !overflow; ++k) {
          overflow = __builtin_mul_overflow(r, a.i(), &r);
          if (r == 0 || r == 1) break;  // 0**n, 1**n
          if (a.i() == -1) {
            r = b.i() % 2 == 0 ? 1 : -1;
            break;
          }
        }
      }
      if (overflow) Fail(where() + "integer overflow");
      return r;
    }
    if (op == "+") return a.f() + b.f();
    if (op == "-") return a.f() - b.f();
    if (op == "*") return a.f() * b.f();
    if (op == "**") return std::pow(a.f(), b.f());
    if (b.f() == 0) Fail(where() + "division by zero");
    if (op == "/") return a.f() / b.f();
    if (op == "//") {
      if (ints) {
        if (a.i() == INT64_MIN && b.i() == -1) Fail(where() + "integer overflow");
        int64_t q = a.i() / b.i();
        if ((a.i() % b.i() != 0) && ((a.i() < 0) != (b.i() < 0))) --q;
        return q;
      }
      return std::floor(a.f() / b.f());
    }
    // %: Python's sign follows the divisor.
    if (ints) {
      if (b.i() == -1) return int64_t{0};
      int64_t r = a.i() % b.i();
      if (r != 0 && ((r < 0) != (b.i() < 0))) r += b.i();
      return r;
    }
    double r = std::fmod(a.f(), b.f());
    if (r != 0 && ((r < 0) != (b.f() < 0))) r += b.f();
    return r;
  }

  Value Attr(const Value& obj, const std::string& name) {
    if (obj.is_dict()) {
      if (const Value* v = Find(obj.dict(), name)) return *v;
    }
    // Only the methods Method implements: anything else is undefined, as a missing key is.
    static const std::set<std::string> kStr = {
        "strip", "lstrip",  "rstrip", "lower",      "upper", "startswith", "endswith",
        "split", "replace", "title",  "capitalize", "find",  "count",      "join"};
    static const std::set<std::string> kDict = {"items", "keys", "values", "get"};
    const bool method = (obj.is_str() && kStr.count(name) > 0) ||
                        (obj.is_dict() && kDict.count(name) > 0) ||
                        (obj.is_list() && name == "append");
    if (method) {
      auto self = obj;
      return Value(std::make_shared<Builtin>(
          [this, self, name](std::vector<Value>& args,
                             std::vector<std::pair<std::string, Value>>& kw) {
            return Method(self, name, args, kw);
          }));
    }
    return Undefined{};
  }

  Value Item(const Value& obj, const Value& key) {
    if (obj.is_dict()) {
      if (const Value* v = Find(obj.dict(), ToString(key))) return *v;
      return Undefined{};
    }
    if ((obj.is_list() || obj.is_str()) && (key.is_int() || key.is_bool())) {
      const int64_t n = obj.is_list() ? obj.list().size() : Chars(obj.str()).size();
      int64_t k = key.i();
      if (k < 0) k += n;
      if (k < 0 || k >= n) return Undefined{};
      if (obj.is_list()) return obj.list()[k];
      return Chars(obj.str())[k];
    }
    if (key.is_str()) return Attr(obj, key.str());
    return Undefined{};
  }

  Value Slice(const Expr& e) {
    Value obj = Eval(*e.args[0]);
    List items;
    const bool is_str = obj.is_str();
    if (is_str) {
      for (auto& c : Chars(obj.str())) items.push_back(c);
    } else if (obj.is_list()) {
      items = obj.list();
    } else {
      Fail(absl::StrCat("line ", e.line, ": cannot slice ", Repr(obj)));
    }
    const int64_t n = items.size();
    int64_t step = e.args[3] ? Eval(*e.args[3]).i() : 1;
    if (step == 0) Fail("slice step cannot be zero");
    auto norm = [&](const ExprP& x, int64_t def) {
      if (!x) return def;
      Value v = Eval(*x);
      if (v.none()) return def;
      int64_t k = v.i();
      if (k < 0) k += n;
      if (step > 0) return std::clamp<int64_t>(k, 0, n);
      return std::clamp<int64_t>(k, -1, n - 1);
    };
    const int64_t lo = norm(e.args[1], step > 0 ? 0 : n - 1);
    const int64_t hi = norm(e.args[2], step > 0 ? n : -1);
    List out;
    for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) out.push_back(items[k]);
    if (is_str) {
      std::string s;
      for (const Value& c : out) s += c.str();
      return s;
    }
    return MakeList(std::move(out));
  }

  Value Call(const Expr& e) {
    std::vector<Value> args;
    std::vector<std::pair<std::string, Value>> kwargs;
    for (size_t k = 1; k < e.args.size(); ++k) args.push_back(Eval(*e.args[k]));
    for (const auto& [name, x] : e.kwargs) kwargs.emplace_back(name, Eval(*x));
    Value f = Eval(*e.args[0]);
    if (auto* m = std::get_if<std::shared_ptr<Macro>>(&f.v)) return CallMacro(**m, args, kwargs);
    if (auto* b = std::get_if<std::shared_ptr<Builtin>>(&f.v)) return (**b)(args, kwargs);
    std::string what = e.args[0]->kind == Expr::kName   ? e.args[0]->name
                       : e.args[0]->kind == Expr::kAttr ? e.args[0]->name
                                                        : "a value";
    Fail(absl::StrCat("line ", e.line, ": '", what, "' is not callable (not supported)"));
  }

  static std::string Strip(const std::string& s, const std::string& chars, bool left, bool right) {
    size_t b = 0, e = s.size();
    if (left) {
      while (b < e && chars.find(s[b]) != std::string::npos) ++b;
    }
    if (right) {
      while (e > b && chars.find(s[e - 1]) != std::string::npos) --e;
    }
    return s.substr(b, e - b);
  }

  Value Method(const Value& self, const std::string& name, std::vector<Value>& a,
               std::vector<std::pair<std::string, Value>>& kw) {
    auto arg = [&](size_t k) -> Value { return k < a.size() ? a[k] : Value(); };
    if (self.is_str()) {
      const std::string& s = self.str();
      static const std::string kSpace = " \t\n\r\f\v";
      const std::string chars = arg(0).is_str() ? arg(0).str() : kSpace;
      if (name == "strip") return Strip(s, chars, true, true);
      if (name == "lstrip") return Strip(s, chars, true, false);
      if (name == "rstrip") return Strip(s, chars, false, true);
      if (name == "lower" || name == "upper") {
        std::string r = s;
        for (char& c : r) c = name == "lower" ? std::tolower(c) : std::toupper(c);
        return r;
      }
      if (name == "startswith" || name == "endswith") {
        List prefixes = arg(0).is_list() ? arg(0).list() : List{arg(0)};
        for (const Value& p : prefixes) {
          if (!p.is_str()) Fail(name + " takes a string");
          const std::string& x = p.str();
          if (name == "startswith"
                  ? s.rfind(x, 0) == 0
                  : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0)
            return true;
        }
        return false;
      }
      if (name == "split") {
        List out;
        int64_t maxsplit = arg(1).is_int() ? arg(1).i() : -1;
        if (!arg(0).is_str()) {
          size_t i = 0;
          while (i < s.size()) {
            while (i < s.size() && kSpace.find(s[i]) != std::string::npos) ++i;
            if (i >= s.size()) break;
            size_t j = i;
            if (maxsplit == 0) {
              out.push_back(Strip(s.substr(i), kSpace, false, true));
              break;
            }
            while (j < s.size() && kSpace.find(s[j]) == std::string::npos) ++j;
            out.push_back(s.substr(i, j - i));
            --maxsplit;
            i = j;
          }
          return MakeList(std::move(out));
        }
        const std::string sep = arg(0).str();
        if (sep.empty()) Fail("split: empty separator");
        size_t i = 0;
        for (;;) {
          size_t j = s.find(sep, i);
          if (j == std::string::npos || maxsplit == 0) {
            out.push_back(s.substr(i));
            break;
          }
          out.push_back(s.substr(i, j - i));
          i = j + sep.size();
          --maxsplit;
        }
        return MakeList(std::move(out));
      }
      if (name == "replace") {
        if (!arg(0).is_str() || !arg(1).is_str()) Fail("replace takes two strings");
        return Replace(s, arg(0).str(), arg(1).str(), arg(2).is_int() ? arg(2).i() : -1);
      }
      if (name == "title" || name == "capitalize") return ApplyFilter(name, self, a, kw, 0);
      if (name == "find") {
        size_t p = s.find(arg(0).is_str() ? arg(0).str() : "");
        return p == std::string::npos ? int64_t{-1} : static_cast<int64_t>(p);
      }
      if (name == "count") {
        if (!arg(0).is_str() || arg(0).str().empty()) Fail("count takes a non-empty string");
        int64_t c = 0;
        for (size_t p = s.find(arg(0).str()); p != std::string::npos;
             p = s.find(arg(0).str(), p + arg(0).str().size()))
          ++c;
        return c;
      }
      if (name == "join") {
        if (!arg(0).is_list()) Fail("join takes a list");
        std::string r;
        bool first = true;
        for (const Value& x : arg(0).list()) {
          if (!first) r += s;
          first = false;
          r += ToString(x);
        }
        return r;
      }
    } else if (self.is_dict()) {
      if (name == "items") {
        List out;
        for (const auto& [k, v] : self.dict()) out.push_back(MakeList({k, v}));
        return MakeList(std::move(out));
      }
      if (name == "keys" || name == "values") {
        List out;
        for (const auto& [k, v] : self.dict()) out.push_back(name == "keys" ? Value(k) : v);
        return MakeList(std::move(out));
      }
      if (name == "get") {
        if (const Value* v = Find(self.dict(), ToString(arg(0)))) return *v;
        return a.size() > 1 ? a[1] : Value(None{});
      }
    } else if (self.is_list()) {
      if (name == "append") {
        self.list().push_back(arg(0));
        return None{};
      }
    }
    Fail(absl::StrCat("the method '", name, "' is not supported on ", Repr(self).substr(0, 40)));
  }

  static std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                             int64_t count) {
    if (from.empty()) return s;
    std::string r;
    size_t i = 0;
    for (;;) {
      size_t j = s.find(from, i);
      if (j == std::string::npos || count == 0) break;
      r += s.substr(i, j - i) + to;
      i = j + from.size();
      --count;
    }
    return r + s.substr(i);
  }

  Value Filter(const Expr& e) {
    Value x = Eval(*e.args[0]);
    std::vector<Value> args;
    std::vector<std::pair<std::string, Value>> kwargs;
    for (size_t k = 1; k < e.args.size(); ++k) args.push_back(Eval(*e.args[k]));
    for (const auto& [name, v] : e.kwargs) kwargs.emplace_back(name, Eval(*v));
    return ApplyFilter(e.name, x, args, kwargs, e.line);
  }

  Value ApplyFilter(const std::string& f, const Value& x, std::vector<Value>& a,
                    std::vector<std::pair<std::string, Value>>& kw, int line) {
    auto arg = [&](size_t k, const char* name) -> Value {
      if (k < a.size()) return a[k];
      for (auto& [n, v] : kw)
        if (n == name) return v;
      return Undefined{};
    };
    auto where = [&] { return absl::StrCat("line ", line, ": filter ", f, ": "); };
    if (f == "safe" || f == "e" || f == "escape") return x;  // no HTML escaping (as transformers)
    if (f == "trim") return Strip(ToString(x), " \t\n\r\f\v", true, true);
    if (f == "string") return ToString(x);
    if (f == "upper" || f == "lower") {
      std::string r = ToString(x);
      for (char& c : r) c = f == "lower" ? std::tolower(c) : std::toupper(c);
      return r;
    }
    if (f == "capitalize") {
      std::string r = ToString(x);
      for (size_t k = 0; k < r.size(); ++k) r[k] = k == 0 ? std::toupper(r[k]) : std::tolower(r[k]);
      return r;
    }
    if (f == "title") {
      std::string r = ToString(x);
      bool start = true;
      for (char& c : r) {
        if (std::isalpha(static_cast<unsigned char>(c))) {
          c = start ? std::toupper(c) : std::tolower(c);
          start = false;
        } else {
          start = true;
        }
      }
      return r;
    }
    if (f == "length" || f == "count") {
      if (x.is_str()) return static_cast<int64_t>(Chars(x.str()).size());
      if (x.is_list()) return static_cast<int64_t>(x.list().size());
      if (x.is_dict()) return static_cast<int64_t>(x.dict().size());
      if (x.undefined()) return int64_t{0};
      Fail(where() + "no length of " + Repr(x));
    }
    if (f == "default" || f == "d") {
      const bool boolean = Truthy(arg(1, "boolean"));
      if (x.undefined() || (boolean && !Truthy(x))) {
        Value d = arg(0, "default_value");
        return d.undefined() ? Value(std::string()) : d;
      }
      return x;
    }
    if (f == "tojson") {
      std::string out;
      Value indent = arg(0, "indent");
      ToJson(x, indent.is_int() ? static_cast<int>(indent.i()) : 0, 0, &out);
      return out;
    }
    if (f == "join") {
      if (!x.is_list()) Fail(where() + "needs a list");
      Value sep = arg(0, "d");
      Value attr = arg(1, "attribute");
      std::string r;
      bool first = true;
      for (const Value& v : x.list()) {
        if (!first) r += sep.is_str() ? sep.str() : "";
        first = false;
        r += ToString(attr.is_str() ? Attr(v, attr.str()) : v);
      }
      return r;
    }
    if (f == "first" || f == "last") {
      if (x.is_list()) {
        if (x.list().empty()) return Undefined{};
        return f == "first" ? x.list().front() : x.list().back();
      }
      if (x.is_str()) {
        auto c = Chars(x.str());
        if (c.empty()) return Undefined{};
        return f == "first" ? c.front() : c.back();
      }
      Fail(where() + "needs a list");
    }
    if (f == "list") {
      if (x.is_list()) return MakeList(x.list());
      List out;
      if (x.is_str()) {
        for (auto& c : Chars(x.str())) out.push_back(c);
      } else if (x.is_dict()) {
        for (auto& [k, v] : x.dict()) out.push_back(k);
      }
      return MakeList(std::move(out));
    }
    if (f == "reverse") {
      if (x.is_str()) {
        auto c = Chars(x.str());
        std::string r;
        for (auto it = c.rbegin(); it != c.rend(); ++it) r += *it;
        return r;
      }
      if (x.is_list()) {
        List l(x.list().rbegin(), x.list().rend());
        return MakeList(std::move(l));
      }
      Fail(where() + "needs a list or a string");
    }
    if (f == "int") {
      if (x.is_num() || x.is_bool()) return static_cast<int64_t>(x.f());
      if (x.is_str()) {
        try {
          return static_cast<int64_t>(std::stoll(x.str()));
        } catch (...) {
        }
      }
      return int64_t{0};
    }
    if (f == "float") {
      if (x.is_num() || x.is_bool()) return x.f();
      if (x.is_str()) {
        try {
          return std::stod(x.str());
        } catch (...) {
        }
      }
      return 0.0;
    }
    if (f == "abs") {
      if (x.is_int()) return std::abs(x.i());
      if (x.is_float()) return std::fabs(x.f());
      Fail(where() + "needs a number");
    }
    if (f == "replace") {
      if (!arg(0, "old").is_str() || !arg(1, "new").is_str()) Fail(where() + "takes two strings");
      Value count = arg(2, "count");
      return Replace(ToString(x), arg(0, "old").str(), arg(1, "new").str(),
                     count.is_int() ? count.i() : -1);
    }
    if (f == "items") {
      if (!x.is_dict()) Fail(where() + "needs a mapping");
      List out;
      for (const auto& [k, v] : x.dict()) out.push_back(MakeList({k, v}));
      return MakeList(std::move(out));
    }
    if (f == "indent") {
      Value w = arg(0, "width");
      const std::string pad = w.is_str() ? w.str() : std::string(w.is_int() ? w.i() : 4, ' ');
      const bool first = Truthy(arg(1, "first"));
      const bool blank = Truthy(arg(2, "blank"));
      std::string s = ToString(x), out;
      size_t i = 0;
      bool line_start = true;
      bool first_line = true;
      while (i <= s.size()) {
        size_t j = s.find('\n', i);
        std::string ln = s.substr(i, j == std::string::npos ? std::string::npos : j - i);
        if ((!first_line || first) && (blank || !ln.empty())) out += pad;
        out += ln;
        if (j == std::string::npos) break;
        out += '\n';
        i = j + 1;
        first_line = false;
      }
      (void)line_start;
      return out;
    }
    if (f == "selectattr" || f == "rejectattr" || f == "select" || f == "reject") {
      if (!x.is_list()) Fail(where() + "needs a list");
      const bool attr_form = f == "selectattr" || f == "rejectattr";
      const bool select = f == "selectattr" || f == "select";
      const size_t t = attr_form ? 1 : 0;
      List out;
      for (const Value& item : x.list()) {
        Value v = attr_form ? Attr(item, ToString(a.at(0))) : item;
        bool r;
        if (a.size() > t) {
          const std::string test = ToString(a[t]);
          std::vector<Value> targs(a.begin() + t + 1, a.end());
          r = RunTest(test, v, targs, line);
        } else {
          r = Truthy(v);
        }
        if (r == select) out.push_back(item);
      }
      return MakeList(std::move(out));
    }
    if (f == "map") {
      if (!x.is_list()) Fail(where() + "needs a list");
      Value attr = arg(99, "attribute");
      List out;
      for (const Value& item : x.list()) {
        if (attr.is_str()) {
          Value v = Attr(item, attr.str());
          if (v.undefined()) {
            Value d = arg(99, "default");
            if (!d.undefined()) v = d;
          }
          out.push_back(v);
        } else if (!a.empty()) {
          std::vector<Value> rest(a.begin() + 1, a.end());
          out.push_back(ApplyFilter(ToString(a[0]), item, rest, kw, line));
        } else {
          out.push_back(item);
        }
      }
      return MakeList(std::move(out));
    }
    if (f == "unique") {
      if (!x.is_list()) Fail(where() + "needs a list");
      List out;
      for (const Value& v : x.list()) {
        bool seen = false;
        for (const Value& o : out) seen = seen || Equal(o, v);
        if (!seen) out.push_back(v);
      }
      return MakeList(std::move(out));
    }
    if (f == "sum" || f == "min" || f == "max") {
      if (!x.is_list()) Fail(where() + "needs a list");
      if (f == "sum") {
        Value s = int64_t{0};
        for (const Value& v : x.list()) {
          if (!v.is_num()) Fail(where() + "needs numbers");
          s = (s.is_float() || v.is_float()) ? Value(s.f() + v.f()) : Value(s.i() + v.i());
        }
        return s;
      }
      if (x.list().empty()) return Undefined{};
      Value best = x.list()[0];
      for (const Value& v : x.list()) {
        const bool less = v.is_str() && best.is_str() ? v.str() < best.str() : v.f() < best.f();
        const bool more = v.is_str() && best.is_str() ? v.str() > best.str() : v.f() > best.f();
        if (f == "min" ? less : more) best = v;
      }
      return best;
    }
    if (f == "round") {
      Value p = arg(0, "precision");
      const double scale = std::pow(10.0, p.is_int() ? p.i() : 0);
      return std::round(x.f() * scale) / scale;
    }
    if (f == "wordcount") {
      std::vector<Value> none;
      std::vector<std::pair<std::string, Value>> nokw;
      return static_cast<int64_t>(Method(ToString(x), "split", none, nokw).list().size());
    }
    Fail(where() + "is not supported");
  }

  bool RunTest(const std::string& t, const Value& x, std::vector<Value>& a, int line) {
    auto arg = [&](size_t k) -> Value { return k < a.size() ? a[k] : Value(); };
    if (t == "defined") return !x.undefined();
    if (t == "undefined") return x.undefined();
    if (t == "none") return x.none();
    if (t == "string") return x.is_str();
    if (t == "number") return x.is_num();
    if (t == "integer") return x.is_int();
    if (t == "float") return x.is_float();
    if (t == "boolean") return x.is_bool();
    if (t == "true") return x.is_bool() && std::get<bool>(x.v);
    if (t == "false") return x.is_bool() && !std::get<bool>(x.v);
    if (t == "mapping") return x.is_dict();
    if (t == "iterable") return x.is_list() || x.is_dict() || x.is_str();
    if (t == "sequence") return x.is_list() || x.is_str() || x.is_dict();
    if (t == "callable")
      return std::holds_alternative<std::shared_ptr<Macro>>(x.v) ||
             std::holds_alternative<std::shared_ptr<Builtin>>(x.v);
    if (t == "even" || t == "odd") {
      if (!x.is_int()) return false;
      return (x.i() % 2 == 0) == (t == "even");
    }
    if (t == "divisibleby") return arg(0).i() != 0 && x.i() % arg(0).i() == 0;
    if (t == "equalto" || t == "eq") return Equal(x, arg(0));
    if (t == "ne") return !Equal(x, arg(0));
    if (t == "lower" || t == "upper") {
      if (!x.is_str()) return false;
      for (char c : x.str())
        if (t == "lower" ? std::isupper(c) : std::islower(c)) return false;
      return true;
    }
    if (t == "in") {
      const Value& b = arg(0);
      if (b.is_list()) {
        for (const Value& v : b.list())
          if (Equal(x, v)) return true;
        return false;
      }
      if (b.is_str() && x.is_str()) return b.str().find(x.str()) != std::string::npos;
      if (b.is_dict() && x.is_str()) return Find(b.dict(), x.str()) != nullptr;
      return false;
    }
    if (t == "gt" || t == "greaterthan") return x.f() > arg(0).f();
    if (t == "ge") return x.f() >= arg(0).f();
    if (t == "lt" || t == "lessthan") return x.f() < arg(0).f();
    if (t == "le") return x.f() <= arg(0).f();
    Fail(absl::StrCat("line ", line, ": the test '", t, "' is not supported"));
  }

  bool Test(const Expr& e) {
    Value x = Eval(*e.args[0]);
    std::vector<Value> args;
    for (size_t k = 1; k < e.args.size(); ++k) args.push_back(Eval(*e.args[k]));
    return RunTest(e.name, x, args, e.line);
  }

  std::vector<Dict> scopes_;
  int64_t steps_ = 0;
};

Value MakeBuiltin(Builtin f) { return Value(std::make_shared<Builtin>(std::move(f))); }

Dict Globals() {
  Dict g;
  g.emplace_back(
      "raise_exception",
      MakeBuiltin([](std::vector<Value>& a, std::vector<std::pair<std::string, Value>>&) -> Value {
        Fail(a.empty() ? "raise_exception" : ToString(a[0]));
      }));
  g.emplace_back("namespace",
                 MakeBuiltin([](std::vector<Value>& a,
                                std::vector<std::pair<std::string, Value>>& kw) -> Value {
                   Dict d;
                   if (!a.empty() && a[0].is_dict()) d = a[0].dict();
                   for (auto& [k, v] : kw) d.emplace_back(k, v);
                   Value ns = MakeDict(std::move(d));
                   ns.is_namespace = true;
                   return ns;
                 }));
  g.emplace_back("dict", MakeBuiltin([](std::vector<Value>&,
                                        std::vector<std::pair<std::string, Value>>& kw) -> Value {
                   Dict d(kw.begin(), kw.end());
                   return MakeDict(std::move(d));
                 }));
  g.emplace_back("range", MakeBuiltin([](std::vector<Value>& a,
                                         std::vector<std::pair<std::string, Value>>&) -> Value {
                   int64_t lo = 0, hi = 0, step = 1;
                   if (a.size() == 1) hi = a[0].i();
                   if (a.size() >= 2) lo = a[0].i(), hi = a[1].i();
                   if (a.size() >= 3) step = a[2].i();
                   if (step == 0) Fail("range: step cannot be zero");
                   List l;
                   for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) {
                     l.push_back(k);
                     if (l.size() > 10000) Fail("range: more than 10,000 items");
                   }
                   return MakeList(std::move(l));
                 }));
  g.emplace_back(
      "strftime_now",
      MakeBuiltin([](std::vector<Value>& a, std::vector<std::pair<std::string, Value>>&) -> Value {
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[256];
        const std::string fmt = a.empty() ? "%Y-%m-%d" : ToString(a[0]);
        const size_t n = std::strftime(buf, sizeof(buf), fmt.c_str(), &tm);
        return std::string(buf, n);
      }));
  return g;
}

}  // namespace jinja

ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(const std::string& source,
                                                                  nlohmann::json special_tokens) {
  auto segments = jinja::Split(source);
  if (!segments.ok())
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", segments.status().message()));
  std::unique_ptr<ChatTemplate> t(new ChatTemplate());
  try {
    jinja::TreeBuilder builder(std::move(*segments));
    std::string end;
    std::unique_ptr<jinja::Parser> ep;
    auto root = std::make_shared<jinja::Node>();
    root->kind = jinja::Node::kBlock;
    root->body = builder.Body({}, &end, &ep);
    t->root_ = std::move(root);
  } catch (const jinja::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.message));
  } catch (const std::exception& e) {  // a number literal out of range
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  }
  t->special_tokens_ =
      special_tokens.is_object() ? std::move(special_tokens) : nlohmann::json::object();
  return t;
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::FromTokenizerConfig(
    const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json config = nlohmann::json::parse(ss.str(), nullptr, false);
  if (config.is_discarded() || !config.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  std::string source;
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null())
    return absl::NotFoundError(absl::StrCat(path, " has no chat_template"));
  if (it->is_string()) {
    source = it->get<std::string>();
  } else if (it->is_array()) {
    for (const auto& t : *it) {
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") &&
          t["template"].is_string())
        source = t["template"].get<std::string>();
    }
    if (source.empty())
      return absl::InvalidArgumentError(absl::StrCat(path, ": chat_template has no 'default'"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": chat_template is not a string"));
  }
  nlohmann::json special = nlohmann::json::object();
  for (const auto& [k, v] : config.items()) {
    if (!absl::EndsWith(k, "_token")) continue;
    if (v.is_string())
      special[k] = v;
    else if (v.is_object() && v.contains("content") && v["content"].is_string())
      special[k] = v["content"];
  }
  auto t = Parse(source, special);
  if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& messages,
                                                 bool add_generation_prompt) const {
  nlohmann::json context = special_tokens_;
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  return RenderContext(context);
}

absl::StatusOr<std::string> ChatTemplate::RenderContext(const nlohmann::json& context) const {
  jinja::Dict globals = jinja::Globals();
  for (const auto& [k, v] : context.items()) globals.emplace_back(k, jinja::FromJson(v));
  jinja::Renderer r(std::move(globals));
  std::string out;
  try {
    r.Render(root_->body, &out);
  } catch (const jinja::Error& e) {
    return absl::InvalidArgumentError(e.message);
  } catch (const jinja::LoopControl&) {
    return absl::InvalidArgumentError("break or continue outside a loop");
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.what()));
  }
  return out;
}

namespace {

constexpr const char* kDeepseekMoe =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}";

}  // namespace

std::optional<std::string> BuiltinChatTemplate(const std::string& name) {
  if (name == "deepseek-moe") return std::string(kDeepseekMoe);
  return std::nullopt;
}

std::string BuiltinChatTemplateNames() { return "deepseek-moe"; }

}  // namespace dsmoe
