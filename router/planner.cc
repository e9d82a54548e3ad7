#include "router/planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dsmoe::router {

namespace {

// A layer's physical experts ("items") on servers, with per-server loads. Each item carries
// the load it brings (its expert's load × its share).
class Packing {
 public:
  Packing(int num_servers, int slots, int num_experts)
      : S_(num_servers),
        C_(slots),
        E_(num_experts),
        items_on_(num_servers),
        load_(num_servers, 0.0),
        holds_(static_cast<size_t>(num_servers) * num_experts, 0) {}

  int AddItem(int expert, double weight) {
    expert_.push_back(expert);
    weight_.push_back(weight);
    server_.push_back(-1);
    return static_cast<int>(expert_.size()) - 1;
  }
  void Put(int item, int s) {
    server_[item] = s;
    items_on_[s].push_back(item);
    load_[s] += weight_[item];
    holds_[Index(s, expert_[item])] = 1;
  }
  void Remove(int item) {
    const int s = server_[item];
    auto& v = items_on_[s];
    v.erase(std::find(v.begin(), v.end(), item));
    load_[s] -= weight_[item];
    holds_[Index(s, expert_[item])] = 0;
    server_[item] = -1;
  }
  void SetWeight(int item, double w) {
    load_[server_[item]] += w - weight_[item];
    weight_[item] = w;
  }
  bool Holds(int s, int e) const { return holds_[Index(s, e)] != 0; }
  bool Full(int s) const { return static_cast<int>(items_on_[s].size()) >= C_; }
  int ArgMax() const {
    return static_cast<int>(std::max_element(load_.begin(), load_.end()) - load_.begin());
  }
  double Max() const { return *std::max_element(load_.begin(), load_.end()); }

  int num_servers() const { return S_; }
  int num_items() const { return static_cast<int>(expert_.size()); }
  int expert(int item) const { return expert_[item]; }
  double weight(int item) const { return weight_[item]; }
  int server(int item) const { return server_[item]; }
  double load(int s) const { return load_[s]; }
  const std::vector<int>& items_on(int s) const { return items_on_[s]; }

