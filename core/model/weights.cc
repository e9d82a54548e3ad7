#include "core/model/weights.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "core/io/bulk_read.h"
#include "core/model/tensor_roles.h"
#include "core/util/cpu_quota.h"
#include "core/util/memory_limit.h"

namespace dsmoe {

namespace {

// Looks the tensors of a role up by name (tensor_roles.h) and checks their shapes against what
// the config implies.
class TensorLoader {
 public:
  TensorLoader(const Checkpoint& ckpt, const ModelConfig& config) : ckpt_(ckpt), config_(config) {}

  absl::StatusOr<MatrixView> Matrix(TensorRole role, int64_t layer = -1, int64_t expert = -1) {
    const std::string name = TensorName(role, layer, expert);
    const std::vector<int64_t> want = TensorShape(role, config_);
    const char* why = RoleInfo(role).shape_why;
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != want) return WrongShape(name, t.shape, want, why);
    const int64_t rows = want[0], cols = want[1];
    if (t.dtype != DType::kI8) return MatrixView{t.dtype, rows, cols, t.data};
    // Q8_0 (dsmoe quantize): int8 values with an F16 scale per block of 32 along each row.
    const std::string scale_name = Q8ScaleName(name);
    if (cols % kQ8Block != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(ckpt_.dir(), ": tensor '", name, "' is I8 but its ", cols,
                       " columns are not a multiple of the Q8_0 block of ", kQ8Block));
    }
    DSMOE_ASSIGN_OR_RETURN(TensorView scales, ckpt_.Tensor(scale_name));
    if (scales.dtype != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", scale_name,
                                                     "' must be F16, is ",
                                                     std::string(DTypeName(scales.dtype))));
    }
    if (scales.shape != std::vector<int64_t>{rows, cols / kQ8Block}) {
      return WrongShape(scale_name, scales.shape, {rows, cols / kQ8Block},
                        "Q8_0 scales: one per 32 weights");
    }
    return MatrixView{DType::kQ8_0, rows, cols, t.data, static_cast<const uint16_t*>(scales.data)};
  }

  absl::StatusOr<std::vector<float>> Vector(TensorRole role, int64_t layer = -1) {
    const std::string name = TensorName(role, layer);
    const std::vector<int64_t> want = TensorShape(role, config_);
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != want) return WrongShape(name, t.shape, want, RoleInfo(role).shape_why);
    std::vector<float> v(want[0]);
    for (int64_t i = 0; i < want[0]; ++i) v[i] = LoadAsF32(t.data, t.dtype, i);
    return v;
  }

  absl::StatusOr<MlpWeights> Mlp(const MlpRoles& roles, int64_t layer, int64_t expert = -1) {
    MlpWeights m;
    DSMOE_ASSIGN_OR_RETURN(m.gate, Matrix(roles.gate, layer, expert));
    DSMOE_ASSIGN_OR_RETURN(m.up, Matrix(roles.up, layer, expert));
    DSMOE_ASSIGN_OR_RETURN(m.down, Matrix(roles.down, layer, expert));
    return m;
  }

 private:
  absl::Status WrongShape(const std::string& name, const std::vector<int64_t>& got,
                          const std::vector<int64_t>& want, const char* why) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", name, "' has shape ",
                                                   ShapeToString(got), ", expected ",
                                                   ShapeToString(want), " (", why, ")"));
  }
  const Checkpoint& ckpt_;
  const ModelConfig& config_;
};

