#include "expert-server/nccl_channel.h"

#include <atomic>
#include <cstring>
#include <thread>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::nccl {
namespace {

absl::Status NcclError(const char* what, ncclResult_t r, ncclComm_t comm) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return absl::UnavailableError(
      absl::StrCat("NCCL ", what, ": ", ncclGetErrorString(r), last != nullptr && *last ? " (" : "",
                   last != nullptr ? last : "", last != nullptr && *last ? ")" : ""));
}

}  // namespace

absl::StatusOr<std::string> NewUniqueId() {
  ncclUniqueId id;
  if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
    return NcclError("unique id", r, nullptr);
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<Channel>> Channel::Join(const std::string& unique_id, int rank,
                                                       int device, Deadline deadline,
                                                       const std::atomic<bool>* cancel) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(id.internal),
                                                   " bytes, not ", unique_id.size()));
  }
  if (rank != 0 && rank != 1) return absl::InvalidArgumentError("a channel has ranks 0 and 1");
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  DSMOE_RETURN_IF_ERROR(cuda::CheckCudaDevice(device));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
  auto channel = std::unique_ptr<Channel>(new Channel());
  channel->rank_ = rank;
  channel->device_ = device;
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&channel->stream_, cudaStreamNonBlocking),
                             "NCCL channel stream");
  // Non-blocking: the join can be given up (deadline, or the peer refused) by aborting.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t r = ncclCommInitRankConfig(&channel->comm_, 2, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    channel->Abort();
    return NcclError("joining the channel", r, nullptr);
  }
  DSMOE_RETURN_IF_ERROR(channel->Settle("joining the channel", deadline, cancel));
  return channel;
}

Channel::~Channel() {
  Abort();  // frees the communicator whether or not the peer is still there
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void Channel::Abort() {
  if (comm_ == nullptr) return;
  ncclCommAbort(comm_);
  comm_ = nullptr;
}

absl::Status Channel::Settle(const char* what, Deadline deadline, const std::atomic<bool>* cancel) {
  for (;;) {
    if (comm_ == nullptr) return absl::UnavailableError("the NCCL channel is broken");
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      absl::Status error = NcclError(what, state, comm_);
      Abort();
      return error;
    }
    if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
      Abort();
      return absl::CancelledError(absl::StrCat("NCCL ", what, ": the peer gave up"));
    }
    if (std::chrono::steady_clock::now() > deadline) {
      Abort();
      return absl::DeadlineExceededError(absl::StrCat("NCCL ", what, ": the peer did not answer"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

absl::Status Channel::Exchange(const float* send, size_t send_count, float* recv,
                               size_t recv_count) {
  if (comm_ == nullptr) return absl::UnavailableError("the NCCL channel is broken");
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  const int peer = 1 - rank_;
  ncclResult_t r = ncclGroupStart();
  if (r == ncclSuccess && send_count > 0) {
    r = ncclSend(send, send_count, ncclFloat32, peer, comm_, stream_);
  }
  if ((r == ncclSuccess || r == ncclInProgress) && recv_count > 0) {
    r = ncclRecv(recv, recv_count, ncclFloat32, peer, comm_, stream_);
  }
  const ncclResult_t end = ncclGroupEnd();
  if (r == ncclSuccess || r == ncclInProgress) r = end;
  if (r != ncclSuccess && r != ncclInProgress) {
    absl::Status error = NcclError("exchange", r, comm_);
    Abort();
    return error;
  }
  // A non-blocking communicator may still be enqueueing: wait for that (not for the transfer).
  return Settle("exchange", std::chrono::steady_clock::now() + std::chrono::seconds(10), nullptr);
}

absl::Status Channel::Wait(Deadline deadline) {
  for (;;) {
    if (comm_ == nullptr) return absl::UnavailableError("the NCCL channel is broken");
    const cudaError_t q = cudaStreamQuery(stream_);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q != cudaErrorNotReady) {
      Abort();
      return cuda::CudaStatus(q, "NCCL transfer");
    }
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      absl::Status error = NcclError("transfer", state, comm_);
      Abort();
      return error;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      Abort();
      return absl::DeadlineExceededError("NCCL transfer: the peer did not complete it in time");
    }
    std::this_thread::yield();
  }
}

}  // namespace dsmoe::nccl
