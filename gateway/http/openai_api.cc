#include "gateway/http/openai_api.h"

#include <chrono>
#include <cmath>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <span>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gateway/http/completion_request.h"

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

using request_parsing::Bad;
using request_parsing::BadParam;
using request_parsing::CheckKnown;
using request_parsing::Params;
using request_parsing::ParseBody;

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

// The echoed prompt's part of the legacy logprobs: its first token with null logprob and
// alternatives (nothing predicts it), then `prompt` (the gateway's prompt_logprobs, from the 2nd
// token on). text_offset counts the characters of the tokens before, as for generated tokens
// (and OpenAI's and vLLM's); for a text prompt, whose echo is the text as sent, special tokens
// the tokenizer added (BOS) take no room. `tokenizer` may be null (no strings: offsets 0).
json PromptLegacyLogprobs(uint32_t first, const TokenLogprobList& prompt, bool text_prompt,
                          const Tokenizer* tokenizer) {
  json out = NewLegacyLogprobs();
  int64_t offset = 0;
  auto add = [&](uint32_t id, const std::string& token, json logprob, json top) {
    out["tokens"].push_back(token);
    out["token_logprobs"].push_back(std::move(logprob));
    out["top_logprobs"].push_back(std::move(top));
    out["text_offset"].push_back(offset);
    const bool in_text = !(text_prompt && tokenizer != nullptr &&
                           tokenizer->IsSpecialToken(static_cast<int32_t>(id)));
    if (in_text) offset += CodePoints(token);
  };
  std::string first_text;
  if (tokenizer != nullptr) {
    const int32_t one = static_cast<int32_t>(first);
    auto t = tokenizer->Decode(std::span<const int32_t>(&one, 1), /*skip_special_tokens=*/false);
    if (t.ok()) first_text = *std::move(t);
  }
  add(first, first_text, nullptr, nullptr);
  for (const dsmoe::v1::TokenLogprobs& lp : prompt) {
    json top = json::object();
    for (const dsmoe::v1::TopLogprob& t : lp.top_logprobs()) {
      if (!top.contains(t.token())) top[t.token()] = t.logprob();
    }
    if (!top.contains(lp.token())) top[lp.token()] = lp.logprob();
    add(lp.token_id(), lp.token(), lp.logprob(), std::move(top));
  }
  return out;
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
  using Choice = CompletionChoice;

  Generation(OpenAiApi& api, Reply reply, bool chat, bool stream, bool include_usage, bool logprobs,
             bool echo_logprobs, std::string authorization, std::string max_tokens_name)
      : api_(api),
        reply_(std::move(reply)),
        chat_(chat),
        stream_(stream),
        include_usage_(include_usage),
        logprobs_(logprobs),
        echo_logprobs_(echo_logprobs),
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
        states_[i].prompt_pending = echo_logprobs_;
        states_[i].first_prompt_token = choices[i].first_prompt_token;
        states_[i].text_prompt = choices[i].text_prompt;
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
    // echo with logprobs: the prompt's part is still to come (with the choice's first message).
    bool prompt_pending = false;
    uint32_t first_prompt_token = 0;
    bool text_prompt = false;
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
      // echo: the prompt goes first (with logprobs, once they came: OnResponse).
      for (size_t i = 0; i < states_.size() && !echo_logprobs_; ++i) {
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
    // The prompt's logprobs come in the choice's first message: the echoed text's offsets,
    // then the completion's from the end of it.
    json prompt_logprobs = nullptr;
    if (s.prompt_pending) {
      s.prompt_pending = false;
      prompt_logprobs = PromptLegacyLogprobs(s.first_prompt_token, r.prompt_logprobs(),
                                             s.text_prompt, api_.options_.tokenizer);
      s.text_offset = CodePoints(s.echo);
      if (!stream_) s.logprobs = std::move(prompt_logprobs);
    }
    if (!stream_) {
      s.text += r.text();
      if (logprobs_) AppendLogprobs(r.logprobs(), s, s.logprobs);
      return;
    }
    StartStreamLocked();
    if (!prompt_logprobs.is_null()) {
      reply_.exchange->SendEvent(Dump(
          Chunk(json::array({ChoiceDelta(index, s.echo, nullptr, std::move(prompt_logprobs))}))));
    }
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
  const bool logprobs_;       // the choices carry logprobs (the request asked)
  const bool echo_logprobs_;  // ... beginning with the echoed prompt's
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
void OpenAiApi::Completions(const HttpRequest& request, bool chat, Reply& reply) {
  const CompletionLimits limits{options_.model_name, options_.max_context,
                                options_.max_tokens_limit, options_.max_n};
  ParsedCompletion parsed = ParseCompletionRequest(request.body, chat, limits, options_.tokenizer,
                                                   options_.chat_template);
  if (!parsed.ok()) {
    const OpenAiError& e = *parsed.error;
    return reply.Error(e.status, e.message, e.param, e.code);
  }
  if (options_.ready && !options_.ready()) {
    return reply.Error(503, "no attention server is ready", "", "", {{"Retry-After", "1"}});
  }
  CompletionRequest& r = parsed.request;
  auto generation = std::make_shared<Generation>(*this, reply, chat, r.stream, r.include_usage,
                                                 r.logprobs, r.echo_logprobs, request.authorization,
                                                 std::move(r.max_tokens_name));
  reply.sent = true;  // the generation answers
  generation->Start(generation, std::move(r.choices));
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