// A layer's attention-side tensors: norms, attention, and the dense MLP or the router and
// shared experts.
absl::Status LoadAttentionSide(TensorLoader& load, const ModelConfig& c, int64_t layer,
                               LayerWeights& L) {
  DSMOE_ASSIGN_OR_RETURN(L.input_norm, load.Vector(TensorRole::kInputNorm, layer));
  DSMOE_ASSIGN_OR_RETURN(L.post_attention_norm, load.Vector(TensorRole::kPostAttentionNorm, layer));
  LinearWeights* projections[] = {&L.attention.q, &L.attention.k, &L.attention.v, &L.attention.o};
  for (size_t p = 0; p < std::size(projections); ++p) {
    const ProjectionRoles& roles = kAttentionProjections[p];
    DSMOE_ASSIGN_OR_RETURN(projections[p]->weight, load.Matrix(roles.weight, layer));
    if (HasTensor(roles.bias, c, layer)) {
      DSMOE_ASSIGN_OR_RETURN(projections[p]->bias, load.Vector(roles.bias, layer));
    }
  }
  if (HasTensor(TensorRole::kDenseGate, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.dense, load.Mlp(kDenseMlpRoles, layer));
  }
  if (HasTensor(TensorRole::kRouter, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.router, load.Matrix(TensorRole::kRouter, layer));
  }
  if (HasTensor(TensorRole::kSharedGate, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.shared, load.Mlp(kSharedMlpRoles, layer));
  }
  return absl::OkStatus();
}

}  // namespace

const char* PlacementName(WeightLoadOptions::Placement placement) {
  switch (placement) {
    case WeightLoadOptions::Placement::kAuto:
      return "auto";
    case WeightLoadOptions::Placement::kMap:
      return "map";
    case WeightLoadOptions::Placement::kCopy:
      return "copy";
  }
  return "?";
}

std::string WeightLoadReport::Describe() const {
  const double gb = static_cast<double>(bytes) / 1e9;
  const char* where = placement == WeightLoadOptions::Placement::kCopy
                          ? "copied into anonymous memory"
                          : "mapped from the page cache";
  return absl::StrFormat(
      "weights: %.2f GB from %d shard%s %s, %.0f%% in 2 MiB pages, in %.2f s (%.2f GB/s): open "
      "%.2f s, fault-in %.2f s, re-read %.2f s, copy %.2f s%s; %s",
      gb, num_shards, num_shards == 1 ? "" : "s", where,
      resident_bytes > 0 ? 100.0 * static_cast<double>(huge_bytes) / resident_bytes : 0.0,
      total_seconds, read_seconds > 0 ? gb / read_seconds : 0.0, open_seconds, populate_seconds,
      reread_seconds, copy_seconds, locked ? ", locked in memory" : "", reason);
}

namespace {

using Clock = std::chrono::steady_clock;
double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Prints "loading weights: 3.2 of 17.4 GB (18%), 1.1 GB/s" while a load runs, from
// `after` on and every `every` (so short loads print nothing). Thread-safe.
class ProgressReporter {
 public:
  ProgressReporter(Logger* logger, const std::atomic<uint64_t>& bytes_done, uint64_t total,
                   absl::Duration after, absl::Duration every)
      : logger_(logger), done_(bytes_done), total_(total) {
    if (logger_ == nullptr || total_ == 0) return;
    thread_ = std::thread([this, after, every] {
      const Clock::time_point start = Clock::now();
      absl::Duration wait = after;
      while (!stop_.WaitForNotificationWithTimeout(wait)) {
        const double done = static_cast<double>(done_.load(std::memory_order_relaxed));
        logger_->Log(LogLevel::kInfo,
                     absl::StrFormat("loading weights: %.1f of %.1f GB (%.0f%%), %.2f GB/s",
                                     done / 1e9, static_cast<double>(total_) / 1e9,
                                     100.0 * done / static_cast<double>(total_),
                                     done / 1e9 / SecondsSince(start)));
        wait = every;
      }
    });
  }
  ~ProgressReporter() {
    stop_.Notify();
    if (thread_.joinable()) thread_.join();
  }

