#include "router/placement.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "core/io/mapped_file.h"

namespace dsmoe::router {

Placement::Placement(int num_servers, std::vector<std::vector<std::vector<int>>> holders)
    : num_servers_(num_servers), holders_(std::move(holders)) {
  shares_.resize(holders_.size());
  for (size_t l = 0; l < holders_.size(); ++l) {
    shares_[l].resize(holders_[l].size());
    for (size_t e = 0; e < holders_[l].size(); ++e)
      shares_[l][e].assign(holders_[l][e].size(), 1.0 / holders_[l][e].size());
  }
}

absl::StatusOr<Placement> Placement::FromHolders(
    int num_servers, std::vector<std::vector<std::vector<int>>> holders,
    std::vector<std::vector<std::vector<double>>> shares, uint64_t version) {
  if (num_servers < 1) return absl::InvalidArgumentError("at least one expert server is needed");
  for (size_t l = 0; l < holders.size(); ++l) {
    for (size_t e = 0; e < holders[l].size(); ++e) {
      const auto& h = holders[l][e];
      if (h.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " expert ", e, ": needs a non-empty list of servers"));
      }
      std::set<int> seen;
      for (int s : h) {
        if (s < 0 || s >= num_servers || !seen.insert(s).second) {
          return absl::InvalidArgumentError(absl::StrCat("layer ", l, " expert ", e, ": server ", s,
                                                         " is out of range or listed twice"));
        }
      }
    }
  }
  Placement p(num_servers, std::move(holders));
  p.version_ = version;
  if (shares.empty()) return p;
  if (shares.size() != p.holders_.size())
    return absl::InvalidArgumentError("shares must cover the same layers as the servers");
  for (size_t l = 0; l < shares.size(); ++l) {
    if (shares[l].empty()) continue;  // equal shares in this layer
    if (shares[l].size() != p.holders_[l].size()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": shares list ",
                                                     shares[l].size(), " experts, servers ",
                                                     p.holders_[l].size()));
    }
    for (size_t e = 0; e < shares[l].size(); ++e) {
      const auto& w = shares[l][e];
      if (w.size() != p.holders_[l][e].size()) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " expert ", e, ": ", w.size(),
                                                       " shares for ", p.holders_[l][e].size(),
                                                       " servers"));
      }
      double total = 0;
      for (double x : w) {
        if (!(x > 0) || !std::isfinite(x)) {
          return absl::InvalidArgumentError(
              absl::StrCat("layer ", l, " expert ", e, ": shares must be positive"));
        }
        total += x;
      }
      for (size_t r = 0; r < w.size(); ++r) p.shares_[l][e][r] = w[r] / total;
    }
  }
  return p;
}

absl::StatusOr<Placement> Placement::Compute(const ModelConfig& c, int num_servers, int replicas,
                                             Strategy strategy) {
  if (num_servers < 1) return absl::InvalidArgumentError("at least one expert server is needed");
  if (replicas < 1 || replicas > num_servers) {
    return absl::InvalidArgumentError(absl::StrCat("replicas must be in [1, ", num_servers,
                                                   "] (one copy per server at most), got ",
                                                   replicas));
  }
  std::vector<std::vector<std::vector<int>>> holders(c.num_hidden_layers);
  int64_t moe_index = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    const int64_t E = c.n_routed_experts;
    holders[l].resize(E);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t first =
          strategy == Strategy::kRoundRobin ? (e + moe_index) % num_servers : e * num_servers / E;
      for (int r = 0; r < replicas; ++r)
        holders[l][e].push_back(static_cast<int>((first + r) % num_servers));
    }
    ++moe_index;
  }
  return Placement(num_servers, std::move(holders));
}

