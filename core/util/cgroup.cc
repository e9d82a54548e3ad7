#include "core/util/cgroup.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"

namespace dsmoe {
namespace {

// The process's cgroup v2 path ("0::<path>" in /proc/self/cgroup); "/" when unknown.
std::string CgroupV2Path() {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "0::")) return line.substr(3);
  }
  return "/";
}

}  // namespace

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string ReadCgroupV2File(const std::string& name) {
  for (const std::string& dir :
       {"/sys/fs/cgroup" + CgroupV2Path(), std::string("/sys/fs/cgroup")}) {
    std::string text = ReadSmallFile(dir + "/" + name);
    if (!text.empty()) return text;
  }
  return "";
}

}  // namespace dsmoe
