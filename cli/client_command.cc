#include "cli/client_command.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "cli/cluster_state.h"
#include "cli/id_list.h"
#include "core/io/mapped_file.h"
#include "core/rpc/server.h"
#include "dsmoe/v1/gateway.grpc.pb.h"

namespace dsmoe::cli {

namespace {
const char* FinishName(dsmoe::v1::FinishReason r) {
  switch (r) {
    case dsmoe::v1::FINISH_REASON_STOP:
      return "stop";
    case dsmoe::v1::FINISH_REASON_LENGTH:
      return "length";
    case dsmoe::v1::FINISH_REASON_ABORT:
      return "abort";
    default:
      return "unspecified";
  }
}
// The gateway's address, channel security and API key, from the flags and the cluster state.
struct Target {
  std::string gateway;
  rpc::TransportSecurity security;
  std::string api_key;  // empty: none sent
};

absl::StatusOr<Target> ResolveTarget(const ClientGenerateOptions& o) {
  nlohmann::json state;
  if (o.gateway.empty() || !o.state_dir.empty()) {
    auto read = ReadClusterState(o.state_dir);
    if (!read.ok() && o.gateway.empty()) {
      return absl::NotFoundError(absl::StrCat("no --gateway given and ", read.status().message()));
    }
    DSMOE_RETURN_IF_ERROR(read.status());
    state = std::move(*read);
  }
  Target t;
  t.gateway = !o.gateway.empty() ? o.gateway : state.value("gateway", "");
  DSMOE_ASSIGN_OR_RETURN(t.security,
                         ClientSecurity(state, {o.ca, o.cert, o.key, o.server_name, o.insecure}));
  std::string key_file = o.api_key_file;
  if (!o.api_key.empty()) {
    t.api_key = o.api_key;
  } else if (const char* env = std::getenv("DSMOE_API_KEY"); key_file.empty() && env != nullptr) {
    t.api_key = env;
  } else {
    if (key_file.empty()) key_file = StateSecurityField(state, "api_key_file");
    if (!key_file.empty()) {
      DSMOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(key_file, 4096));
      t.api_key = std::string(absl::StripAsciiWhitespace(text));
    }
  }
  return t;
}

nlohmann::ordered_json LogprobsJson(const dsmoe::v1::TokenLogprobs& lp) {
  nlohmann::ordered_json top = nlohmann::ordered_json::array();
  for (const dsmoe::v1::TopLogprob& t : lp.top_logprobs()) {
    top.push_back({{"id", t.token_id()}, {"token", t.token()}, {"logprob", t.logprob()}});
  }
  return {{"id", lp.token_id()},
          {"token", lp.token()},
          {"logprob", lp.logprob()},
          {"top_logprobs", std::move(top)}};
}

}  // namespace