absl::StatusOr<Placement> Placement::FromJson(const std::string& text, const ModelConfig& c,
                                              const std::string& source) {
  auto bad = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", parts...));
  };
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  if (!j.contains("num_servers") || !j["num_servers"].is_number_unsigned() ||
      j["num_servers"].get<int>() < 1) {
    return bad("'num_servers' must be a positive integer");
  }
  const int S = j["num_servers"].get<int>();
  if (!j.contains("layers") || !j["layers"].is_array()) return bad("'layers' must be an array");
  uint64_t version = 1;
  if (j.contains("version")) {
    if (!j["version"].is_number_unsigned()) return bad("'version' must be a non-negative integer");
    version = j["version"].get<uint64_t>();
  }
  std::vector<std::vector<std::vector<int>>> holders(c.num_hidden_layers);
  std::vector<std::vector<std::vector<double>>> shares(c.num_hidden_layers);
  for (const auto& layer : j["layers"]) {
    if (!layer.is_object() || !layer.contains("layer") || !layer["layer"].is_number_unsigned() ||
        !layer.contains("servers") || !layer["servers"].is_array()) {
      return bad("each entry of 'layers' needs an integer 'layer' and an array 'servers'");
    }
    const int64_t l = layer["layer"].get<int64_t>();
    if (l >= c.num_hidden_layers || !c.IsMoeLayer(l))
      return bad("layer ", l, " is not a MoE layer of this model");
    if (!holders[l].empty()) return bad("layer ", l, " is listed twice");
    if (static_cast<int64_t>(layer["servers"].size()) != c.n_routed_experts) {
      return bad("layer ", l, " lists ", layer["servers"].size(), " experts, the model has ",
                 c.n_routed_experts);
    }
    holders[l].resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      const auto& list = layer["servers"][e];
      if (!list.is_array() || list.empty())
        return bad("layer ", l, " expert ", e, ": needs a non-empty list of servers");
      std::set<int> seen;
      for (const auto& s : list) {
        if (!s.is_number_unsigned() || s.get<int>() >= S) {
          return bad("layer ", l, " expert ", e, ": server ", s.dump(), " is not in [0, ", S, ")");
        }
        if (!seen.insert(s.get<int>()).second)
          return bad("layer ", l, " expert ", e, ": server listed twice");
        holders[l][e].push_back(s.get<int>());
      }
    }
    if (layer.contains("shares")) {  // optional: per expert, one positive number per server
      const auto& w = layer["shares"];
      if (!w.is_array() || w.size() != holders[l].size())
        return bad("layer ", l, ": 'shares' must list every expert");
      shares[l].resize(holders[l].size());
      for (size_t e = 0; e < w.size(); ++e) {
        if (!w[e].is_array() || w[e].size() != holders[l][e].size())
          return bad("layer ", l, " expert ", e, ": one share per server is needed");
        for (const auto& x : w[e]) {
          if (!x.is_number() || !(x.get<double>() > 0))
            return bad("layer ", l, " expert ", e, ": shares must be positive numbers");
          shares[l][e].push_back(x.get<double>());
        }
      }
    }
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.IsMoeLayer(l) && holders[l].empty()) return bad("MoE layer ", l, " has no placement");
  }
  auto p = FromHolders(S, std::move(holders), std::move(shares), version);
  if (!p.ok()) return bad(p.status().message());
  return p;
}

absl::StatusOr<Placement> Placement::LoadOrCompute(const std::string& file,
                                                   const ModelConfig& config, int num_servers,
                                                   int replicas) {
  if (file.empty()) return Compute(config, num_servers, replicas, Strategy::kRoundRobin);
  DSMOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(file, 64 << 20));
  return FromJson(text, config, file);
}

std::string Placement::ToJson() const {
  nlohmann::ordered_json j;
  j["version"] = version_;
  j["num_servers"] = num_servers_;
  j["layers"] = nlohmann::ordered_json::array();
  for (size_t l = 0; l < holders_.size(); ++l) {
    if (holders_[l].empty()) continue;
    nlohmann::ordered_json layer = {{"layer", l}, {"servers", holders_[l]}};
    // Shares only when some replicated expert's split is not even (the default).
    bool even = true;
    for (size_t e = 0; e < shares_[l].size(); ++e) {
      for (double x : shares_[l][e])
        even = even && std::abs(x - 1.0 / shares_[l][e].size()) < 1e-12;
    }
    if (!even) layer["shares"] = shares_[l];
    j["layers"].push_back(std::move(layer));
  }
  return j.dump() + "\n";
}

std::pair<int, int> Placement::CopiesRange() const {
  int lo = 0, hi = 0;
  bool any = false;
  for (const auto& layer : holders_) {
    for (const auto& holders : layer) {
      const int n = static_cast<int>(holders.size());
      lo = any ? std::min(lo, n) : n;
      hi = any ? std::max(hi, n) : n;
      any = true;
    }
  }
  return {lo, hi};
}

WeightSelection Placement::SelectionFor(int server) const {
  const std::vector<std::pair<int64_t, int64_t>> experts = ExpertsOf(server);
  return WeightSelection::RoutedExperts({experts.begin(), experts.end()});
}

std::vector<std::pair<int64_t, int64_t>> Placement::ExpertsOf(int server) const {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (size_t l = 0; l < holders_.size(); ++l) {
    for (size_t e = 0; e < holders_[l].size(); ++e) {
      const auto& h = holders_[l][e];
      if (std::find(h.begin(), h.end(), server) != h.end()) out.emplace_back(l, e);
    }
  }
  return out;
}

}  // namespace dsmoe::router