 private:
  size_t Index(int s, int e) const { return static_cast<size_t>(s) * E_ + e; }
  int S_, C_, E_;
  std::vector<int> expert_, server_;
  std::vector<double> weight_;
  std::vector<std::vector<int>> items_on_;
  std::vector<double> load_;
  std::vector<char> holds_;  // [server, expert]
};

struct Shape {
  int S = 0, C = 0, E = 0, R = 0;
  int M = 1;  // copies every expert has at least
};

absl::StatusOr<Shape> Validate(const std::vector<double>& load, const PlannerOptions& o) {
  Shape sh;
  sh.E = static_cast<int>(load.size());
  sh.S = o.num_servers;
  if (sh.E == 0) return absl::InvalidArgumentError("no routed experts to place");
  if (sh.S < 1) return absl::InvalidArgumentError("at least one expert server is needed");
  if (o.num_replicas < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("the replica budget must be >= 0, got ", o.num_replicas));
  if (o.slots_per_server < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("slots per server must be >= 0, got ", o.slots_per_server));
  for (size_t e = 0; e < load.size(); ++e) {
    if (!std::isfinite(load[e]) || load[e] < 0)
      return absl::InvalidArgumentError(absl::StrCat("load of expert ", e, " is ", load[e]));
  }
  if (o.min_copies < 1 || o.min_copies > sh.S) {
    return absl::InvalidArgumentError(absl::StrCat("min_copies ", o.min_copies,
                                                   " must be in [1, the ", sh.S,
                                                   " expert servers]: copies of one expert sit on "
                                                   "different servers"));
  }
  sh.M = o.min_copies;
  const int64_t floor = static_cast<int64_t>(sh.E) * sh.M;  // physical experts the floor needs
  sh.C = o.slots_per_server > 0 ? o.slots_per_server
                                : static_cast<int>((floor + o.num_replicas + sh.S - 1) / sh.S);
  if (static_cast<int64_t>(sh.S) * sh.C < floor) {
    return absl::InvalidArgumentError(absl::StrCat(sh.E, " routed experts x ", sh.M,
                                                   " copies do not fit on ", sh.S, " servers of ",
                                                   sh.C, " slots"));
  }
  // Replicas beyond the free slots, or beyond one per server for every expert, cannot be used.
  sh.R = std::min<int64_t>({static_cast<int64_t>(o.num_replicas),
                            static_cast<int64_t>(sh.S) * sh.C - floor,
                            static_cast<int64_t>(sh.E) * (sh.S - sh.M)});
  return sh;
}

// The loads the planner balances: the measured ones, or all equal when nothing was measured
// (an even spread is then the natural plan).
std::vector<double> Effective(const std::vector<double>& load) {
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  return total > 0 ? load : std::vector<double>(load.size(), 1.0);
}

// EPLB's replicate_experts from the floor: each of `budget` extra replicas to the expert with the
// largest load per replica.
std::vector<int> Replicate(const std::vector<double>& w, const Shape& sh, int budget) {
  std::vector<int> r(sh.E, sh.M);
  for (int i = 0; i < budget; ++i) {
    int best = -1;
    for (int e = 0; e < sh.E; ++e) {
      if (r[e] >= sh.S) continue;
      if (best < 0 || w[e] / r[e] > w[best] / r[best]) best = e;
    }
    if (best < 0) break;
    ++r[best];
  }
  return r;
}

// No free server for `item` (every one with a free slot already holds its expert): move some
// replica y from a full server t that lacks the expert onto a free server s whose experts do
// not include y's, and put the item on t. Such a pair exists: the expert has fewer than S
// replicas placed, and t holds C distinct experts while s holds fewer.
void PlaceByExchange(Packing& p, int item) {
  const int e = p.expert(item);
  int best_s = -1, best_t = -1, best_y = -1;
  double best = 0;
  for (int s = 0; s < p.num_servers(); ++s) {
    if (p.Full(s)) continue;
    for (int t = 0; t < p.num_servers(); ++t) {
      if (t == s || p.Holds(t, e)) continue;
      for (int y : p.items_on(t)) {
        if (p.Holds(s, p.expert(y))) continue;
        const double m =
            std::max(p.load(s) + p.weight(y), p.load(t) - p.weight(y) + p.weight(item));
        if (best_y < 0 || m < best) {
          best = m;
          best_s = s;
          best_t = t;
          best_y = y;
        }
      }
    }
  }
  // best_y >= 0 by the argument above.
  p.Remove(best_y);
  p.Put(best_y, best_s);
  p.Put(item, best_t);
}

// EPLB's balanced packing: heaviest first onto the least-loaded server with a free slot that
// does not hold the expert yet.
void PackGreedy(Packing& p) {
  std::vector<int> order;
  for (int i = 0; i < p.num_items(); ++i) {
    if (p.server(i) < 0) order.push_back(i);  // placed ones stay
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return p.weight(a) > p.weight(b); });
  for (int item : order) {
    int best = -1;
    for (int s = 0; s < p.num_servers(); ++s) {
      if (p.Full(s) || p.Holds(s, p.expert(item))) continue;
      if (best < 0 || p.load(s) < p.load(best)) best = s;
    }
    if (best >= 0) {
      p.Put(item, best);
    } else {
      PlaceByExchange(p, item);
    }
  }
}

// Local search: move a replica off the most loaded server, or swap it with one elsewhere,
// whenever that lowers the larger of the two servers' loads below the current maximum. Each
// accepted step lowers the sum of squared loads, so it ends.
void LocalSearch(Packing& p) {
  for (int iter = 0; iter < 100000; ++iter) {
    const int m = p.ArgMax();
    const double top = p.load(m);
    const double eps = 1e-12 * std::max(top, 1e-300);
    double best = top - eps;
    int bx = -1, bt = -1, by = -1;
    for (int x : p.items_on(m)) {
      const int ex = p.expert(x);
      const double wx = p.weight(x);
      for (int t = 0; t < p.num_servers(); ++t) {
        if (t == m || p.Holds(t, ex)) continue;
        if (!p.Full(t)) {
          const double v = std::max(top - wx, p.load(t) + wx);
          if (v < best) {
            best = v;
            bx = x, bt = t, by = -1;
          }
        }
        for (int y : p.items_on(t)) {
          const int ey = p.expert(y);
          if (p.Holds(m, ey)) continue;
          const double wy = p.weight(y);
          if (wy >= wx) continue;  // would not lower m
          const double v = std::max(top - wx + wy, p.load(t) - wy + wx);
          if (v < best) {
            best = v;
            bx = x, bt = t, by = y;
          }
        }
      }
    }
    if (bx < 0) return;
    p.Remove(bx);
    if (by >= 0) {
      p.Remove(by);
      p.Put(by, m);
    }
    p.Put(bx, bt);
  }
}