 private:
  Logger* logger_;
  const std::atomic<uint64_t>& done_;
  uint64_t total_;
  absl::Notification stop_;
  std::thread thread_;
};

// Of the shards' mappings, what this process holds, and how much in 2 MiB pages.
ResidentPages ResidentOf(const std::vector<Checkpoint::MappedShard>& shards) {
  ResidentPages sum;
  for (const auto& shard : shards) {
    const ResidentPages r = ResidentPagesIn(shard.data, shard.size);
    sum.rss += r.rss;
    sum.huge += r.huge;
  }
  return sum;
}

// Three quarters in 2 MiB pages: a busy machine's page cache falls back to small folios where it
// finds no free 2 MiB block, so a cold start on the reference box gets ~90%, not 100%.
bool MostlyHuge(const ResidentPages& r) { return r.rss > 0 && r.huge >= r.rss * 3 / 4; }

// The shard whose mapping holds `p`, or null.
const Checkpoint::MappedShard* ShardOf(const std::vector<Checkpoint::MappedShard>& shards,
                                       const void* p) {
  const auto* b = static_cast<const std::byte*>(p);
  for (const auto& shard : shards) {
    if (b >= shard.data && b < shard.data + shard.size) return &shard;
  }
  return nullptr;
}

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kChunkBytes = size_t{8} << 20;

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& dir,
                                                                 const WeightSelection& selection,
                                                                 const WeightLoadOptions& options) {
  const Clock::time_point start = Clock::now();
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  DSMOE_ASSIGN_OR_RETURN(w->checkpoint_, Checkpoint::Open(dir));
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  DSMOE_ASSIGN_OR_RETURN(std::string config_text, w->checkpoint_->ReadJsonFile("config.json"));
  DSMOE_ASSIGN_OR_RETURN(w->config_, ModelConfig::FromJson(config_text, config_path));
  auto gen_text = w->checkpoint_->ReadJsonFile("generation_config.json");
  if (gen_text.ok()) {
    DSMOE_ASSIGN_OR_RETURN(
        w->generation_config_,
        GenerationConfig::FromJson(*gen_text,
                                   (std::filesystem::path(dir) / "generation_config.json").string(),
                                   w->config_));
  } else {
    w->generation_config_ = GenerationConfig::FromModel(w->config_);
  }
  DSMOE_RETURN_IF_ERROR(w->LoadTensors(selection));
  w->report_.open_seconds = SecondsSince(start);
  w->report_.num_shards = static_cast<int64_t>(w->checkpoint_->ShardNames().size());

  const Clock::time_point read_start = Clock::now();
  const int64_t available = AvailableMemoryBytes();  // before this load takes any
  std::atomic<uint64_t> progress{0};
  {
    ThreadPool pool(options.threads > 0 ? options.threads : std::max(4, UsableCpus()));
    DSMOE_RETURN_IF_ERROR(w->Place(options, pool, progress));
    if (w->report_.placement == WeightLoadOptions::Placement::kMap && options.lock_mapped &&
        options.populate && w->report_.bytes > 0) {
      const int64_t bytes = w->report_.bytes;
      if (available <= 0 || available >= bytes + bytes / 10) {
        w->LockMappings();
        if (w->report_.locked) DSMOE_RETURN_IF_ERROR(w->RefaultEvicted(pool, progress));
      } else {
        // Short of memory, paging weights in and out beats failing to start.
        w->report_.reason =
            absl::StrCat(w->report_.reason, "; not locked in memory (", FormatBytes(available),
                         " available for ", FormatBytes(bytes),
                         " of weights): the kernel may evict "
                         "weights under pressure and decode read them again");
      }
    }
  }
  w->report_.read_seconds = SecondsSince(read_start);
  w->report_.total_seconds = SecondsSince(start);
  if (options.logger != nullptr && w->report_.bytes > 0) {
    options.logger->Log(LogLevel::kInfo, w->report_.Describe());
  }
  return w;
}

size_t ModelWeights::MatrixBytes() {
  std::set<const void*> seen;
  size_t bytes = 0;
  ForEachMatrix([&](MatrixView& m) {
    if (seen.insert(m.data).second) bytes += m.NumBytes() + m.ScaleBytes();
  });
  return bytes;
}

std::vector<ModelWeights::Piece> ModelWeights::DistinctPieces() {
  std::vector<Piece> pieces;
  std::set<const void*> seen;
  ForEachMatrix([&](MatrixView& m) {
    if (!seen.insert(m.data).second) return;  // tied: one copy
    pieces.push_back({static_cast<const std::byte*>(m.data), m.NumBytes()});
    if (m.scales != nullptr) {
      pieces.push_back({reinterpret_cast<const std::byte*>(m.scales), m.ScaleBytes()});
    }
  });
  return pieces;
}

