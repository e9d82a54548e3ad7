// One NCCL communicator of two ranks between an attention server's GPU (rank 0) and an expert
// server's GPU (rank 1): the NCCL transport's data path. The gRPC call that goes with each
// exchange carries the routing and the status; the hidden states and the expert outputs move
// GPU to GPU through this channel (NVLink, or the network with GPUDirect RDMA).
//
// Both sides must post matching operations in the same order. Any failure — an error from NCCL,
// a deadline passed, a non-OK gRPC reply — aborts the communicator: a channel that failed once
// is broken for good, and both sides go back to gRPC for that pair.
//
// Only in builds with DSMOE_CUDA. NCCL itself is loaded at run time (libnccl.so.2, or
// $DSMOE_NCCL_LIBRARY): without it every call says so (FAILED_PRECONDITION) and the transport
// keeps to gRPC. Thread-compatible.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "core/util/status.h"

namespace dsmoe::nccl {

struct Api;  // NCCL's entry points, loaded at run time

using Deadline = std::chrono::steady_clock::time_point;

// A fresh ncclUniqueId, as the bytes OpenNcclChannelRequest carries.
absl::StatusOr<std::string> NewUniqueId();

class Channel {
 public:
  // Asked while waiting: true gives the wait up (the peer said no, or shutdown).
  using Cancelled = std::function<bool()>;
  // Joins the communicator named by `unique_id` as `rank` (0 or 1) on CUDA device `device`,
  // waiting for the peer until `deadline` or until `cancelled()` (if given) says so.
  static absl::StatusOr<std::unique_ptr<Channel>> Join(const std::string& unique_id, int rank,
                                                       int device, Deadline deadline,
                                                       const Cancelled& cancelled = {});
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Enqueues on stream(), as one group: `send_count` floats from device memory `send` to the
  // peer, and `recv_count` floats from the peer into device memory `recv` (either count may
  // be 0).
  absl::Status Exchange(const float* send, size_t send_count, float* recv, size_t recv_count);
  // Waits for everything enqueued on stream(). Past `deadline`, or on a communicator error,
  // aborts the communicator (DEADLINE_EXCEEDED / UNAVAILABLE): the channel is broken for good.
  absl::Status Wait(Deadline deadline);
  // Aborts the communicator now (the peer failed): pending operations end, the channel is
  // broken.
  void Abort();

  bool broken() const { return comm_ == nullptr; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

 private:
  Channel() = default;
  // Polls the communicator until it leaves ncclInProgress; aborts it on error or past
  // `deadline`.
  absl::Status Settle(const char* what, Deadline deadline, const Cancelled& cancelled);

  const Api& Nccl() const { return *api_; }

  const Api* api_ = nullptr;
  ncclComm_t comm_ = nullptr;  // null once aborted
  int rank_ = 0;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace dsmoe::nccl