int RunClientGenerate(const ClientGenerateOptions& o) {
  dsmoe::v1::GenerateRequest request;
  if (!o.prompt.empty()) {
    request.set_text(o.prompt);
  } else {
    auto ids = ParseIdList(o.ids, "--ids");
    if (!ids.ok()) {
      std::cerr << "dsmoe: error: " << ids.status().message() << "\n";
      return 2;
    }
    request.mutable_token_ids()->mutable_ids()->Add(ids->begin(), ids->end());
  }
  request.set_max_tokens(static_cast<uint32_t>(o.sampling.max_tokens));
  request.set_temperature(static_cast<float>(o.sampling.temperature));
  request.set_top_k(static_cast<uint32_t>(o.sampling.top_k));
  request.set_top_p(static_cast<float>(o.sampling.top_p));
  request.set_seed(o.sampling.seed);
  request.set_ignore_eos(o.sampling.ignore_eos);
  if (o.sampling.logprobs >= 0) {
    request.set_logprobs(true);
    request.set_top_logprobs(o.sampling.logprobs);
  }
  if (o.prompt_logprobs >= 0) request.set_prompt_logprobs(o.prompt_logprobs);
  if (!o.sampling.stop_ids.empty()) {
    auto stops = ParseIdList(o.sampling.stop_ids, "--stop-ids");
    if (!stops.ok()) {
      std::cerr << "dsmoe: error: " << stops.status().message() << "\n";
      return 2;
    }
    request.mutable_stop_token_ids()->Add(stops->begin(), stops->end());
  }
  for (const std::string& stop : o.stop) request.add_stop(stop);
  auto target = ResolveTarget(o);
  if (!target.ok()) {
    std::cerr << "dsmoe: error: " << target.status().message() << "\n";
    return 2;
  }
  auto stub = dsmoe::v1::Gateway::NewStub(rpc::MakeChannel(target->gateway, target->security));
  grpc::ClientContext context;
  if (!target->api_key.empty()) context.AddMetadata("authorization", "Bearer " + target->api_key);
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(o.timeout_seconds * 1000)));
  auto reader = stub->Generate(&context, request);
  dsmoe::v1::GenerateResponse message;
  std::vector<uint32_t> ids;
  std::string text;
  nlohmann::ordered_json logprobs = nlohmann::ordered_json::array();
  nlohmann::ordered_json prompt_logprobs = nlohmann::ordered_json::array();
  dsmoe::v1::GenerateResponse last;
  // A text prompt means the gateway has a tokenizer: print only text, so that a token whose
  // text is held back (half a UTF-8 character, a possible stop string) prints nothing until it
  // completes. With token ids in, print ids until the gateway's first text shows it has one.
  bool text_stream = !o.prompt.empty();
  while (reader->Read(&message)) {
    ids.insert(ids.end(), message.token_ids().begin(), message.token_ids().end());
    text += message.text();
    text_stream = text_stream || !message.text().empty();
    for (const dsmoe::v1::TokenLogprobs& lp : message.logprobs())
      logprobs.push_back(LogprobsJson(lp));
    for (const dsmoe::v1::TokenLogprobs& lp : message.prompt_logprobs())
      prompt_logprobs.push_back(LogprobsJson(lp));
    if (!o.json) {
      if (text_stream) {
        std::cout << message.text() << std::flush;
      } else {
        for (uint32_t id : message.token_ids()) std::cout << id << " " << std::flush;
      }
    }
    if (message.finish_reason() != dsmoe::v1::FINISH_REASON_UNSPECIFIED) last = message;
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    std::cerr << "dsmoe: error: " << status.error_message() << " (gRPC code " << status.error_code()
              << ")\n";
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE && ids.empty() &&
        !target->security.insecure() && !target->security.has_certificate()) {
      // A gateway that requires client certificates closes the connection in the TLS
      // handshake, before it can say why: say it here.
      std::cerr << "dsmoe: hint: if the gateway requires a client certificate (cluster up "
                   "--gateway-require-client-cert, or the chart's tls.gatewayClientAuth=require), "
                   "pass --cert and --key, or --state-dir of that cluster\n";
    }
    if (o.json) {
      // What was delivered before the failure is kept, beside the error.
      nlohmann::ordered_json j;
      j["ids"] = ids;
      j["text"] = text;
      j["error"] = {{"code", static_cast<int>(status.error_code())},
                    {"message", status.error_message()}};
      std::cout << j.dump() << "\n";
    } else {
      std::cout << "\n";
    }
    return 1;
  }
  if (o.json) {
    nlohmann::ordered_json j;
    j["ids"] = ids;
    j["text"] = text;
    j["finish_reason"] = FinishName(last.finish_reason());
    j["usage"] = {{"prompt_tokens", last.usage().prompt_tokens()},
                  {"completion_tokens", last.usage().completion_tokens()},
                  {"time_to_first_token_seconds", last.usage().time_to_first_token_seconds()}};
    if (request.logprobs()) j["logprobs"] = std::move(logprobs);
    if (request.has_prompt_logprobs()) j["prompt_logprobs"] = std::move(prompt_logprobs);
    std::cout << j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
  } else {
    std::cout << "\n";
    std::cerr << "finish_reason=" << FinishName(last.finish_reason())
              << "  prompt_tokens=" << last.usage().prompt_tokens()
              << "  completion_tokens=" << last.usage().completion_tokens()
              << "  ttft=" << last.usage().time_to_first_token_seconds() << " s\n";
  }
  return 0;
}

}  // namespace dsmoe::cli
