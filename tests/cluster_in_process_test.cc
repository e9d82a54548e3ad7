// A whole cluster in the test process (tests/in_process_cluster.h: two expert servers, an
// attention server and a gateway on 127.0.0.1, a real gRPC client of dsmoe.v1.Gateway), checked
// against the single-process engine on the same checkpoint: greedy tokens equal across the
// servers; a cancelled stream frees its sequence; an expert server gone without a replica fails
// exactly the requests that need its expert; with replicas nothing changes; stop strings cut the
// text where the single process's text contains them; the prompt's logprobs come once and equal a
// local runner's. The same scenarios as tests/cluster/*.py
// with real processes, here in the unit suite, in seconds, without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/model/model_runner.h"
#include "tests/in_process_cluster.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::InProcessCluster;
using testing::InProcessClusterOptions;
using testing::SingleProcessEngine;
using testing::Stream;
using testing::WaitFor;

constexpr milliseconds kCallDeadline = seconds(60);

// The text of token id i in the tokenizer the suite writes: ids 0-25 are the letters a-z, ids
// 26·(j+1) + k are the pair (letter j, letter k). Decoding is plain concatenation, so the
// expected text of any ids is computed here by hand.
std::string Piece(uint32_t id) {
  if (id < 26) return std::string(1, static_cast<char>('a' + id));
  return {static_cast<char>('a' + id / 26 - 1), static_cast<char>('a' + id % 26)};
}

std::string TextOf(const std::vector<uint32_t>& ids) {
  std::string text;
  for (uint32_t id : ids) text += Piece(id);
  return text;
}

// A byte-pair tokenizer.json over those 512 pieces: no normalizer or pre-tokenizer, each pair
// merged from its letters, the Fuse decoder (concatenation).
void WriteLetterTokenizer(const std::string& dir, int64_t vocab_size) {
  std::string vocab, merges;
  for (uint32_t id = 0; id < vocab_size; ++id) {
    const std::string p = Piece(id);
    vocab += (id == 0 ? "\"" : ", \"") + p + "\": " + std::to_string(id);
    if (p.size() == 2)
      merges += std::string(merges.empty() ? "" : ", ") + "\"" + p[0] + " " + p[1] + "\"";
  }
  testing::WriteFile(
      dir + "/tokenizer.json",
      "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [], "
      "\"normalizer\": null, \"pre_tokenizer\": null, \"post_processor\": null, "
      "\"decoder\": {\"type\": \"Fuse\"}, \"model\": {\"type\": \"BPE\", \"dropout\": null, "
      "\"unk_token\": null, \"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, "
      "\"fuse_unk\": false, \"byte_fallback\": false, \"vocab\": {" +
          vocab + "}, \"merges\": [" + merges + "]}}");
}

std::vector<std::vector<uint32_t>> RandomPrompts(int n, uint32_t seed, int min_len, int max_len) {
  std::mt19937 rng(seed);
  std::vector<std::vector<uint32_t>> out(n);
  for (auto& p : out) {
    p.resize(std::uniform_int_distribution<int>(min_len, max_len)(rng));
    for (auto& id : p) id = std::uniform_int_distribution<uint32_t>(2, 511)(rng);
  }
  return out;
}

// How clear the single process's closest routing choice was, over every MoE layer and
// position of `run`: the least gap between the k-th and (k+1)-th largest gate logits (softmax
// keeps their order), i.e. how far the logits must move for some expert to swap in or out.
float ClearestChoice(const SingleProcessEngine::Run& run) {
  float least = std::numeric_limits<float>::infinity();
  for (const auto& [layer, positions] : run.gate_logits) {
    for (size_t pos = 0; pos < positions.size(); ++pos) {
      std::vector<float> logits = positions[pos];
      const size_t k = run.routing.at(layer).at(pos).size();
      if (k >= logits.size()) continue;  // every expert chosen: no boundary
      std::partial_sort(logits.begin(), logits.begin() + k + 1, logits.end(), std::greater<>());
      least = std::min(least, logits[k - 1] - logits[k]);
    }
  }
  return least;
}

