// rpc::StartServer listens exactly where it says: one listening socket per port asked for
// (port 0 included), and a port another server holds is refused instead of shared. The
// listening sockets are read from the kernel (/proc/net/tcp6 and tcp, matched to this
// process's file descriptors), not from what the server reports.
#include <dirent.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "absl/strings/str_join.h"
#include "core/io/mapped_file.h"
#include "core/rpc/address.h"
#include "core/rpc/server.h"
#include "core/util/log.h"

namespace dsmoe::rpc {
namespace {

// Ports of the TCP sockets in LISTEN state that this process holds.
std::multiset<int> ListeningPortsOfThisProcess() {
  std::set<std::string> inodes;  // socket inodes of this process's descriptors
  if (DIR* dir = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(dir)) {
      char target[256];
      const std::string path = std::string("/proc/self/fd/") + e->d_name;
      const ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
      if (n <= 0) continue;
      const std::string link(target, static_cast<size_t>(n));
      if (link.rfind("socket:[", 0) == 0) inodes.insert(link.substr(8, link.size() - 9));
    }
    closedir(dir);
  }
  std::multiset<int> ports;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
          timeout >> inode;
      if (state != "0A" || inodes.count(inode) == 0) continue;  // 0A: LISTEN
      ports.insert(std::stoi(local.substr(local.rfind(':') + 1), nullptr, 16));
    }
  }
  return ports;
}

ServerOptions PlainText(const std::string& address) {
  ServerOptions o;
  o.address = address;
  o.security = TransportSecurity::Insecure();
  return o;
}

TEST(StartServer, PortZeroListensOnOnePortOnly) {
  const std::multiset<int> before = ListeningPortsOfThisProcess();
  absl::StatusOr<RunningServer> server = StartServer(PlainText("127.0.0.1:0"), {});
  ASSERT_TRUE(server.ok()) << server.status();
  std::multiset<int> added = ListeningPortsOfThisProcess();
  for (int p : before) added.erase(added.find(p));
  EXPECT_EQ(added, std::multiset<int>{server->port});
}

TEST(StartServer, AHealthPortIsOneMoreListenerAndNothingElse) {
  const std::multiset<int> before = ListeningPortsOfThisProcess();
  ServerOptions o = PlainText("127.0.0.1:0");
  o.health_address = "127.0.0.1:0";
  absl::StatusOr<RunningServer> server = StartServer(o, {});
  ASSERT_TRUE(server.ok()) << server.status();
  std::multiset<int> added = ListeningPortsOfThisProcess();
  for (int p : before) added.erase(added.find(p));
  EXPECT_EQ(added, (std::multiset<int>{server->port, server->health_port}));
}

// A health port asked for as port 0 is found where it is reported: the ready file and the log
// name the port the kernel shows this process listening on.
TEST(StartServer, AnEphemeralHealthPortIsInTheReadyFileAndTheLog) {
  const std::multiset<int> before = ListeningPortsOfThisProcess();
  CapturingLogger log;
  ServerOptions o = PlainText("127.0.0.1:0");
  o.health_address = "127.0.0.1:0";
  o.metrics_port = 9999;  // not bound here: only written
  o.ready_file = testing::TempDir() + "/health-port.ready";
  o.logger = &log;
  absl::StatusOr<RunningServer> server = StartServer(o, {});
  ASSERT_TRUE(server.ok()) << server.status();
  std::multiset<int> added = ListeningPortsOfThisProcess();
  for (int p : before) added.erase(added.find(p));
  ASSERT_EQ(added.size(), 2u);
  added.erase(added.find(server->port));
  const int health_port = *added.begin();  // the kernel's view
  absl::StatusOr<std::string> text = ReadTextFile(o.ready_file, 64);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, absl::StrCat(server->port, "\n9999\n", health_port, "\n"));
  absl::StatusOr<ReadyPorts> ports = ParseReadyFile(*text);
  ASSERT_TRUE(ports.ok()) << ports.status();
  EXPECT_EQ(*ports, (ReadyPorts{server->port, 9999, health_port}));
  EXPECT_TRUE(
      log.Contains(absl::StrCat("plain-text health checks (grpc.health.v1 Check only) on "
                                "127.0.0.1:",
                                health_port, " (--health-listen 127.0.0.1:0)")))
      << absl::StrJoin(log.lines(), "\n");
}

TEST(SplitHostPort, ReadsEveryAddressShapeTheServersAndClientsUse) {
  const struct {
    const char* address;
    const char* host;
    int port;
  } cases[] = {{"127.0.0.1:7100", "127.0.0.1", 7100},
               {"[::1]:0", "::1", 0},
               {"0.0.0.0:50052", "0.0.0.0", 50052},
               {"dns:///experts-0.dsmoe:50051", "experts-0.dsmoe", 50051},
               {"ipv4:10.0.0.2:80", "10.0.0.2", 80},
               {":8000", "", 8000}};
  for (const auto& c : cases) {
    absl::StatusOr<HostPort> got = SplitHostPort(c.address);
    ASSERT_TRUE(got.ok()) << c.address << ": " << got.status();
    EXPECT_EQ(got->host, c.host) << c.address;
    EXPECT_EQ(got->port, c.port) << c.address;
  }
  for (const char* bad : {"", "localhost", "host:", "host:x", "host:65536", "host:-1"}) {
    absl::StatusOr<HostPort> got = SplitHostPort(bad);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ReadyFile, EveryShapeRoundTripsAndTheOldOnesStillRead) {
  const std::string path = testing::TempDir() + "/shapes.ready";
  for (const ReadyPorts& p : {ReadyPorts{7100, 0, 0}, ReadyPorts{7100, 9400, 0},
                              ReadyPorts{7100, 0, 8081}, ReadyPorts{7100, 9400, 8081},
                              ReadyPorts{7100, 0, 0, 8000}, ReadyPorts{7100, 9400, 8081, 8000}}) {
    ASSERT_TRUE(WriteReadyFile(path, p).ok());
    absl::StatusOr<std::string> text = ReadTextFile(path, 64);
    ASSERT_TRUE(text.ok());
    absl::StatusOr<ReadyPorts> back = ParseReadyFile(*text);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, p) << *text;
  }
  // As servers before the health port wrote them.
  EXPECT_EQ(*ParseReadyFile("7100\n"), (ReadyPorts{7100, 0, 0}));
  EXPECT_EQ(*ParseReadyFile("7100\n9400\n"), (ReadyPorts{7100, 9400, 0}));
  for (const char* bad : {"", "\n", "0\n", "x\n", "7100\n70000\n", "1\n2\n3\n4\n5\n", "-1\n"}) {
    EXPECT_EQ(ParseReadyFile(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(StartServer, APortAnotherServerHoldsIsRefused) {
  absl::StatusOr<RunningServer> first = StartServer(PlainText("127.0.0.1:0"), {});
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<RunningServer> second = StartServer(PlainText(first->address()), {});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(first->address()), std::string::npos) << second.status();
}

}  // namespace
}  // namespace dsmoe::rpc
