#include "gateway/http/openai_api.h"

#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/model/sampler.h"
#include "nlohmann/json.hpp"

namespace dsmoe::http {

using json = nlohmann::json;

namespace {

const char* ErrorType(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 404:
      return "invalid_request_error";
    case 429:
      return "rate_limit_error";
    case 500:
    case 503:
    case 504:
      return "server_error";
    default:
      return "invalid_request_error";
  }
}

std::string ErrorBody(int status, const std::string& message, const std::string& param,
                      const std::string& code) {
  json e = {{"message", message},
            {"type", ErrorType(status)},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}};
  return json{{"error", std::move(e)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

// The key of the Authorization header, or "" (RFC 6750: the scheme is case-insensitive).
std::string_view BearerKey(std::string_view header) {
  constexpr std::string_view kScheme = "bearer ";
  if (header.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(std::string(header.substr(0, kScheme.size())),
                              std::string(kScheme))) {
    return {};
  }
  std::string_view key = header.substr(kScheme.size());
  while (!key.empty() && (key.front() == ' ' || key.front() == '\t')) key.remove_prefix(1);
  while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.remove_suffix(1);
  return key;
}

// A 400 naming the parameter, thrown by the request parsing below and caught once in Route.
struct BadParam {
  std::string param, message;
  int status = 400;
  std::string code;
};

[[noreturn]] void Bad(const std::string& param, const std::string& message) {
  throw BadParam{param, message};
}

std::string TypeName(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

// Typed access to the request's fields: absent and null are "not given"; a wrong type or a value
// out of range is a 400 naming the field.
class Params {
 public:
  explicit Params(const json& body) : body_(body) {}
  bool Has(const char* name) const {
    auto it = body_.find(name);
    return it != body_.end() && !it->is_null();
  }
  const json& Get(const char* name) const { return body_.at(name); }
  std::optional<double> Number(const char* name, double lo, double hi) const {
    if (!Has(name)) return std::nullopt;
    const json& v = Get(name);
    if (!v.is_number()) Bad(name, absl::StrCat("'", name, "' must be a number, got ", TypeName(v)));
    const double x = v.get<double>();
    if (!(x >= lo && x <= hi)) {
      Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", x));
    }
    return x;
  }
  std::optional<int64_t> Int(const char* name, int64_t lo, int64_t hi) const {
    if (!Has(name)) return std::nullopt;
    const json& v = Get(name);
    if (!v.is_number_integer()) {
      Bad(name, absl::StrCat("'", name, "' must be an integer, got ", TypeName(v)));
    }
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "]"));
    }
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) {
      Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", x));
    }
    return x;
  }
  std::optional<bool> Bool(const char* name) const {
    if (!Has(name)) return std::nullopt;
    const json& v = Get(name);
    if (!v.is_boolean())
      Bad(name, absl::StrCat("'", name, "' must be a boolean, got ", TypeName(v)));
    return v.get<bool>();
  }
  std::optional<std::string> String(const char* name) const {
    if (!Has(name)) return std::nullopt;
    const json& v = Get(name);
    if (!v.is_string()) Bad(name, absl::StrCat("'", name, "' must be a string, got ", TypeName(v)));
    return v.get<std::string>();
  }

 private:
  const json& body_;
};

const char* FinishReasonName(dsmoe::v1::FinishReason r) {
  switch (r) {
    case dsmoe::v1::FINISH_REASON_STOP:
      return "stop";
    case dsmoe::v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return "abort";
  }
}

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string RandomId(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrCat(prefix, absl::Hex(rng(), absl::kZeroPad16));
}

uint64_t RandomSeed() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

// gRPC's answer as an HTTP status, and OpenAI's error code.
int HttpStatus(const grpc::Status& s, bool has_retry_after) {
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
      return 400;
    case grpc::StatusCode::UNAUTHENTICATED:
      return 401;
    case grpc::StatusCode::PERMISSION_DENIED:
      return 403;
    case grpc::StatusCode::NOT_FOUND:
      return 404;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      // A key's rate limit says when to retry; the gateway's own queue being full is an
      // overload (503), as vLLM and TGI answer it.
      return has_retry_after ? 429 : 503;
    case grpc::StatusCode::UNAVAILABLE:
      return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return 504;
    case grpc::StatusCode::CANCELLED:
      return 499;
    default:
      return 500;
  }
}

// The request field a gateway INVALID_ARGUMENT message is about (its messages begin with it).
std::string ParamOf(const std::string& message, bool chat, const std::string& max_tokens_name) {
  if (absl::StartsWith(message, "max_tokens")) return max_tokens_name;
  if (absl::StartsWith(message, "temperature")) return "temperature";
  if (absl::StartsWith(message, "top_logprobs")) return chat ? "top_logprobs" : "logprobs";
  if (absl::StartsWith(message, "top_p")) return "top_p";
  if (absl::StartsWith(message, "stop_token_ids")) return "stop_token_ids";
  if (absl::StartsWith(message, "stop")) return "stop";
  if (absl::StartsWith(message, "model")) return "model";
  if (absl::StartsWith(message, "prompt") || absl::StartsWith(message, "token_ids") ||
      absl::StartsWith(message, "the prompt") || absl::StartsWith(message, "text prompts"))
    return chat ? "messages" : "prompt";
  return "";
}