class ClusterInProcessTest : public ::testing::Test {
 protected:
  // One checkpoint (the tiny preset, with the letter tokenizer) and one reference engine for
  // the suite; every test starts its own cluster on it.
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    config_ = testing::WriteTinyModel(dir_->path());
    WriteLetterTokenizer(dir_->path(), config_.vocab_size);
    auto engine = SingleProcessEngine::Load(dir_->path());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = engine->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete dir_;
  }

  static std::unique_ptr<InProcessCluster> StartCluster(int num_replicas = 1,
                                                        const std::string& placement_file = "",
                                                        int micro_batches = 1) {
    InProcessClusterOptions o;
    o.model_dir = dir_->path();
    o.num_replicas = num_replicas;
    o.placement_file = placement_file;
    o.micro_batches = micro_batches;
    auto cluster = InProcessCluster::Start(o);
    EXPECT_TRUE(cluster.ok()) << cluster.status();
    return cluster.ok() ? std::move(*cluster) : nullptr;
  }

  static SingleProcessEngine::Run Reference(const std::vector<uint32_t>& prompt, int64_t n) {
    auto run = engine_->Generate(prompt, n);
    EXPECT_TRUE(run.ok()) << run.status();
    return run.ok() ? *run : SingleProcessEngine::Run{};
  }

  static inline testing::TempDir* dir_ = nullptr;
  static inline ModelConfig config_;
  static inline SingleProcessEngine* engine_ = nullptr;
};

TEST_F(ClusterInProcessTest, GreedyTokensAcrossTwoExpertServersEqualTheSingleProcess) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  // The routed experts really are split: each server holds some, every one is held once.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::ModelInfo info;
    const grpc::Status s = cluster->gateway().GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(info.expert_servers_size(), 2);
    const int num_moe_layers = config_.num_hidden_layers - config_.first_k_dense_replace;
    EXPECT_GT(info.expert_servers(0).experts_size(), 0);
    EXPECT_GT(info.expert_servers(1).experts_size(), 0);
    EXPECT_EQ(info.expert_servers(0).experts_size() + info.expert_servers(1).experts_size(),
              config_.n_routed_experts * num_moe_layers);
  }

  // Concurrent streams (batched together in the attention server), then one Complete.
  const auto prompts = RandomPrompts(4, /*seed=*/7, 3, 9);
  constexpr uint32_t kTokens = 24;
  std::vector<std::unique_ptr<Stream>> streams;
  for (const auto& p : prompts)
    streams.push_back(std::make_unique<Stream>(cluster->gateway(),
                                               testing::GreedyRequest(p, kTokens), kCallDeadline));
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Stream::Result& got = streams[i]->Wait();
    ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
    EXPECT_EQ(got.ids, Reference(prompts[i], kTokens).ids) << "prompt " << i;
    EXPECT_EQ(got.finish_reason, v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(got.completion_tokens, kTokens);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
  v1::CompleteResponse complete;
  const grpc::Status s =
      cluster->gateway().Complete(&ctx, testing::GreedyRequest(prompts[0], kTokens), &complete);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(std::vector<uint32_t>(complete.token_ids().begin(), complete.token_ids().end()),
            Reference(prompts[0], kTokens).ids);
}

// Micro-batches (one's routed experts on the expert servers while the next runs attention)
// change no token: concurrent greedy and seeded-sampling streams give the same tokens with 1,
// 2 and 3 micro-batches per step, the greedy ones those of the single process.
TEST_F(ClusterInProcessTest, MicroBatchesChangeNoToken) {
  const auto prompts = RandomPrompts(6, /*seed=*/11, 2, 12);
  constexpr uint32_t kTokens = 16;
  std::vector<std::vector<std::vector<uint32_t>>> runs;  // [micro-batches][stream] tokens
  for (int micro_batches : {1, 2, 3}) {
    auto cluster = StartCluster(1, "", micro_batches);
    ASSERT_NE(cluster, nullptr);
    std::vector<std::unique_ptr<Stream>> streams;
    for (size_t i = 0; i < prompts.size(); ++i) {
      v1::GenerateRequest req = testing::GreedyRequest(prompts[i], kTokens);
      if (i % 2 == 1) {  // seeded sampling
        req.set_temperature(0.9f);
        req.set_top_p(0.95f);
        req.set_seed(1000 + i);
      }
      streams.push_back(std::make_unique<Stream>(cluster->gateway(), req, kCallDeadline));
    }
    runs.emplace_back();
    for (size_t i = 0; i < prompts.size(); ++i) {
      const Stream::Result& got = streams[i]->Wait();
      ASSERT_TRUE(got.status.ok()) << micro_batches << ": " << got.status.error_message();
      ASSERT_EQ(got.ids.size(), kTokens);
      if (i % 2 == 0) {
        EXPECT_EQ(got.ids, Reference(prompts[i], kTokens).ids) << "prompt " << i;
      }
      runs.back().push_back(got.ids);
    }
  }
  EXPECT_EQ(runs[1], runs[0]) << "2 micro-batches against 1";
  EXPECT_EQ(runs[2], runs[0]) << "3 micro-batches against 1";
}