// Uneven shares: for each replicated expert, split its load over its holders so that their
// loads (everything else fixed) are as even as possible — water-filling, which never raises
// the largest of them.
void BalanceShares(Packing& p, const std::vector<double>& w, const std::vector<int>& replicas) {
  std::vector<std::vector<int>> items_of(w.size());
  for (int i = 0; i < p.num_items(); ++i) items_of[p.expert(i)].push_back(i);
  std::vector<int> experts;
  for (size_t e = 0; e < w.size(); ++e) {
    if (replicas[e] > 1 && w[e] > 0) experts.push_back(static_cast<int>(e));
  }
  std::stable_sort(experts.begin(), experts.end(), [&](int a, int b) { return w[a] > w[b]; });
  for (int e : experts) {
    const auto& items = items_of[e];
    const int n = static_cast<int>(items.size());
    std::vector<double> base(n), old(n);
    double old_max = 0;
    for (int i = 0; i < n; ++i) {
      old[i] = p.weight(items[i]);
      base[i] = p.load(p.server(items[i])) - old[i];
      old_max = std::max(old_max, p.load(p.server(items[i])));
    }
    std::vector<double> sorted = base;
    std::sort(sorted.begin(), sorted.end());
    double level = 0, sum = 0;
    for (int k = 0; k < n; ++k) {  // the level with k + 1 servers below it
      sum += sorted[k];
      level = (w[e] + sum) / (k + 1);
      if (k + 1 == n || level <= sorted[k + 1]) break;
    }
    // Every replica keeps a small share, so each stays in use (and is worth its slot).
    const double floor = 1e-6 * w[e];
    std::vector<double> nw(n);
    double total = 0;
    for (int i = 0; i < n; ++i) {
      nw[i] = std::max(level - base[i], floor);
      total += nw[i];
    }
    double new_max = 0;
    for (int i = 0; i < n; ++i) {
      nw[i] *= w[e] / total;
      new_max = std::max(new_max, base[i] + nw[i]);
    }
    if (new_max > old_max) continue;
    for (int i = 0; i < n; ++i) p.SetWeight(items[i], nw[i]);
  }
}

LayerPlan ToPlan(const Packing& p, const std::vector<double>& load, int num_servers) {
  const int E = static_cast<int>(load.size());
  LayerPlan plan;
  plan.holders.resize(E);
  plan.shares.resize(E);
  std::vector<double> total(E, 0.0);
  for (int i = 0; i < p.num_items(); ++i) total[p.expert(i)] += p.weight(i);
  for (int i = 0; i < p.num_items(); ++i) {
    const int e = p.expert(i);
    plan.holders[e].push_back(p.server(i));
    plan.shares[e].push_back(total[e] > 0 ? p.weight(i) / total[e] : 1.0);
  }
  plan.server_load.assign(num_servers, 0.0);
  for (int e = 0; e < E; ++e) {
    double sum = 0;
    for (double x : plan.shares[e]) sum += x;
    for (size_t r = 0; r < plan.shares[e].size(); ++r) {
      plan.shares[e][r] /= sum;
      plan.server_load[plan.holders[e][r]] += load[e] * plan.shares[e][r];
    }
  }
  return plan;
}

Packing EplbPacking(const std::vector<double>& w, const Shape& sh, int budget,
                    std::vector<int>* replicas) {
  *replicas = Replicate(w, sh, budget);
  Packing p(sh.S, sh.C, sh.E);
  for (int e = 0; e < sh.E; ++e) {
    for (int r = 0; r < (*replicas)[e]; ++r) p.AddItem(e, w[e] / (*replicas)[e]);
  }
  PackGreedy(p);
  return p;
}