// A chat message's content as text: a string, null, or a list of {"type": "text", "text"}.
std::string ContentText(const json& content, size_t i) {
  const std::string param = absl::StrCat("messages[", i, "].content");
  if (content.is_null()) return "";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) Bad(param, "'" + param + "' must be a string or a list of parts");
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      Bad(param, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported");
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

// A token string's bytes, as OpenAI's logprobs give them (`bytes`: a list of ints).
json TokenBytes(const std::string& token) {
  json bytes = json::array();
  for (unsigned char c : token) bytes.push_back(c);
  return bytes;
}

// Characters (code points) of UTF-8 `s`: OpenAI's text_offset counts characters.
int64_t CodePoints(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

using TokenLogprobList = google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs>;

// Chat's format: choices[].logprobs.content[] of {token, logprob, bytes, top_logprobs[]}.
void AppendChatLogprobs(const TokenLogprobList& logprobs, json& content) {
  for (const dsmoe::v1::TokenLogprobs& lp : logprobs) {
    json top = json::array();
    for (const dsmoe::v1::TopLogprob& t : lp.top_logprobs()) {
      top.push_back(
          {{"token", t.token()}, {"logprob", t.logprob()}, {"bytes", TokenBytes(t.token())}});
    }
    content.push_back({{"token", lp.token()},
                       {"logprob", lp.logprob()},
                       {"bytes", TokenBytes(lp.token())},
                       {"top_logprobs", std::move(top)}});
  }
}

// The legacy completions format: parallel lists tokens, token_logprobs, top_logprobs (a dict
// token -> logprob of the N most likely and, as OpenAI's, always the token sampled) and
// text_offset (the token's character offset in the choice's text; `offset` runs on).
json NewLegacyLogprobs() {
  return {{"tokens", json::array()},
          {"token_logprobs", json::array()},
          {"top_logprobs", json::array()},
          {"text_offset", json::array()}};
}
void AppendLegacyLogprobs(const TokenLogprobList& logprobs, int64_t& offset, json& out) {
  for (const dsmoe::v1::TokenLogprobs& lp : logprobs) {
    out["tokens"].push_back(lp.token());
    out["token_logprobs"].push_back(lp.logprob());
    json top = json::object();
    for (const dsmoe::v1::TopLogprob& t : lp.top_logprobs()) {
      // Two ids may decode to one string: the dict keeps the more likely (listed first).
      if (!top.contains(t.token())) top[t.token()] = t.logprob();
    }
    if (!top.contains(lp.token())) top[lp.token()] = lp.logprob();
    out["top_logprobs"].push_back(std::move(top));
    out["text_offset"].push_back(offset);
    offset += CodePoints(lp.token());
  }
}

}  // namespace

struct OpenAiApi::Metrics {
  explicit Metrics(rpc::MetricsRegistry& r)
      : requests(r.Counter("dsmoe_http_requests_total",
                           "HTTP API requests answered, by endpoint and HTTP status")),
        streams_open(&r.Gauge("dsmoe_http_sse_streams_open",
                              "Server-Sent Event streams (stream: true) being written")
                          .Add({})) {}
  void Count(const std::string& endpoint, int status) {
    // Children are few (endpoints x statuses): the family's own lookup is enough off the token
    // path (one count per request).
    requests.Add({{"endpoint", endpoint}, {"status", std::to_string(status)}}).Increment();
  }
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Gauge* streams_open;
};

// Where a request's answer goes, counted once.
struct OpenAiApi::Reply {
  std::shared_ptr<HttpExchange> exchange;
  std::string endpoint;
  Metrics* metrics = nullptr;
  bool sent = false;

  void Send(int status, const std::string& body, std::vector<HttpHeader> headers = {}) {
    if (sent) return;
    sent = true;
    if (metrics != nullptr) metrics->Count(endpoint, status);
    exchange->Respond(status, "application/json", body, std::move(headers));
  }
  void Json(const json& j) { Send(200, j.dump(-1, ' ', false, json::error_handler_t::replace)); }
  void Error(int status, const std::string& message, const std::string& param = "",
             const std::string& code = "", std::vector<HttpHeader> headers = {}) {
    Send(status, ErrorBody(status, message, param, code), std::move(headers));
  }
};

// One /v1/completions or /v1/chat/completions request: its choices' Generate calls, and the
// answer made of them (one JSON body, or an SSE stream).
//
// Lifetime: holds itself (self_) until every call ended; the calls are members and reach it by
// pointer. Thread-safe: reactions of different calls may run at once; state is under mu_.
class OpenAiApi::Generation {
 public:
  struct Choice {
    dsmoe::v1::GenerateRequest request;
    std::string echo;  // the prompt text, when echo
    int prompt = 0;    // the prompt it answers (a completions request may list several)
  };

  Generation(OpenAiApi& api, Reply reply, bool chat, bool stream, bool include_usage, bool logprobs,
             std::string authorization, std::string max_tokens_name)
      : api_(api),
        reply_(std::move(reply)),
        chat_(chat),
        stream_(stream),
        include_usage_(include_usage),
        logprobs_(logprobs),
        authorization_(std::move(authorization)),
        max_tokens_name_(std::move(max_tokens_name)),
        id_(RandomId(chat ? "chatcmpl-" : "cmpl-")),
        created_(NowSeconds()) {}

  // Starts every choice's call. REQUIRES: called once, on a shared_ptr.
  void Start(std::shared_ptr<Generation> self, std::vector<Choice> choices) {
    const size_t n = choices.size();
    {
      absl::MutexLock lock(&mu_);
      self_ = std::move(self);
      states_.resize(n);
      remaining_ = static_cast<int>(n);
      for (size_t i = 0; i < n; ++i) {
        states_[i].echo = choices[i].echo;
        states_[i].prompt = choices[i].prompt;
        states_[i].logprobs = chat_ ? json{{"content", json::array()}} : NewLegacyLogprobs();
      }
    }
    calls_.reserve(n);
    for (size_t i = 0; i < n; ++i)
      calls_.push_back(std::make_unique<Call>(*this, static_cast<int>(i)));
    // Cancels the calls if the client hangs up (at once if it did already).
    // (Weak: the hang-up may come after this request ended and was destroyed.)
    std::weak_ptr<Generation> weak;
    {
      absl::MutexLock lock(&mu_);
      weak = self_;
    }
    reply_.exchange->OnGone([weak] {
      if (auto g = weak.lock()) g->CancelAll();
    });
    for (size_t i = 0; i < n; ++i) calls_[i]->Begin(std::move(choices[i].request));
  }

 private:
  // One choice's Generate stream (a gRPC client reactor).
  class Call final : public grpc::ClientReadReactor<dsmoe::v1::GenerateResponse> {
   public:
    Call(Generation& g, int index) : g_(g), index_(index) {}
    void Begin(dsmoe::v1::GenerateRequest request) {
      request_ = std::move(request);
      if (!g_.authorization_.empty()) context_.AddMetadata("authorization", g_.authorization_);
      g_.api_.stub_->async()->Generate(&context_, &request_, this);
      StartRead(&response_);
      StartCall();
    }
    void Cancel() { context_.TryCancel(); }
    void OnReadDone(bool ok) override {
      if (!ok) return;  // OnDone follows
      g_.OnResponse(index_, response_);
      response_.Clear();
      StartRead(&response_);
    }
    void OnDone(const grpc::Status& status) override {
      std::string retry_after;
      const auto& trailers = context_.GetServerTrailingMetadata();
      if (auto it = trailers.find("retry-after"); it != trailers.end())
        retry_after.assign(it->second.data(), it->second.size());
      g_.OnCallDone(index_, status, retry_after);  // may destroy g_ and this: nothing after
    }

   private:
    Generation& g_;
    const int index_;
    grpc::ClientContext context_;
    dsmoe::v1::GenerateRequest request_;
    dsmoe::v1::GenerateResponse response_;
  };

  struct State {
    std::string text, echo;
    json logprobs;            // non-streamed answers: the choice's logprobs, gathered
    int64_t text_offset = 0;  // completions: characters of the choice's text so far
    std::vector<uint32_t> token_ids;
    int prompt = 0;
    uint32_t prompt_tokens = 0;
    std::string finish_reason;
    bool done = false;
  };

  json ChoiceDelta(int index, const std::string& text, const json& finish,
                   json logprobs = nullptr) const {
    if (chat_) {
      return {{"index", index},
              {"delta", {{"content", text}}},
              {"logprobs", std::move(logprobs)},
              {"finish_reason", finish}};
    }
    return {{"index", index},
            {"text", text},
            {"logprobs", std::move(logprobs)},
            {"finish_reason", finish}};
  }
  // `logprobs` in this request's format (chat or legacy), appended to `out`.
  void AppendLogprobs(const TokenLogprobList& logprobs, State& s, json& out) const {
    if (chat_) {
      AppendChatLogprobs(logprobs, out["content"]);
    } else {
      AppendLegacyLogprobs(logprobs, s.text_offset, out);
    }
  }
  json Chunk(json choices) const {
    return {{"id", id_},
            {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", api_.options_.model_name},
            {"choices", std::move(choices)}};
  }
  static std::string Dump(const json& j) {
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
  }

  // Starts the event stream (the first output: any error before it is a plain HTTP error).
  void StartStreamLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (started_) return;
    started_ = true;
    if (api_.metrics_ != nullptr) api_.metrics_->streams_open->Increment();
    reply_.exchange->StartEvents();
    if (chat_) {
      json choices = json::array();
      for (size_t i = 0; i < states_.size(); ++i) {
        choices.push_back({{"index", i},
                           {"delta", {{"role", "assistant"}, {"content", ""}}},
                           {"logprobs", nullptr},
                           {"finish_reason", nullptr}});
      }
      reply_.exchange->SendEvent(Dump(Chunk(std::move(choices))));
    } else {
      // echo: the prompt goes first.
      for (size_t i = 0; i < states_.size(); ++i) {
        if (!states_[i].echo.empty()) {
          reply_.exchange->SendEvent(
              Dump(Chunk(json::array({ChoiceDelta(i, states_[i].echo, nullptr)}))));
        }
      }
    }
  }

  void OnResponse(int index, const dsmoe::v1::GenerateResponse& r) {
    absl::MutexLock lock(&mu_);
    if (failed_) return;
    State& s = states_[index];
    s.token_ids.insert(s.token_ids.end(), r.token_ids().begin(), r.token_ids().end());
    const bool last = r.finish_reason() != dsmoe::v1::FINISH_REASON_UNSPECIFIED;
    if (last) {
      s.finish_reason = FinishReasonName(r.finish_reason());
      s.prompt_tokens = r.usage().prompt_tokens();
    }
    if (!stream_) {
      s.text += r.text();
      if (logprobs_) AppendLogprobs(r.logprobs(), s, s.logprobs);
      return;
    }
    StartStreamLocked();
    // A message may hold tokens but no text yet (part of a character): its logprobs go out.
    json chunk_logprobs = nullptr;
    if (logprobs_ && r.logprobs_size() > 0) {
      chunk_logprobs = chat_ ? json{{"content", json::array()}} : NewLegacyLogprobs();
      AppendLogprobs(r.logprobs(), s, chunk_logprobs);
    }
    if (!r.text().empty() || last || !chunk_logprobs.is_null()) {
      reply_.exchange->SendEvent(Dump(Chunk(
          json::array({ChoiceDelta(index, r.text(), last ? json(s.finish_reason) : json(nullptr),
                                   std::move(chunk_logprobs))}))));
    }
  }

  void OnCallDone(int index, const grpc::Status& status, const std::string& retry_after) {
    // Keeps this object alive to the end of the function (another call's end may release
    // self_ meanwhile); the last call's end releases it here.
    std::shared_ptr<Generation> keep;
    bool cancel_others = false;
    {
      absl::MutexLock lock(&mu_);
      keep = self_;
      states_[index].done = true;
      if (!status.ok() && !failed_) {
        failed_ = true;
        cancel_others = true;
        Fail(status, retry_after);
      }
      if (--remaining_ == 0) {
        if (!failed_) Succeed();
        keep = std::move(self_);
      }
    }
    if (cancel_others) CancelAll();
  }

  void Fail(const grpc::Status& status, const std::string& retry_after)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int http = HttpStatus(status, !retry_after.empty());
    const std::string message = status.error_message();
    if (started_) {
      // The stream began: an error event, then it closes.
      json error = json::parse(ErrorBody(http, message, "", ""));
      reply_.exchange->SendEvent(Dump(error));
      EndStreamLocked();
      return;
    }
    std::vector<HttpHeader> headers;
    if (!retry_after.empty()) headers.push_back({"Retry-After", retry_after});
    if (http == 503 && retry_after.empty()) headers.push_back({"Retry-After", "1"});
    std::string param = http == 400 ? ParamOf(message, chat_, max_tokens_name_) : "";
    std::string code = http == 404 ? "model_not_found" : http == 401 ? "invalid_api_key" : "";
    reply_.Error(http, message, param, code, std::move(headers));
  }

  void EndStreamLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    reply_.exchange->SendEvent("[DONE]");
    reply_.exchange->EndEvents();
    if (api_.metrics_ != nullptr) {
      api_.metrics_->streams_open->Decrement();
      if (!reply_.sent) api_.metrics_->Count(reply_.endpoint, 200);
    }
    reply_.sent = true;
  }

  json Usage() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // A prompt counts once however many choices answer it.
    std::map<int, uint32_t> prompts;
    uint64_t completion = 0;
    for (const State& s : states_) {
      prompts[s.prompt] = s.prompt_tokens;
      completion += s.token_ids.size();
    }
    uint64_t prompt = 0;
    for (const auto& [p, n] : prompts) prompt += n;
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  void Succeed() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stream_) {
      StartStreamLocked();  // (every call ended without output: still a stream)
      if (include_usage_) {
        json chunk = Chunk(json::array());
        chunk["usage"] = Usage();
        reply_.exchange->SendEvent(Dump(chunk));
      }
      EndStreamLocked();
      return;
    }
    json choices = json::array();
    for (size_t i = 0; i < states_.size(); ++i) {
      const State& s = states_[i];
      if (chat_) {
        choices.push_back({{"index", i},
                           {"message", {{"role", "assistant"}, {"content", s.text}}},
                           {"logprobs", logprobs_ ? s.logprobs : json(nullptr)},
                           {"finish_reason", s.finish_reason}});
      } else {
        choices.push_back({{"index", i},
                           {"text", s.echo + s.text},
                           {"logprobs", logprobs_ ? s.logprobs : json(nullptr)},
                           {"finish_reason", s.finish_reason}});
      }
    }
    json body = {{"id", id_},
                 {"object", chat_ ? "chat.completion" : "text_completion"},
                 {"created", created_},
                 {"model", api_.options_.model_name},
                 {"choices", std::move(choices)},
                 {"usage", Usage()}};
    reply_.Json(body);
  }

  void CancelAll() {
    // The calls live as long as this object, which the caller of CancelAll keeps alive (the
    // exchange's callback runs before OnCallDone released self_, or finds calls ended).
    std::vector<Call*> calls;
    std::shared_ptr<Generation> keep;  // alive while the calls are cancelled
    {
      absl::MutexLock lock(&mu_);
      if (self_ == nullptr) return;  // every call ended
      keep = self_;
      for (size_t i = 0; i < calls_.size(); ++i)
        if (!states_[i].done) calls.push_back(calls_[i].get());
    }
    for (Call* c : calls) c->Cancel();
  }

  OpenAiApi& api_;
  Reply reply_;
  const bool chat_, stream_, include_usage_;
  const bool logprobs_;  // the choices carry logprobs (the request asked)
  const std::string authorization_, max_tokens_name_;
  const std::string id_;
  const int64_t created_;
  std::vector<std::unique_ptr<Call>> calls_;  // set in Start, then const

  absl::Mutex mu_;
  std::shared_ptr<Generation> self_ ABSL_GUARDED_BY(mu_);
  std::vector<State> states_ ABSL_GUARDED_BY(mu_);
  int remaining_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
};