TEST_F(ClusterInProcessTest, CancellingAStreamFreesItsSequence) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  // 4000 tokens take the attention server about 4 s on an idle machine (longer on a busy one):
  // the sequence can leave the scheduler within the bound below only by being cancelled.
  constexpr uint32_t kLong = 4000;
  Stream stream(cluster->gateway(), testing::GreedyRequest({1, 2, 3}, kLong), kCallDeadline);
  ASSERT_TRUE(stream.WaitForTokens(1, seconds(30))) << stream.Wait().status.error_message();
  auto load = cluster->AttentionLoad();
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_EQ(load->running(), 1u);

  stream.Cancel();
  const Stream::Result& got = stream.Wait();
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::CANCELLED) << got.status.error_message();
  EXPECT_LT(got.ids.size(), kLong);
  // The gateway cancels its upstream call; the attention server drops the sequence and its slot,
  // well before the sequence could have finished by itself.
  EXPECT_TRUE(WaitFor(
      [&] {
        auto l = cluster->AttentionLoad();
        return l.ok() && l->running() == 0 && l->waiting() == 0;
      },
      milliseconds(1500)))
      << "the attention server still runs the cancelled sequence";

  // And the cluster goes on serving, correctly.
  Stream next(cluster->gateway(), testing::GreedyRequest({4, 5, 6}, 8), kCallDeadline);
  const Stream::Result& after = next.Wait();
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.ids, Reference({4, 5, 6}, 8).ids);
}

