#include "expert-server/nccl_channel.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::nccl {

// NCCL's entry points, from the library loaded at run time. It is 200 MB and not part of every
// CUDA installation: the servers start without it, and the transport then keeps to gRPC.
struct Api {
  decltype(&ncclGetUniqueId) GetUniqueId;
  decltype(&ncclGetErrorString) GetErrorString;
  decltype(&ncclGetLastError) GetLastError;
  decltype(&ncclCommInitRankConfig) CommInitRankConfig;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError;
  decltype(&ncclCommAbort) CommAbort;
  decltype(&ncclGroupStart) GroupStart;
  decltype(&ncclGroupEnd) GroupEnd;
  decltype(&ncclSend) Send;
  decltype(&ncclRecv) Recv;
};

namespace {

// Loads $DSMOE_NCCL_LIBRARY or libnccl.so.2 once (any thread).
absl::StatusOr<const Api*> LoadApi() {
  static const absl::StatusOr<Api> api = []() -> absl::StatusOr<Api> {
    const char* env = std::getenv("DSMOE_NCCL_LIBRARY");
    const char* name = env != nullptr && *env ? env : "libnccl.so.2";
    void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);  // kept for the process's life
    if (lib == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("cannot load NCCL (", dlerror(), ")"));
    }
    Api a{};
    bool missing = false;
    auto bind = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      missing = missing || fn == nullptr;
    };
    bind(a.GetUniqueId, "ncclGetUniqueId");
    bind(a.GetErrorString, "ncclGetErrorString");
    bind(a.GetLastError, "ncclGetLastError");
    bind(a.CommInitRankConfig, "ncclCommInitRankConfig");
    bind(a.CommGetAsyncError, "ncclCommGetAsyncError");
    bind(a.CommAbort, "ncclCommAbort");
    bind(a.GroupStart, "ncclGroupStart");
    bind(a.GroupEnd, "ncclGroupEnd");
    bind(a.Send, "ncclSend");
    bind(a.Recv, "ncclRecv");
    if (missing) {
      return absl::FailedPreconditionError(
          absl::StrCat(name, " lacks entry points this build needs (NCCL 2.14 or later)"));
    }
    return a;
  }();
  if (!api.ok()) return api.status();
  return &*api;
}

absl::Status NcclError(const Api& nccl, const char* what, ncclResult_t r, ncclComm_t comm) {
  const char* last = comm != nullptr ? nccl.GetLastError(comm) : nullptr;
  const bool detail = last != nullptr && *last;
  return absl::UnavailableError(absl::StrCat("NCCL ", what, ": ", nccl.GetErrorString(r),
                                             detail ? " (" : "", detail ? last : "",
                                             detail ? ")" : ""));
}

}  // namespace

absl::StatusOr<std::string> NewUniqueId() {
  DSMOE_ASSIGN_OR_RETURN(const Api* nccl, LoadApi());
  ncclUniqueId id;
  if (const ncclResult_t r = nccl->GetUniqueId(&id); r != ncclSuccess) {
    return NcclError(*nccl, "unique id", r, nullptr);
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<Channel>> Channel::Join(const std::string& unique_id, int rank,
                                                       int device, Deadline deadline,
                                                       const Cancelled& cancelled) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(id.internal),
                                                   " bytes, not ", unique_id.size()));
  }
  if (rank != 0 && rank != 1) return absl::InvalidArgumentError("a channel has ranks 0 and 1");
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  DSMOE_ASSIGN_OR_RETURN(const Api* nccl, LoadApi());
  DSMOE_RETURN_IF_ERROR(cuda::CheckCudaDevice(device));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
  auto channel = std::unique_ptr<Channel>(new Channel());
  channel->api_ = nccl;
  channel->rank_ = rank;
  channel->device_ = device;
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&channel->stream_, cudaStreamNonBlocking),
                             "NCCL channel stream");
  // Non-blocking: the join can be given up (deadline, or the peer refused) by aborting.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t r = nccl->CommInitRankConfig(&channel->comm_, 2, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    channel->Abort();
    return NcclError(*nccl, "joining the channel", r, nullptr);
  }
  DSMOE_RETURN_IF_ERROR(channel->Settle("joining the channel", deadline, cancelled));
  return channel;
}

Channel::~Channel() {
  Abort();  // frees the communicator whether or not the peer is still there
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void Channel::Abort() {
  if (comm_ == nullptr) return;
  Nccl().CommAbort(comm_);
  comm_ = nullptr;
}

absl::Status Channel::Settle(const char* what, Deadline deadline, const Cancelled& cancelled) {
  for (;;) {
    if (comm_ == nullptr) return absl::UnavailableError("the NCCL channel is broken");
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = Nccl().CommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      absl::Status error = NcclError(Nccl(), what, state, comm_);
      Abort();
      return error;
    }
    if (cancelled && cancelled()) {
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
  const Api& nccl = Nccl();
  ncclResult_t r = nccl.GroupStart();
  if (r == ncclSuccess && send_count > 0) {
    r = nccl.Send(send, send_count, ncclFloat32, peer, comm_, stream_);
  }
  if ((r == ncclSuccess || r == ncclInProgress) && recv_count > 0) {
    r = nccl.Recv(recv, recv_count, ncclFloat32, peer, comm_, stream_);
  }
  const ncclResult_t end = nccl.GroupEnd();
  if (r == ncclSuccess || r == ncclInProgress) r = end;
  if (r != ncclSuccess && r != ncclInProgress) {
    absl::Status error = NcclError(nccl, "exchange", r, comm_);
    Abort();
    return error;
  }
  // A non-blocking communicator may still be enqueueing: wait for that (not for the transfer).
  return Settle("exchange", std::chrono::steady_clock::now() + std::chrono::seconds(10), {});
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
    Nccl().CommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      absl::Status error = NcclError(Nccl(), "transfer", state, comm_);
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