absl::Status ModelWeights::Place(const WeightLoadOptions& options, ThreadPool& pool,
                                 std::atomic<uint64_t>& progress) {
  using Placement = WeightLoadOptions::Placement;
  const std::vector<Piece> pieces = DistinctPieces();
  int64_t bytes = 0;
  for (const Piece& p : pieces) bytes += static_cast<int64_t>(p.size);
  report_.bytes = bytes;
  if (bytes == 0) {  // a config-only selection
    report_.placement = Placement::kMap;
    report_.reason = "nothing selected";
    return absl::OkStatus();
  }
  ProgressReporter reporter(options.logger, progress, static_cast<uint64_t>(bytes),
                            options.progress_after, options.progress_every);
  // A copy holds the weights once only if the file's page cache is dropped as it is read,
  // unless memory holds both (then the next start reads the copy from the cache).
  auto copy = [&](std::string why) -> absl::Status {
    const int64_t available = AvailableMemoryBytes();
    const bool drop = available > 0 && available < 2 * bytes + bytes / 10;
    report_.placement = Placement::kCopy;
    report_.reason = absl::StrCat(why, drop ? "; the file is dropped from the page cache as it is "
                                              "read (memory cannot hold both)"
                                            : "");
    progress.store(0);
    const Clock::time_point t = Clock::now();
    absl::Status s = CopyIn(pieces, pool, drop, progress);
    report_.copy_seconds = SecondsSince(t);
    return s;
  };

  if (options.placement == Placement::kCopy) return copy("--copy-weights / placement copy");
  if (options.placement == Placement::kMap) {
    report_.placement = Placement::kMap;
    report_.reason = "--mmap-weights / placement map";
    Clock::time_point t = Clock::now();
    if (options.populate) DSMOE_RETURN_IF_ERROR(Populate(pieces, pool, progress));
    report_.populate_seconds = SecondsSince(t);
    ResidentPages r = ResidentOf(checkpoint_->MappedShards());
    if (options.populate && !MostlyHuge(r) && TransparentHugePagesAvailable()) {
      // The cache holds the file in small folios (another program read or wrote it): read it
      // again into huge ones if the kernel makes them, still one copy.
      bool works = false;
      int64_t reread = 0;
      t = Clock::now();
      DSMOE_RETURN_IF_ERROR(RereadSmallPagedShards(pieces, pool, progress, works, reread));
      report_.reread_seconds = SecondsSince(t);
      if (works) {
        report_.reason = absl::StrFormat("%s; re-read %.2f GB that the cache held in 4 KiB pages",
                                         report_.reason, static_cast<double>(reread) / 1e9);
      }
      r = ResidentOf(checkpoint_->MappedShards());
    }
    report_.resident_bytes = static_cast<int64_t>(r.rss);
    report_.huge_bytes = static_cast<int64_t>(r.huge);
    return absl::OkStatus();
  }

  // kAuto.
  if (!TransparentHugePagesAvailable()) {
    report_.placement = Placement::kMap;
    report_.reason =
        "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled: never), so "
        "a copy would gain nothing: mapped";
    DSMOE_RETURN_IF_ERROR(Populate(pieces, pool, progress));
    const ResidentPages r = ResidentOf(checkpoint_->MappedShards());
    report_.resident_bytes = static_cast<int64_t>(r.rss);
    return absl::OkStatus();
  }
  Clock::time_point t = Clock::now();
  DSMOE_RETURN_IF_ERROR(Populate(pieces, pool, progress));
  report_.populate_seconds = SecondsSince(t);
  ResidentPages r = ResidentOf(checkpoint_->MappedShards());
  std::string why = "the kernel maps the checkpoint's page cache with 2 MiB pages";
  if (!MostlyHuge(r)) {
    bool works = false;
    int64_t reread = 0;
    t = Clock::now();
    DSMOE_RETURN_IF_ERROR(RereadSmallPagedShards(pieces, pool, progress, works, reread));
    report_.reread_seconds = SecondsSince(t);
    r = ResidentOf(checkpoint_->MappedShards());
    if (works && MostlyHuge(r)) {
      why = absl::StrFormat(
          "the kernel maps the checkpoint's page cache with 2 MiB pages (re-read %.2f GB that "
          "the cache held in 4 KiB pages, as a file just written or copied is; later starts "
          "map it at once)",
          static_cast<double>(reread) / 1e9);
    } else if (works || r.huge > 0) {
      // The kernel does map this file with 2 MiB pages (some are; or the trial range came back
      // huge); the rest stays small because the cache holds it so (dirty pages of a file just
      // written, another process's mapping, a fragmented memory the trial met). Keep the
      // mapping: a copy costs a read and a write of every weight (measured: 47 s for the 16B
      // model in Q8_0 when 74% was already huge, against 1.2 s mapped) for fewer TLB misses
      // on the small part, and decode measured no faster from it (3.3 tok/s copied with 63% in
      // 2 MiB pages against 4.1 mapped with 51%).
      why = absl::StrFormat(
          "%.0f%% of the checkpoint's page cache is mapped with 2 MiB pages (the rest is held in "
          "4 KiB pages by the cache; a start after it is dropped maps it whole)",
          100.0 * static_cast<double>(r.huge) / std::max<size_t>(r.rss, 1));
    } else {
      const int64_t available = AvailableMemoryBytes();
      const std::string small =
          absl::StrFormat("only %.0f%% of the mapped weights got 2 MiB pages (%s)",
                          100.0 * static_cast<double>(r.huge) / std::max<size_t>(r.rss, 1),
                          "this kernel or file system maps files with 4 KiB pages");
      // The mapped pages count as available (page cache): what a copy needs is the weights
      // once more, plus a margin.
      if (available <= 0 || available >= bytes + bytes / 10) {
        return copy(absl::StrCat(small, ": copied into huge pages (", FormatBytes(available),
                                 " available)"));
      }
      why = absl::StrCat(small, "; memory (", FormatBytes(available),
                         " available) cannot hold a copy: mapped with 4 KiB pages, decode reads "
                         "them more slowly");
    }
  }
  report_.placement = Placement::kMap;
  report_.reason = why;
  report_.resident_bytes = static_cast<int64_t>(r.rss);
  report_.huge_bytes = static_cast<int64_t>(r.huge);
  return absl::OkStatus();
}