TEST_F(ClusterInProcessTest, AnExpertServerGoneWithoutReplicaFailsOnlyTheRequestsThatNeedIt) {
  // Which requests need which expert comes from the single process's routing: every computed
  // position of each candidate (its prompt, and its generated tokens but the last), in the last
  // MoE layer. Expert server 1 will hold only one expert E of that layer, chosen so that some
  // candidates need it and some do not.
  // The cluster batches tokens differently, so its gate logits differ from the single
  // process's by rounding (~1e-6): candidates with a choice, at any layer, closer than this to
  // the top-k boundary are left out, since the cluster could decide it the other way.
  constexpr float kClearChoice = 2e-5f;
  const int64_t layer = config_.num_hidden_layers - 1;
  constexpr uint32_t kTokens = 3;
  std::vector<std::vector<uint32_t>> prompts;
  std::vector<SingleProcessEngine::Run> want;
  for (const auto& p : RandomPrompts(16, /*seed=*/33, 3, 3)) {
    SingleProcessEngine::Run run = Reference(p, kTokens);
    if (ClearestChoice(run) < kClearChoice) continue;
    prompts.push_back(p);
    want.push_back(std::move(run));
  }
  ASSERT_GE(prompts.size(), 12u) << "too few candidates route clear of near-ties";
  auto first_use = [&](size_t i, int32_t e) -> int64_t {  // the first position needing e; -1
    const auto& positions = want[i].routing.at(layer);
    for (size_t pos = 0; pos < positions.size(); ++pos)
      if (positions[pos].count(e) != 0) return static_cast<int64_t>(pos);
    return -1;
  };
  int32_t expert = -1;
  size_t fewest = prompts.size();
  for (int32_t e = 0; e < config_.n_routed_experts; ++e) {
    size_t users = 0;
    for (size_t i = 0; i < prompts.size(); ++i) users += first_use(i, e) >= 0;
    if (users > 0 && users < fewest) expert = e, fewest = users;
  }
  ASSERT_GE(expert, 0) << "every expert of layer " << layer << " is used by every candidate";

  testing::TempDir placement_dir;
  std::string layers;
  for (int64_t l = config_.first_k_dense_replace; l < config_.num_hidden_layers; ++l) {
    std::string servers;
    for (int32_t e = 0; e < config_.n_routed_experts; ++e)
      servers += std::string(e == 0 ? "" : ", ") + (l == layer && e == expert ? "[1]" : "[0]");
    layers += (layers.empty() ? "" : ", ") +
              absl::StrCat("{\"layer\": ", l, ", \"servers\": [", servers, "]}");
  }
  const std::string placement = placement_dir.File("placement.json");
  testing::WriteFile(placement, "{\"num_servers\": 2, \"layers\": [" + layers + "]}");
  auto cluster = StartCluster(1, placement);
  ASSERT_NE(cluster, nullptr);

  auto run_all = [&] {
    std::vector<std::unique_ptr<Stream>> streams;
    for (const auto& p : prompts)
      streams.push_back(std::make_unique<Stream>(
          cluster->gateway(), testing::GreedyRequest(p, kTokens), kCallDeadline));
    std::vector<Stream::Result> results;
    for (auto& s : streams) results.push_back(s->Wait());
    return results;
  };
  // All up: everything as the single process.
  auto results = run_all();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, want[i].ids) << "prompt " << i;
  }

  // Expert server 1 goes away; the health checks notice (the attention server is no longer
  // ready), and requests, all at once, are answered: a request that needs E fails when it meets
  // it (no later than the single process's first use), after delivering correct tokens, and
  // the error names the expert; the others, batched with the failing ones, are untouched.
  cluster->StopExpertServer(1);
  ASSERT_TRUE(WaitFor([&] { return !cluster->attention().ready(); }, seconds(10)));
  results = run_all();
  const std::string named = absl::StrCat("routed experts of layer ", layer, " [", expert, "]");
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t first = first_use(i, expert);
    if (first < 0) {
      ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
      EXPECT_EQ(results[i].ids, want[i].ids)
          << "prompt " << i << " does not need expert " << expert;
      continue;
    }
    EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << i << ": " << results[i].status.error_message();
    EXPECT_NE(results[i].status.error_message().find(named), std::string::npos)
        << results[i].status.error_message();
    // Position p (>= prompt length - 1) produces output token p - prompt length + 1: every
    // token before the first position that needs E is delivered, and counted in the error.
    const size_t got = results[i].ids.size();
    const int64_t delivered = std::max<int64_t>(0, first - int64_t(prompts[i].size()) + 1);
    EXPECT_EQ(got, static_cast<size_t>(delivered))
        << "prompt " << i << " first needs expert " << expert << " at position " << first;
    EXPECT_EQ(results[i].ids,
              std::vector<uint32_t>(want[i].ids.begin(), want[i].ids.begin() + delivered))
        << "prompt " << i << ": the tokens delivered are the single process's";
    if (got > 0) {
      EXPECT_NE(results[i].status.error_message().find(
                    absl::StrCat("after ", got, " tokens were delivered")),
                std::string::npos)
          << results[i].status.error_message();
    }
  }

  // Back on its address, it is found again and every request succeeds.
  ASSERT_TRUE(cluster->RestartExpertServer(1).ok());
  ASSERT_TRUE(WaitFor([&] { return cluster->attention().ready(); }, seconds(10)));
  results = run_all();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, want[i].ids) << "prompt " << i << " after the restart";
  }
}

TEST_F(ClusterInProcessTest, WithReplicasAnExpertServerGoneMidRunChangesNothing) {
  auto cluster = StartCluster(/*num_replicas=*/2);
  ASSERT_NE(cluster, nullptr);
  const auto prompts = RandomPrompts(4, /*seed=*/21, 3, 9);
  constexpr uint32_t kTokens = 400;  // long enough to be mid-run when the server goes
  std::vector<std::unique_ptr<Stream>> streams;
  for (const auto& p : prompts)
    streams.push_back(std::make_unique<Stream>(cluster->gateway(),
                                               testing::GreedyRequest(p, kTokens), kCallDeadline));
  for (auto& s : streams) ASSERT_TRUE(s->WaitForTokens(1, seconds(30)));

  cluster->StopExpertServer(0);
  size_t running = 0;  // streams that had not finished when the server was gone
  for (auto& s : streams) running += s->num_tokens() < kTokens;
  EXPECT_GT(running, 0u) << "every stream ended before the server went away: nothing was tested";
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Stream::Result& got = streams[i]->Wait();
    ASSERT_TRUE(got.status.ok()) << i << ": " << got.status.error_message();
    EXPECT_EQ(got.ids, Reference(prompts[i], kTokens).ids) << "prompt " << i;
  }
  // A new request after it, served by the replicas alone.
  Stream after(cluster->gateway(), testing::GreedyRequest(prompts[0], 16), kCallDeadline);
  ASSERT_TRUE(after.Wait().status.ok()) << after.Wait().status.error_message();
  EXPECT_EQ(after.Wait().ids, Reference(prompts[0], 16).ids);
  EXPECT_TRUE(cluster->attention().ready()) << "every routed expert still has a serving holder";
}