// Where the experts are now, kept as far as slots allow (heaviest experts first), then the
// remaining replicas packed like EPLB's: a start that moves few experts.
Packing StickyPacking(const std::vector<double>& w, const Shape& sh,
                      const std::vector<int>& replicas,
                      const std::vector<std::vector<int>>& current) {
  Packing p(sh.S, sh.C, sh.E);
  std::vector<std::vector<int>> items_of(sh.E);
  for (int e = 0; e < sh.E; ++e) {
    for (int r = 0; r < replicas[e]; ++r) items_of[e].push_back(p.AddItem(e, w[e] / replicas[e]));
  }
  std::vector<int> order(sh.E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b]; });
  for (int e : order) {
    size_t next = 0;
    for (int s : current[e]) {
      if (next == items_of[e].size()) break;
      if (s >= 0 && s < sh.S && !p.Full(s) && !p.Holds(s, e)) p.Put(items_of[e][next++], s);
    }
  }
  PackGreedy(p);
  return p;
}

// Local search and uneven shares, alternating until the maximum stops falling.
void Refine(Packing& p, const std::vector<double>& w, const std::vector<int>& replicas,
            const PlannerOptions& options) {
  for (int round = 0; round < 8; ++round) {
    const double before = p.Max();
    LocalSearch(p);
    if (options.uneven_shares) BalanceShares(p, w, replicas);
    if (p.Max() >= before * (1 - 1e-12)) break;
  }
}

}  // namespace

double LayerPlan::max_load() const {
  return server_load.empty() ? 0.0 : *std::max_element(server_load.begin(), server_load.end());
}

absl::StatusOr<LayerPlan> PlanLayerEplb(const std::vector<double>& load,
                                        const PlannerOptions& options) {
  DSMOE_ASSIGN_OR_RETURN(Shape sh, Validate(load, options));
  std::vector<int> replicas;
  const Packing p = EplbPacking(Effective(load), sh, sh.R, &replicas);
  return ToPlan(p, load, sh.S);
}

absl::StatusOr<LayerPlan> PlanLayer(const std::vector<double>& load, const PlannerOptions& options,
                                    const std::vector<std::vector<int>>* current) {
  DSMOE_ASSIGN_OR_RETURN(Shape sh, Validate(load, options));
  const std::vector<double> w = Effective(load);
  std::vector<int> replicas;
  Packing p = EplbPacking(w, sh, sh.R, &replicas);
  const LayerPlan eplb = ToPlan(p, load, sh.S);
  if (!options.refine) return eplb;
  // A replica adds its expert's share to a server that may already be the busiest, so the
  // whole budget is not always best: try every smaller one too (EPLB's replication each time)
  // and keep the lowest maximum after local search; ties keep the larger budget.
  LocalSearch(p);
  for (int budget = sh.R - 1; budget >= 0; --budget) {
    std::vector<int> r;
    Packing q = EplbPacking(w, sh, budget, &r);
    LocalSearch(q);
    if (q.Max() < p.Max() * (1 - 1e-12)) {
      p = std::move(q);
      replicas = std::move(r);
    }
  }
  Refine(p, w, replicas, options);
  LayerPlan refined = ToPlan(p, load, sh.S);
  // Refinement only lowers the maximum; the guard covers rounding of the shares.
  if (refined.max_load() > eplb.max_load()) refined = eplb;
  if (current == nullptr || static_cast<int>(current->size()) != sh.E) return refined;
  // The same replica counts, started from where the experts are: preferred when its maximum
  // is within keep_tolerance of the best plan's (and never above EPLB's), since every expert
  // that stays is one less to load.
  Packing q = StickyPacking(w, sh, replicas, *current);
  Refine(q, w, replicas, options);
  LayerPlan sticky = ToPlan(q, load, sh.S);
  const double limit = std::min(eplb.max_load(), refined.max_load() * (1 + options.keep_tolerance));
  return sticky.max_load() <= limit ? sticky : refined;
}