void ModelWeights::LockMappings() {
  report_.locked = true;
  for (const auto& shard : checkpoint_->MappedShards()) {
    if (mlock2(shard.data, shard.size, MLOCK_ONFAULT) != 0) {
      const int err = errno;
      for (const auto& s : checkpoint_->MappedShards()) (void)munlock(s.data, s.size);
      report_.locked = false;
      report_.reason = absl::StrCat(
          report_.reason, "; not locked in memory (", std::strerror(err),
          err == ENOMEM || err == EPERM
              ? ": RLIMIT_MEMLOCK too low; raise it (ulimit -l, a container's memlock limit) or "
                "grant CAP_IPC_LOCK"
              : "",
          "): under memory pressure the kernel may evict weights and decode read them again");
      return;
    }
  }
}

absl::Status ModelWeights::RefaultEvicted(ThreadPool& pool, std::atomic<uint64_t>& progress) {
  // A checkpoint near the size of memory, read cold: while the last pieces were faulted in, the
  // kernel reclaimed some of the first (nothing was locked yet), and they would come back one
  // major fault at a time in the first forward passes (measured: the 16B model in Q8_0 on a
  // 23 GiB box, prompt 9-11 s and decode at 0.9 tok/s until they had). Locked now, what is
  // faulted in stays.
  ResidentPages r = ResidentOf(checkpoint_->MappedShards());
  if (static_cast<int64_t>(r.rss) >= report_.bytes) return absl::OkStatus();
  const int64_t missing = report_.bytes - static_cast<int64_t>(r.rss);
  const Clock::time_point t = Clock::now();
  progress.store(0);
  DSMOE_RETURN_IF_ERROR(Populate(DistinctPieces(), pool, progress));
  report_.populate_seconds += SecondsSince(t);
  r = ResidentOf(checkpoint_->MappedShards());
  report_.resident_bytes = static_cast<int64_t>(r.rss);
  report_.huge_bytes = static_cast<int64_t>(r.huge);
  report_.reason = absl::StrFormat(
      "%s; at least %.2f GB that memory pressure evicted before the lock faulted in again",
      report_.reason, static_cast<double>(missing) / 1e9);
  return absl::OkStatus();
}