TEST_F(ClusterInProcessTest, AStopStringEndsTheTextWhereTheSingleProcessTextHasIt) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  // "tuvwxyz" is the ids 19..25 by hand: no pair starting with t-z is in the vocabulary.
  const std::vector<uint32_t> prompt_ids = {19, 20, 21, 22, 23, 24, 25};
  constexpr uint32_t kTokens = 16;
  const std::vector<uint32_t> ids = Reference(prompt_ids, kTokens).ids;
  const std::string full = TextOf(ids);
  ASSERT_GT(full.size(), 6u);

  v1::GenerateRequest request;
  request.set_text("tuvwxyz");
  request.set_max_tokens(kTokens);
  request.set_temperature(0);
  request.set_ignore_eos(true);
  auto complete = [&](v1::CompleteResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
    return cluster->gateway().Complete(&ctx, request, response);
  };
  {
    v1::CompleteResponse response;
    const grpc::Status s = complete(&response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(std::vector<uint32_t>(response.token_ids().begin(), response.token_ids().end()), ids);
    EXPECT_EQ(response.text(), full);
    EXPECT_EQ(response.usage().prompt_tokens(), prompt_ids.size());
  }

  // A stop string inside a token's text, one letter (perhaps at the very start), the end.
  for (const std::string& stop :
       {full.substr(3, 3), full.substr(1, 1), full.substr(full.size() - 3)}) {
    request.clear_stop();
    request.add_stop("never-appears-here");
    request.add_stop(stop);
    const std::string want = full.substr(0, full.find(stop));
    v1::CompleteResponse response;
    const grpc::Status s = complete(&response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(response.finish_reason(), v1::FINISH_REASON_STOP) << stop;
    EXPECT_EQ(response.text(), want) << "stop " << stop << " in " << full;
    // The tokens up to the one that completed the stop string.
    ASSERT_LE(response.token_ids_size(), static_cast<int>(ids.size()));
    EXPECT_TRUE(std::equal(response.token_ids().begin(), response.token_ids().end(), ids.begin()));
    EXPECT_GE(TextOf({response.token_ids().begin(), response.token_ids().end()}).size(),
              want.size() + stop.size());

    Stream stream(cluster->gateway(), request, kCallDeadline);
    const Stream::Result& streamed = stream.Wait();
    ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
    EXPECT_EQ(streamed.text, want) << "stop " << stop << " in " << full;
    EXPECT_EQ(streamed.finish_reason, v1::FINISH_REASON_STOP);
  }
}

// Prompt logprobs through the public API (GenerateRequest.prompt_logprobs): in the first message
// of a stream only, in Complete's answer, for token ids and text, alone with max_tokens 0; each
// with its token string, and equal to log_softmax (in double, here) of the logits a local runner
// gives for the whole prompt in one pass (its routed experts computed in this process, not on the
// expert servers).
TEST_F(ClusterInProcessTest, PromptLogprobsComeOnceAndEqualTheLogitsOfTheWholePrompt) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  // "tuvwxyz" (ids 19..25, see AStopStringEnds...) then a few pairs.
  const std::vector<uint32_t> prompt = {19, 20, 21, 22, 23, 24, 25, 40, 300, 7, 511};
  const int64_t P = static_cast<int64_t>(prompt.size());
  std::vector<std::vector<double>> ref;
  {
    auto weights = ModelWeights::Load(dir_->path());
    ASSERT_TRUE(weights.ok()) << weights.status();
    ThreadPool pool(1);
    auto rows = testing::WholeSequenceLogSoftmax(
        **weights, pool, std::vector<int32_t>(prompt.begin(), prompt.end()));
    ASSERT_TRUE(rows.ok()) << rows.status();
    ref = *std::move(rows);
  }
  constexpr int kTop = 3;
  auto check = [&](const google::protobuf::RepeatedPtrField<v1::TokenLogprobs>& got,
                   const std::string& what) {
    SCOPED_TRACE(what);
    ASSERT_EQ(got.size(), P - 1);
    for (int64_t p = 0; p + 1 < P; ++p) {
      const v1::TokenLogprobs& lp = got[static_cast<int>(p)];
      EXPECT_EQ(lp.token_id(), prompt[p + 1]);
      EXPECT_EQ(lp.token(), Piece(prompt[p + 1]));
      EXPECT_NEAR(lp.logprob(), ref[p][prompt[p + 1]], 1e-5) << "prompt token " << p + 1;
      ASSERT_EQ(lp.top_logprobs_size(), kTop);
      std::vector<double> sorted = ref[p];
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      for (int k = 0; k < kTop; ++k) {
        const v1::TopLogprob& t = lp.top_logprobs(k);
        EXPECT_NEAR(t.logprob(), sorted[k], 1e-5);
        EXPECT_NEAR(t.logprob(), ref[p][t.token_id()], 1e-5);
        EXPECT_EQ(t.token(), Piece(t.token_id()));
      }
    }
  };
  v1::GenerateRequest request = testing::GreedyRequest(prompt, 4);
  request.set_prompt_logprobs(kTop);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
    auto reader = cluster->gateway().Generate(&ctx, request);
    v1::GenerateResponse m;
    int messages = 0;
    std::vector<uint32_t> ids;
    while (reader->Read(&m)) {
      if (messages++ == 0) {
        EXPECT_GT(m.token_ids_size(), 0) << "the prompt's logprobs come with the first token";
        check(m.prompt_logprobs(), "Generate");
      } else {
        EXPECT_EQ(m.prompt_logprobs_size(), 0) << "message " << messages - 1;
      }
      ids.insert(ids.end(), m.token_ids().begin(), m.token_ids().end());
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(ids, Reference(prompt, 4).ids);  // the generated tokens are unchanged
  }
  auto complete = [&](const v1::GenerateRequest& r, v1::CompleteResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
    return cluster->gateway().Complete(&ctx, r, response);
  };
  {
    v1::CompleteResponse response;
    ASSERT_TRUE(complete(request, &response).ok());
    check(response.prompt_logprobs(), "Complete");
    EXPECT_EQ(response.token_ids_size(), 4);
  }
  {
    // max_tokens 0: the prompt's logprobs are the whole answer.
    v1::GenerateRequest only = request;
    only.set_max_tokens(0);
    v1::CompleteResponse response;
    ASSERT_TRUE(complete(only, &response).ok());
    check(response.prompt_logprobs(), "Complete, max_tokens 0");
    EXPECT_EQ(response.token_ids_size(), 0);
    EXPECT_EQ(response.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(response.usage().prompt_tokens(), P);
    EXPECT_EQ(response.usage().completion_tokens(), 0u);
    Stream stream(cluster->gateway(), only, kCallDeadline);
    const Stream::Result& streamed = stream.Wait();
    ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
    EXPECT_TRUE(streamed.ids.empty());
    EXPECT_EQ(streamed.finish_reason, v1::FINISH_REASON_LENGTH);
    // Without prompt_logprobs, 0 is refused, naming the field.
    only.clear_prompt_logprobs();
    const grpc::Status refused = complete(only, &response);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(refused.error_message().find("max_tokens"), std::string::npos);
  }
  {
    // A text prompt: the gateway's tokens ("tuvwxyz" has no pairs: one letter each).
    v1::GenerateRequest text = request;
    text.set_text("tuvwxyz");
    v1::CompleteResponse response;
    ASSERT_TRUE(complete(text, &response).ok());
    ASSERT_EQ(response.prompt_logprobs_size(), 6);
    for (int i = 0; i < 6; ++i) {
      EXPECT_EQ(response.prompt_logprobs(i).token_id(), static_cast<uint32_t>(20 + i));
      EXPECT_NEAR(response.prompt_logprobs(i).logprob(), ref[i][20 + i], 1e-5);
    }
    text.set_prompt_logprobs(21);
    EXPECT_EQ(complete(text, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

}  // namespace
}  // namespace dsmoe
