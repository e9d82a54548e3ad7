#include "expert-server/client/nccl_links.h"

#include <cuda_runtime.h>

#include <cstring>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/ops/cuda/cuda_status.h"
#include "core/rpc/grpc_status.h"

namespace dsmoe {

NcclLinks::NcclLinks(ExpertServerPool& pool, const NcclLinksOptions& options)
    : pool_(pool), options_(options) {
  for (int s = 0; s < pool_.num_servers(); ++s) links_.push_back(std::make_unique<Link>());
}

NcclLinks::~NcclLinks() {
  for (auto& link : links_) {
    link->cancel = true;
    absl::MutexLock lock(&link->call_mu);
    if (link->call != nullptr) link->call->TryCancel();
  }
  for (auto& link : links_) {
    if (link->opener.joinable()) link->opener.join();
    link->channel.reset();
    cudaFreeHost(link->host_in);
    cudaFreeHost(link->host_out);
    cudaFree(link->device_in);
    cudaFree(link->device_out);
  }
}

int NcclLinks::num_open() const {
  int n = 0;
  for (const auto& link : links_) n += link->state.load() == kOpen;
  return n;
}

int NcclLinks::num_opening() const {
  int n = 0;
  for (const auto& link : links_) n += link->state.load() == kOpening;
  return n;
}

uint64_t NcclLinks::ChannelTo(int server) {
  Link& link = *links_[server];
  const int state = link.state.load(std::memory_order_acquire);
  if (state == kOpen) return link.id;
  const bool due =
      state == kUntried || (state == kClosed && std::chrono::steady_clock::now() >= link.retry_at);
  if (due) {
    if (link.opener.joinable()) link.opener.join();  // finished: the state is not kOpening
    link.state.store(kOpening, std::memory_order_relaxed);
    link.opener = std::thread([this, server] { Open(server); });
  }
  return 0;
}

void NcclLinks::Open(int server) {
  Link& link = *links_[server];
  const auto deadline = std::chrono::steady_clock::now() + options_.open_timeout;
  auto fail = [&](const absl::Status& why) {
    link.retry_at = std::chrono::steady_clock::now() + options_.retry_after;
    options_.logger->Log(LogLevel::kWarning,
                         absl::StrCat("dispatch: ", pool_.Name(server), ": no NCCL channel (",
                                      why.message(), "); gRPC carries its tensors"));
    link.state.store(kClosed, std::memory_order_release);
  };
  absl::StatusOr<std::string> unique_id = nccl::NewUniqueId();
  if (!unique_id.ok()) return fail(unique_id.status());

  // The expert server joins inside its OpenNcclChannel handler while this thread joins here:
  // the two ranks meet, or the call's failure cancels this side's wait.
  std::atomic<bool> refused{false};
  grpc::Status call_status;
  internal::v1::OpenNcclChannelResponse response;
  std::thread call([&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + options_.open_timeout);
    {
      absl::MutexLock lock(&link.call_mu);
      if (link.cancel) return;
      link.call = &context;
    }
    internal::v1::OpenNcclChannelRequest request;
    request.set_nccl_unique_id(*unique_id);
    request.set_timeout_ms(static_cast<uint32_t>(options_.open_timeout.count()));
    call_status = pool_.stub(server).OpenNcclChannel(&context, request, &response);
    {
      absl::MutexLock lock(&link.call_mu);
      link.call = nullptr;
    }
    if (!call_status.ok()) refused = true;
  });
  // Given up on whichever comes first: the expert server's refusal, or shutdown.
  absl::StatusOr<std::unique_ptr<nccl::Channel>> channel =
      nccl::Channel::Join(*unique_id, 0, options_.device, deadline,
                          [&] { return refused.load() || link.cancel.load(); });
  call.join();
  if (!call_status.ok()) return fail(rpc::FromGrpc(call_status, "OpenNcclChannel"));
  if (!channel.ok()) return fail(channel.status());

  const size_t bytes = static_cast<size_t>(options_.max_rows * options_.hidden) * sizeof(float);
  if (link.host_in == nullptr) {
    absl::Status s = cuda::CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice");
    if (s.ok()) s = cuda::CudaStatus(cudaMallocHost(&link.host_in, bytes), "pinned staging");
    if (s.ok()) s = cuda::CudaStatus(cudaMallocHost(&link.host_out, bytes), "pinned staging");
    if (s.ok()) s = cuda::CudaStatus(cudaMalloc(&link.device_in, bytes), "device staging");
    if (s.ok()) s = cuda::CudaStatus(cudaMalloc(&link.device_out, bytes), "device staging");
    if (!s.ok()) return fail(s);
  }
  link.channel = std::move(*channel);
  link.id = response.channel();
  options_.logger->Log(LogLevel::kInfo,
                       absl::StrCat("dispatch: ", pool_.Name(server), ": NCCL channel ", link.id,
                                    " open (GPU ", options_.device, ")"));
  link.state.store(kOpen, std::memory_order_release);
}

void NcclLinks::Close(int server, const absl::Status& why) {
  Link& link = *links_[server];
  if (link.channel != nullptr) link.channel->Abort();
  link.channel.reset();
  link.retry_at = std::chrono::steady_clock::now() + options_.retry_after;
  link.state.store(kClosed, std::memory_order_release);
  options_.logger->Log(LogLevel::kWarning,
                       absl::StrCat("dispatch: ", pool_.Name(server), ": NCCL channel closed (",
                                    why.message(), ")"));
}

absl::Status NcclLinks::Post(int server, const float* x, const std::vector<int32_t>& rows) {
  Link& link = *links_[server];
  if (link.state.load(std::memory_order_acquire) != kOpen) {
    return absl::UnavailableError("no NCCL channel is open");
  }
  const int64_t H = options_.hidden;
  if (static_cast<int64_t>(rows.size()) > options_.max_rows) {
    return absl::ResourceExhaustedError(absl::StrCat(rows.size(),
                                                     " rows exceed the NCCL staging of ",
                                                     options_.max_rows));  // channel stays open
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(link.host_in + i * H, x + static_cast<int64_t>(rows[i]) * H, H * sizeof(float));
  }
  const size_t n = rows.size() * H;
  nccl::Channel& c = *link.channel;
  absl::Status s = cuda::CudaStatus(cudaSetDevice(c.device()), "cudaSetDevice");
  if (s.ok()) {
    s = cuda::CudaStatus(cudaMemcpyAsync(link.device_in, link.host_in, n * sizeof(float),
                                         cudaMemcpyHostToDevice, c.stream()),
                         "H2D");
  }
  if (s.ok()) s = c.Exchange(link.device_in, n, link.device_out, n);
  if (s.ok()) {
    s = cuda::CudaStatus(cudaMemcpyAsync(link.host_out, link.device_out, n * sizeof(float),
                                         cudaMemcpyDeviceToHost, c.stream()),
                         "D2H");
  }
  if (!s.ok()) {
    Close(server, s);
    return s;
  }
  link.rows = rows.size();
  return absl::OkStatus();
}

absl::StatusOr<const float*> NcclLinks::Collect(int server, const absl::Status& status) {
  Link& link = *links_[server];
  if (link.state.load(std::memory_order_acquire) != kOpen) {
    return absl::UnavailableError("no NCCL channel is open");
  }
  if (!status.ok()) {  // the expert server closes its side on any error: close ours
    Close(server, status);
    return status;
  }
  const absl::Status s =
      link.channel->Wait(std::chrono::steady_clock::now() + options_.transfer_timeout);
  if (!s.ok()) {
    Close(server, s);
    return s;
  }
  return static_cast<const float*>(link.host_out);
}

}  // namespace dsmoe