absl::Status ModelWeights::Populate(const std::vector<Piece>& pieces, ThreadPool& pool,
                                    std::atomic<uint64_t>& progress) {
  const std::vector<Checkpoint::MappedShard> shards = checkpoint_->MappedShards();
  std::vector<MappedSpan> spans;
  for (const Piece& p : pieces) {
    const Checkpoint::MappedShard* shard = ShardOf(shards, p.data);
    if (shard == nullptr) return absl::InternalError("a weight view points outside every shard");
    // Merge with the previous span when contiguous in the same file: fewer, longer requests.
    if (!spans.empty() && spans.back().path == &shard->path &&
        spans.back().begin + spans.back().size == p.data) {
      spans.back().size += p.size;
    } else {
      spans.push_back({p.data, p.size, &shard->path});
    }
  }
  return PopulateSpans(spans, pool, kChunkBytes, &progress);
}

absl::Status ModelWeights::RereadSmallPagedShards(const std::vector<Piece>& pieces,
                                                  ThreadPool& pool, std::atomic<uint64_t>& progress,
                                                  bool& works, int64_t& reread_bytes) {
  works = false;
  reread_bytes = 0;
  const std::vector<Checkpoint::MappedShard> shards = checkpoint_->MappedShards();
  // Try one 2 MiB-aligned range inside a piece: drop it from this process and from the page
  // cache, fault it in again, and see whether it comes back as one huge page.
  for (const Piece& p : pieces) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p.data);
    const uintptr_t first = (begin + kHugePage - 1) / kHugePage * kHugePage;
    if (first + kHugePage > begin + p.size) continue;
    const Checkpoint::MappedShard* shard = ShardOf(shards, p.data);
    if (shard == nullptr) continue;
    DSMOE_ASSIGN_OR_RETURN(auto file, ReadOnlyFile::Open(shard->path));
    const size_t before = ResidentPagesIn(shard->data, shard->size).huge;
    (void)madvise(reinterpret_cast<void*>(first), kHugePage, MADV_DONTNEED);
    // Written back first: dirty pages (a file just written) cannot be dropped.
    file->DropFromPageCache(first - reinterpret_cast<uintptr_t>(shard->data), kHugePage,
                            /*write_back_first=*/true);
    const MappedSpan trial{reinterpret_cast<const std::byte*>(first), kHugePage, &shard->path};
    DSMOE_RETURN_IF_ERROR(PopulateSpans({&trial, 1}, pool, kHugePage, nullptr));
    works = ResidentPagesIn(shard->data, shard->size).huge >= before + kHugePage;
    break;
  }
  if (!works) return absl::OkStatus();
  // It does: re-read every shard that is mostly small pages.
  std::vector<Piece> again;
  for (const auto& shard : shards) {
    if (MostlyHuge(ResidentPagesIn(shard.data, shard.size))) continue;
    DSMOE_ASSIGN_OR_RETURN(auto file, ReadOnlyFile::Open(shard.path));
    (void)madvise(const_cast<std::byte*>(shard.data), shard.size, MADV_DONTNEED);
    // Not written back first: a file written just now would cost its whole write-back here;
    // its dirty pages stay small, and a copy follows if too many do.
    file->DropFromPageCache(0, shard.size, /*write_back_first=*/false);
    for (const Piece& p : pieces) {
      if (ShardOf({shard}, p.data) != nullptr) {
        again.push_back(p);
        reread_bytes += static_cast<int64_t>(p.size);
      }
    }
  }
  progress.store(0);
  return Populate(again, pool, progress);
}

