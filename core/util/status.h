// Errors as values: every recoverable failure in dsmoe is an absl::Status (whose codes are
// gRPC's, so services convert it once at the RPC boundary) and every fallible producer returns
// absl::StatusOr<T>. Asserts are only for invariants whose violation is a bug.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define DSMOE_CONCAT_INNER_(a, b) a##b
#define DSMOE_CONCAT_(a, b) DSMOE_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if not OK.
#define DSMOE_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::absl::Status dsmoe_status_ = (expr);         \
    if (!dsmoe_status_.ok()) return dsmoe_status_; \
  } while (0)

// `DSMOE_ASSIGN_OR_RETURN(auto x, MakeX());` declares x from an OK StatusOr, or returns its
// error from the enclosing function.
#define DSMOE_ASSIGN_OR_RETURN(lhs, expr) \
  DSMOE_ASSIGN_OR_RETURN_IMPL_(DSMOE_CONCAT_(dsmoe_statusor_, __LINE__), lhs, expr)
#define DSMOE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = *std::move(tmp)