OpenAiApi::OpenAiApi(OpenAiApiOptions options, std::shared_ptr<grpc::Channel> gateway)
    : options_(std::move(options)), stub_(dsmoe::v1::Gateway::NewStub(gateway)) {
  if (options_.metrics != nullptr) metrics_ = std::make_unique<Metrics>(*options_.metrics);
}

OpenAiApi::~OpenAiApi() = default;

void OpenAiApi::Handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange) {
  Reply reply{std::move(exchange), "other", metrics_.get()};
  std::string path = request.target.substr(0, request.target.find('?'));
  static const std::set<std::string> kEndpoints = {
      "/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
      "/ready",     "/tokenize",       "/detokenize"};
  if (kEndpoints.count(path) > 0) reply.endpoint = path;
  try {
    Route(request, reply);
  } catch (const BadParam& b) {
    reply.Error(b.status, b.message, b.param, b.code);
  } catch (const std::exception& e) {
    // A JSON access the checks above missed: still the client's request.
    reply.Error(400, absl::StrCat("invalid request: ", e.what()));
  }
}

void OpenAiApi::Route(const HttpRequest& request, Reply& reply) {
  const std::string path = request.target.substr(0, request.target.find('?'));
  const std::string& method = request.method;
  auto allow = [&](const char* wanted) {
    if (method == wanted) return true;
    reply.Error(405, absl::StrCat(path, " takes ", wanted, ", not ", method));
    return false;
  };
  // Liveness and readiness need no key (as the gRPC health service).
  if (path == "/health") {
    if (allow("GET")) reply.Send(200, "{}");
    return;
  }
  if (path == "/ready") {
    if (!allow("GET")) return;
    if (options_.ready && !options_.ready()) {
      reply.Error(503, "no attention server is ready", "", "", {{"Retry-After", "1"}});
    } else {
      reply.Send(200, R"({"status":"ready"})");
    }
    return;
  }
  if (reply.endpoint == "other") {
    reply.Error(404, absl::StrCat("no such endpoint: ", method, " ", path), "", "unknown_url");
    return;
  }
  if (options_.keys != nullptr) {
    const std::string_view key = BearerKey(request.authorization);
    if (request.authorization.empty()) {
      return reply.Error(401, "no API key; send `Authorization: Bearer <API key>`", "",
                         "invalid_api_key");
    }
    if (key.empty() || options_.keys->Find(key) < 0) {
      return reply.Error(401, "the API key is not valid", "", "invalid_api_key");
    }
  }
  if (path == "/v1/models") {
    if (!allow("GET")) return;
    json model = {{"id", options_.model_name},
                  {"object", "model"},
                  {"created", options_.created},
                  {"owned_by", "dsmoe"},
                  {"max_model_len", options_.max_context}};
    return reply.Json({{"object", "list"}, {"data", json::array({model})}});
  }
  if (!allow("POST")) return;
  if (path == "/v1/completions") return Completions(request, /*chat=*/false, reply);
  if (path == "/v1/chat/completions") return Completions(request, /*chat=*/true, reply);
  if (path == "/tokenize") return Tokenize(request, reply);
  if (path == "/detokenize") return Detokenize(request, reply);
}

