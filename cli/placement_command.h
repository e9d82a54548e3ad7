// `dsmoe placement show|plan|apply`: the expert placement of a running cluster, through its
// attention servers' PlacementService.
#pragma once

#include <string>

#include "cli/cluster_state.h"

namespace dsmoe::cli {

struct PlacementOptions {
  std::string action;     // show | plan | apply
  std::string attention;  // attention server addresses, comma-separated; default: the cluster's
  std::string state_dir;  // of `dsmoe cluster up`, to find them (default .dsmoe-cluster)
  ClientTls tls;          // how to call them (default: the cluster state's client certificate)
  std::string placement;  // apply: this placement JSON (default: plan from the measured load)
  std::string out;        // plan: also write the planned placement JSON here
  bool force = false;     // apply: even below the redundancy floor (--min-copies)
  double timeout_seconds = 300;
  bool json = false;
};

int RunPlacement(const PlacementOptions& o);

}  // namespace dsmoe::cli
