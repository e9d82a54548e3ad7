// The attention server's side of the NCCL transport (`--expert-transport nccl` with
// `--device cuda:N`): one nccl::Channel to each expert server that accepts one, through which
// the dispatch executor moves hidden states and expert outputs GPU to GPU while the gRPC call
// carries the routing and the status.
//
// Channels open in the background, one thread per expert server, the first time dispatch asks
// for one: until a channel is open — and for good to a server that refuses (experts on the
// CPU, a build without CUDA) — calls carry their tensors in the gRPC message. A channel that
// fails is closed on both sides and tried again after `retry_after`. Only in CUDA builds.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/util/log.h"
#include "expert-server/client/expert_dispatcher.h"
#include "expert-server/client/expert_server_pool.h"
#include "expert-server/nccl_channel.h"

namespace dsmoe {

struct NcclLinksOptions {
  int device = 0;        // the attention server's CUDA device
  int64_t hidden = 0;    // hidden size H
  int64_t max_rows = 0;  // rows (tokens) of one call at most
  std::chrono::milliseconds open_timeout{10000};
  std::chrono::milliseconds retry_after{60000};
  std::chrono::milliseconds transfer_timeout{10000};  // outputs, once the reply said OK
  // Where channels opening, failing and closing are logged. Not owned; must outlive the links.
  Logger* logger = DefaultLogger();
};

class NcclLinks final : public DispatchSideChannel {
 public:
  // A channel to each server of `pool`, set up by calls through the pool. REQUIRES: `pool`
  // outlives this.
  NcclLinks(ExpertServerPool& pool, const NcclLinksOptions& options);
  ~NcclLinks() override;  // cancels the openings in flight, closes every channel

  uint64_t ChannelTo(int server) override;
  absl::Status Post(int server, const float* x, const std::vector<int32_t>& rows) override;
  absl::StatusOr<const float*> Collect(int server, const absl::Status& status) override;

  // Channels open now, and set-ups in flight (any thread).
  int num_open() const;
  int num_opening() const;

 private:
  enum State : int { kUntried, kOpening, kOpen, kClosed };
  struct Link {
    std::atomic<int> state{kUntried};
    // Written by the opener before state becomes kOpen, then by the dispatch thread only.
    std::unique_ptr<nccl::Channel> channel;
    uint64_t id = 0;
    float *host_in = nullptr, *host_out = nullptr;  // pinned, [max_rows, H]
    float *device_in = nullptr, *device_out = nullptr;
    size_t rows = 0;  // of the call in flight
    std::chrono::steady_clock::time_point retry_at;
    std::thread opener;
    absl::Mutex call_mu;
    // The set-up call in flight, cancelled on shutdown.
    grpc::ClientContext* call ABSL_GUARDED_BY(call_mu) = nullptr;
    std::atomic<bool> cancel{false};
  };
  // Runs on link s's opener thread.
  void Open(int server);
  // Closes link s after a failure; it is tried again after retry_after.
  void Close(int server, const absl::Status& why);

  ExpertServerPool& pool_;
  NcclLinksOptions options_;
  std::vector<std::unique_ptr<Link>> links_;  // [server]
};

}  // namespace dsmoe