std::vector<double> ServerLoads(const Placement& placement, int64_t layer,
                                const std::vector<double>& load) {
  std::vector<double> out(placement.num_servers(), 0.0);
  const int64_t E = std::min<int64_t>(placement.num_experts(layer), load.size());
  for (int64_t e = 0; e < E; ++e) {
    const auto& h = placement.Holders(layer, e);
    const auto& w = placement.Shares(layer, e);
    for (size_t r = 0; r < h.size(); ++r) out[h[r]] += load[e] * w[r];
  }
  return out;
}

double Imbalance(const std::vector<double>& server_load) {
  if (server_load.empty()) return 0;
  const double total = std::accumulate(server_load.begin(), server_load.end(), 0.0);
  if (total <= 0) return 0;
  return *std::max_element(server_load.begin(), server_load.end()) /
         (total / static_cast<double>(server_load.size()));
}

namespace {

// π[new server] = label to use, maximising the experts each server keeps.
std::vector<int> Relabel(const std::vector<std::vector<int>>& holders, const Placement& current,
                         int64_t layer, int S) {
  std::vector<std::vector<int>> keep(S, std::vector<int>(S, 0));  // [new][old]
  for (size_t e = 0; e < holders.size(); ++e) {
    for (int s_new : holders[e]) {
      for (int s_old : current.Holders(layer, static_cast<int64_t>(e))) ++keep[s_new][s_old];
    }
  }
  std::vector<int> perm(S);
  std::iota(perm.begin(), perm.end(), 0);
  if (S <= 8) {  // every permutation: at most 40320
    std::vector<int> best = perm, p = perm;
    int best_score = -1;
    do {
      int score = 0;
      for (int s = 0; s < S; ++s) score += keep[s][p[s]];
      if (score > best_score) {
        best_score = score;
        best = p;
      }
    } while (std::next_permutation(p.begin(), p.end()));
    return best;
  }
  // Greedy: the largest remaining overlap first.
  std::vector<bool> used_new(S, false), used_old(S, false);
  for (int k = 0; k < S; ++k) {
    int bn = -1, bo = -1;
    for (int a = 0; a < S; ++a) {
      if (used_new[a]) continue;
      for (int b = 0; b < S; ++b) {
        if (!used_old[b] && (bn < 0 || keep[a][b] > keep[bn][bo])) bn = a, bo = b;
      }
    }
    used_new[bn] = used_old[bo] = true;
    perm[bn] = bo;
  }
  return perm;
}

}  // namespace

absl::StatusOr<Placement> PlanPlacement(const Placement& current,
                                        const std::vector<std::vector<double>>& loads,
                                        const PlannerOptions& options) {
  if (options.num_servers != current.num_servers()) {
    return absl::InvalidArgumentError(absl::StrCat("the plan is for ", options.num_servers,
                                                   " expert servers, the placement has ",
                                                   current.num_servers()));
  }
  const int L = current.num_layers();
  std::vector<std::vector<std::vector<int>>> holders(L);
  std::vector<std::vector<std::vector<double>>> shares(L);
  for (int l = 0; l < L; ++l) {
    const int64_t E = current.num_experts(l);
    if (E == 0) continue;
    std::vector<double> load(E, 0.0);
    if (l < static_cast<int>(loads.size()) && !loads[l].empty()) {
      if (static_cast<int64_t>(loads[l].size()) != E) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, ": ", loads[l].size(), " loads for ", E, " experts"));
      }
      load = loads[l];
    }
    std::vector<std::vector<int>> now(E);
    for (int64_t e = 0; e < E; ++e) now[e] = current.Holders(l, e);
    DSMOE_ASSIGN_OR_RETURN(LayerPlan plan, PlanLayer(load, options, &now));
    const std::vector<int> perm = Relabel(plan.holders, current, l, options.num_servers);
    for (auto& h : plan.holders) {
      for (int& s : h) s = perm[s];
    }
    holders[l] = std::move(plan.holders);
    shares[l] = std::move(plan.shares);
  }
  return Placement::FromHolders(current.num_servers(), std::move(holders), std::move(shares),
                                current.version() + 1);
}

}  // namespace dsmoe::router