namespace {

json ParseBody(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) Bad("", "the request body is not valid JSON");
  if (!j.is_object()) Bad("", "the request body must be a JSON object");
  return j;
}

void CheckKnown(const json& body, const std::set<std::string>& known) {
  for (const auto& [name, value] : body.items()) {
    if (known.count(name) == 0) Bad(name, absl::StrCat("unknown parameter '", name, "'"));
  }
}

// Parameters OpenAI defines that dsmoe does not implement: accepted only at their neutral value.
void CheckNeutral(const Params& p, const json& body) {
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (auto v = p.Number(name, -2, 2); v && *v != 0) {
      Bad(name, absl::StrCat("'", name, "' is not supported (only 0)"));
    }
  }
  if (p.Has("logit_bias")) {
    const json& v = body["logit_bias"];
    if (!v.is_object() || !v.empty()) Bad("logit_bias", "'logit_bias' is not supported");
  }
}

}  // namespace

void OpenAiApi::Completions(const HttpRequest& request, bool chat, Reply& reply) {
  const json body = ParseBody(request.body);
  static const std::set<std::string> kCommon = {"model",
                                                "max_tokens",
                                                "temperature",
                                                "top_p",
                                                "top_k",
                                                "seed",
                                                "stop",
                                                "n",
                                                "stream",
                                                "stream_options",
                                                "user",
                                                "stop_token_ids",
                                                "ignore_eos",
                                                "presence_penalty",
                                                "frequency_penalty",
                                                "logit_bias",
                                                "logprobs"};
  std::set<std::string> known = kCommon;
  if (chat) {
    for (const char* k : {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                          "add_generation_prompt"})
      known.insert(k);
  } else {
    for (const char* k : {"prompt", "echo", "best_of"}) known.insert(k);
  }
  CheckKnown(body, known);
  const Params p(body);
  CheckNeutral(p, body);
  if (auto model = p.String("model"); model && *model != options_.model_name) {
    throw BadParam{"model",
                   absl::StrCat("the model '", *model, "' does not exist (serving '",
                                options_.model_name, "')"),
                   404, "model_not_found"};
  }
  // Logprobs: chat's logprobs (bool) + top_logprobs, completions' logprobs (the number of
  // alternatives). Either way at most 20 alternatives, as the attention server computes.
  bool logprobs = false;
  int64_t top_logprobs = 0;
  if (chat) {
    logprobs = p.Bool("logprobs").value_or(false);
    top_logprobs = p.Int("top_logprobs", 0, kMaxTopLogprobs).value_or(0);
    if (top_logprobs > 0 && !logprobs)
      Bad("top_logprobs", "'top_logprobs' needs 'logprobs' to be true");
    if (p.Has("response_format")) {
      const json& f = body["response_format"];
      if (!f.is_object() || f.value("type", "") != "text")
        Bad("response_format", "only {\"type\": \"text\"} is supported");
    }
  } else if (auto n_logprobs = p.Int("logprobs", 0, kMaxTopLogprobs)) {
    logprobs = true;
    top_logprobs = *n_logprobs;
    // The echoed prompt's tokens would need their log-probabilities too (not computed).
    if (p.Bool("echo").value_or(false))
      Bad("echo", "'echo' together with 'logprobs' is not supported");
  }
  const int64_t n = p.Int("n", 1, options_.max_n).value_or(1);
  if (!chat) {
    if (auto best_of = p.Int("best_of", 1, options_.max_n); best_of && *best_of != n)
      Bad("best_of", "'best_of' other than n is not supported");
  }
  std::string max_tokens_name = "max_tokens";
  std::optional<int64_t> max_tokens = p.Int("max_tokens", 1, INT32_MAX);
  if (chat && p.Has("max_completion_tokens")) {
    max_tokens_name = "max_completion_tokens";
    max_tokens = p.Int("max_completion_tokens", 1, INT32_MAX);
  }
  const auto temperature = p.Number("temperature", 0, 1e6);
  const auto top_p = p.Number("top_p", 0, 1);
  if (top_p && *top_p == 0) Bad("top_p", "'top_p' must be in (0, 1], got 0");
  const auto top_k = p.Int("top_k", -1, INT32_MAX);  // -1: no limit (vLLM's convention)
  const auto seed = p.Int("seed", INT64_MIN, INT64_MAX);
  const bool stream = p.Bool("stream").value_or(false);
  const bool ignore_eos = p.Bool("ignore_eos").value_or(false);
  p.String("user");
  bool include_usage = false;
  if (p.Has("stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) Bad("stream_options", "'stream_options' must be an object");
    if (!stream) Bad("stream_options", "'stream_options' is only allowed with stream: true");
    for (const auto& [k, v] : so.items()) {
      if (k != "include_usage")
        Bad("stream_options", absl::StrCat("unknown stream option '", k, "'"));
      if (!v.is_boolean() && !v.is_null())
        Bad("stream_options", "'stream_options.include_usage' must be a boolean");
      include_usage = v.is_boolean() && v.get<bool>();
    }
  }
  std::vector<std::string> stops;
  if (p.Has("stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      stops.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 16) Bad("stop", "'stop' takes at most 16 strings");
      for (const json& x : s) {
        if (!x.is_string()) Bad("stop", "'stop' must be a string or a list of strings");
        stops.push_back(x.get<std::string>());
      }
    } else {
      Bad("stop", "'stop' must be a string or a list of strings");
    }
    for (const std::string& x : stops)
      if (x.empty()) Bad("stop", "'stop' strings must not be empty");
  }
  std::vector<uint32_t> stop_ids;
  if (p.Has("stop_token_ids")) {
    const json& s = body["stop_token_ids"];
    if (!s.is_array()) Bad("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    for (const json& x : s) {
      if (!x.is_number_unsigned() || x.get<uint64_t>() > UINT32_MAX)
        Bad("stop_token_ids", "'stop_token_ids' must be a list of token ids");
      stop_ids.push_back(x.get<uint32_t>());
    }
  }

  // The prompts: text, or token ids.
  struct Prompt {
    std::optional<std::string> text;
    std::vector<uint32_t> ids;
  };
  std::vector<Prompt> prompts;
  const bool echo = !chat && p.Bool("echo").value_or(false);
  if (chat) {
    if (!p.Has("messages")) Bad("messages", "'messages' is required");
    const json& messages = body["messages"];
    if (!messages.is_array() || messages.empty())
      Bad("messages", "'messages' must be a non-empty list of messages");
    if (options_.tokenizer == nullptr || options_.chat_template == nullptr) {
      Bad("messages",
          "this model has no chat template (tokenizer_config.json's chat_template, or "
          "--chat-template FILE); use /v1/completions");
    }
    json rendered_messages = json::array();
    for (size_t i = 0; i < messages.size(); ++i) {
      const json& m = messages[i];
      const std::string param = absl::StrCat("messages[", i, "]");
      if (!m.is_object()) Bad(param, "'" + param + "' must be an object");
      if (!m.contains("role") || !m["role"].is_string())
        Bad(param + ".role", "'" + param + ".role' must be a string");
      const std::string role = m["role"].get<std::string>();
      static const std::set<std::string> kRoles = {"system", "user", "assistant", "developer",
                                                   "tool"};
      if (kRoles.count(role) == 0) Bad(param + ".role", absl::StrCat("unknown role '", role, "'"));
      json out = m;
      out["content"] = ContentText(m.contains("content") ? m["content"] : json(nullptr), i);
      rendered_messages.push_back(std::move(out));
    }
    const bool add_generation_prompt = p.Bool("add_generation_prompt").value_or(true);
    auto text = options_.chat_template->Render(rendered_messages, add_generation_prompt);
    if (!text.ok()) Bad("messages", absl::StrCat("chat template: ", text.status().message()));
    // The template wrote the special tokens (BOS) itself: none are added again.
    auto ids = options_.tokenizer->Encode(*text, /*add_special_tokens=*/false);
    if (!ids.ok()) Bad("messages", std::string(ids.status().message()));
    prompts.push_back({std::nullopt, std::vector<uint32_t>(ids->begin(), ids->end())});
  } else {
    if (!p.Has("prompt")) Bad("prompt", "'prompt' is required");
    const json& pr = body["prompt"];
    auto ids_of = [&](const json& a) {
      std::vector<uint32_t> ids;
      for (const json& x : a) {
        if (!x.is_number_unsigned() || x.get<uint64_t>() > UINT32_MAX)
          Bad("prompt", "'prompt' token ids must be non-negative integers");
        ids.push_back(x.get<uint32_t>());
      }
      return ids;
    };
    if (pr.is_string()) {
      prompts.push_back({pr.get<std::string>(), {}});
    } else if (pr.is_array() && !pr.empty() && pr[0].is_number()) {
      prompts.push_back({std::nullopt, ids_of(pr)});
    } else if (pr.is_array() && !pr.empty()) {
      for (const json& x : pr) {
        if (x.is_string()) {
          prompts.push_back({x.get<std::string>(), {}});
        } else if (x.is_array()) {
          prompts.push_back({std::nullopt, ids_of(x)});
        } else {
          Bad("prompt", "'prompt' must be a string, a list of strings, or token ids");
        }
      }
    } else {
      Bad("prompt", "'prompt' must be a string, a list of strings, or token ids");
    }
    if (prompts.size() * n > static_cast<size_t>(options_.max_n)) {
      Bad("prompt", absl::StrCat("prompts x n must be at most ", options_.max_n));
    }
  }

  if (options_.ready && !options_.ready()) {
    return reply.Error(503, "no attention server is ready", "", "", {{"Retry-After", "1"}});
  }

  std::vector<Generation::Choice> choices;
  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const Prompt& pr = prompts[pi];
    std::string echo_text;
    if (echo) {
      if (pr.text) {
        echo_text = *pr.text;
      } else if (options_.tokenizer != nullptr) {
        std::vector<int32_t> ids(pr.ids.begin(), pr.ids.end());
        for (int32_t id : ids) {
          if (id < 0 || id >= options_.tokenizer->vocab_size())
            Bad("prompt", absl::StrCat("prompt token id ", id, " is outside the vocabulary"));
        }
        auto t = options_.tokenizer->Decode(ids, /*skip_special_tokens=*/false);
        if (t.ok()) echo_text = *t;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      Generation::Choice c;
      c.prompt = static_cast<int>(pi);
      c.echo = echo_text;
      dsmoe::v1::GenerateRequest& g = c.request;
      g.set_model(options_.model_name);
      if (pr.text) {
        g.set_text(*pr.text);
      } else {
        g.mutable_token_ids()->mutable_ids()->Add(pr.ids.begin(), pr.ids.end());
      }
      if (max_tokens) {
        g.set_max_tokens(static_cast<uint32_t>(*max_tokens));
      } else if (chat) {
        // OpenAI's chat default: as long as the context allows.
        const int64_t room = options_.max_context - static_cast<int64_t>(pr.ids.size());
        g.set_max_tokens(static_cast<uint32_t>(
            std::max<int64_t>(1, std::min<int64_t>(options_.max_tokens_limit, room))));
      }  // completions: the gateway's default (16, as OpenAI's)
      if (temperature) g.set_temperature(static_cast<float>(*temperature));
      if (top_p) g.set_top_p(static_cast<float>(*top_p));
      if (top_k && *top_k > 0) g.set_top_k(static_cast<uint32_t>(*top_k));
      // Choices of one request differ; a given seed makes the whole answer reproducible.
      g.set_seed(seed ? static_cast<uint64_t>(*seed) + static_cast<uint64_t>(j) : RandomSeed());
      for (const std::string& s : stops) g.add_stop(s);
      g.mutable_stop_token_ids()->Add(stop_ids.begin(), stop_ids.end());
      g.set_ignore_eos(ignore_eos);
      g.set_logprobs(logprobs);
      g.set_top_logprobs(static_cast<int32_t>(top_logprobs));
      choices.push_back(std::move(c));
    }
  }
  auto generation = std::make_shared<Generation>(*this, reply, chat, stream, include_usage,
                                                 logprobs, request.authorization, max_tokens_name);
  reply.sent = true;  // the generation answers
  generation->Start(generation, std::move(choices));
}

void OpenAiApi::Tokenize(const HttpRequest& request, Reply& reply) {
  const json body = ParseBody(request.body);
  CheckKnown(body, {"model", "prompt", "add_special_tokens"});
  const Params p(body);
  if (auto model = p.String("model"); model && *model != options_.model_name) {
    throw BadParam{"model", absl::StrCat("the model '", *model, "' does not exist"), 404,
                   "model_not_found"};
  }
  auto prompt = p.String("prompt");
  if (!prompt) Bad("prompt", "'prompt' is required (a string)");
  struct Call {
    grpc::ClientContext context;
    dsmoe::v1::TokenizeRequest request;
    dsmoe::v1::TokenizeResponse response;
    Reply reply;
    int64_t max_context;
  };
  auto call = std::make_shared<Call>();
  call->request.set_text(*prompt);
  call->request.set_add_special_tokens(p.Bool("add_special_tokens").value_or(true));
  if (!request.authorization.empty())
    call->context.AddMetadata("authorization", request.authorization);
  call->reply = reply;
  call->max_context = options_.max_context;
  reply.sent = true;
  stub_->async()->Tokenize(&call->context, &call->request, &call->response, [call](grpc::Status s) {
    if (!s.ok()) {
      const int http = HttpStatus(s, false);
      return call->reply.Error(http, s.error_message(), http == 400 ? "prompt" : "");
    }
    json tokens =
        std::vector<uint32_t>(call->response.token_ids().begin(), call->response.token_ids().end());
    call->reply.Json(
        {{"tokens", tokens}, {"count", tokens.size()}, {"max_model_len", call->max_context}});
  });
}

void OpenAiApi::Detokenize(const HttpRequest& request, Reply& reply) {
  const json body = ParseBody(request.body);
  CheckKnown(body, {"model", "tokens", "skip_special_tokens"});
  const Params p(body);
  if (auto model = p.String("model"); model && *model != options_.model_name) {
    throw BadParam{"model", absl::StrCat("the model '", *model, "' does not exist"), 404,
                   "model_not_found"};
  }
  if (!p.Has("tokens") || !body["tokens"].is_array())
    Bad("tokens", "'tokens' is required (a list of token ids)");
  struct Call {
    grpc::ClientContext context;
    dsmoe::v1::DetokenizeRequest request;
    dsmoe::v1::DetokenizeResponse response;
    Reply reply;
  };
  auto call = std::make_shared<Call>();
  for (const json& x : body["tokens"]) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() > UINT32_MAX)
      Bad("tokens", "'tokens' must be a list of token ids");
    call->request.add_token_ids(x.get<uint32_t>());
  }
  call->request.set_skip_special_tokens(p.Bool("skip_special_tokens").value_or(false));
  if (!request.authorization.empty())
    call->context.AddMetadata("authorization", request.authorization);
  call->reply = reply;
  reply.sent = true;
  stub_->async()->Detokenize(
      &call->context, &call->request, &call->response, [call](grpc::Status s) {
        if (!s.ok()) {
          const int http = HttpStatus(s, false);
          return call->reply.Error(http, s.error_message(), http == 400 ? "tokens" : "");
        }
        call->reply.Json({{"prompt", call->response.text()}});
      });
}

}  // namespace dsmoe::http