absl::Status ModelWeights::CopyIn(const std::vector<Piece>& pieces, ThreadPool& pool,
                                  bool drop_cache, std::atomic<uint64_t>& progress) {
  constexpr size_t kAlign = 64;  // cache line: rows of a matrix start aligned when cols allow
  auto padded = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  const std::vector<Checkpoint::MappedShard> shards = checkpoint_->MappedShards();
  // Where each piece is in which file, and where it goes in the buffer.
  std::map<std::string, std::unique_ptr<ReadOnlyFile>> files;
  struct Source {
    const ReadOnlyFile* file;
    uint64_t offset;
  };
  std::vector<Source> sources;
  size_t total = 0;
  for (const Piece& p : pieces) {
    const Checkpoint::MappedShard* shard = ShardOf(shards, p.data);
    if (shard == nullptr) return absl::InternalError("a weight view points outside every shard");
    auto& file = files[shard->path];
    if (file == nullptr) {
      DSMOE_ASSIGN_OR_RETURN(file, ReadOnlyFile::Open(shard->path));
    }
    sources.push_back({file.get(), static_cast<uint64_t>(p.data - shard->data)});
    total += padded(p.size);
  }
  DSMOE_ASSIGN_OR_RETURN(buffer_, HugePageBuffer::Allocate(total));
  std::vector<ReadSpan> spans;
  std::map<const void*, std::byte*> moved;  // old address → the copy
  size_t offset = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    std::byte* dst = buffer_->data() + offset;
    spans.push_back({sources[i].file, sources[i].offset, pieces[i].size, dst});
    moved.emplace(pieces[i].data, dst);
    offset += padded(pieces[i].size);
  }
  // The views still point into the mappings; unmap those pages from this process first, so the
  // page cache can drop what is read.
  for (const auto& shard : shards) {
    (void)madvise(const_cast<std::byte*>(shard.data), shard.size, MADV_DONTNEED);
  }
  BulkReadOptions read_options;
  read_options.chunk_bytes = kChunkBytes;
  read_options.drop_from_page_cache = drop_cache;
  DSMOE_RETURN_IF_ERROR(ReadSpans(spans, pool, read_options, &progress));
  // Every matrix of the same data (tied embeddings) moves to the same copy; a Q8_0 matrix's
  // scales move with it.
  ForEachMatrix([&](MatrixView& m) {
    m.data = moved.at(m.data);
    if (m.scales != nullptr) {
      m.scales = reinterpret_cast<const uint16_t*>(moved.at(m.scales));
    }
  });
  // Nothing points into the file mappings any more: unmap them, so the weights are resident once.
  checkpoint_->ReleaseMappings();
  const ResidentPages r = ResidentPagesIn(buffer_->data(), buffer_->size());
  report_.resident_bytes = static_cast<int64_t>(r.rss);
  report_.huge_bytes = static_cast<int64_t>(r.huge);
  return absl::OkStatus();
}

absl::Status ModelWeights::LoadTensors(const WeightSelection& selection) {
  const ModelConfig& c = config_;
  TensorLoader load(*checkpoint_, c);
  if (selection.attention_side) {
    DSMOE_ASSIGN_OR_RETURN(embed_tokens, load.Matrix(TensorRole::kTokenEmbedding));
    DSMOE_ASSIGN_OR_RETURN(final_norm, load.Vector(TensorRole::kFinalNorm));
    if (HasTensor(TensorRole::kLmHead, c)) {
      DSMOE_ASSIGN_OR_RETURN(lm_head, load.Matrix(TensorRole::kLmHead));
    } else {
      lm_head = embed_tokens;  // tie_word_embeddings
    }
  }
  layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = layers[i];
    L.is_moe = c.IsMoeLayer(i);
    if (selection.attention_side) DSMOE_RETURN_IF_ERROR(LoadAttentionSide(load, c, i, L));
    if (!HasTensor(TensorRole::kExpertGate, c, i)) continue;
    L.routed.resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (!selection.WantsExpert(i, e)) continue;
      DSMOE_ASSIGN_OR_RETURN(L.routed[e], load.Mlp(kRoutedExpertRoles, i, e));
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
