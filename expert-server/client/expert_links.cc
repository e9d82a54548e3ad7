#include "expert-server/client/expert_links.h"

#include <openssl/ssl.h>
#include <poll.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/util/status.h"
#include "expert-server/data_plane_frame.h"

namespace dsmoe {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using ErrorCode = boost::system::error_code;

// How long a data port that could not be reached is left alone before the next attempt.
constexpr std::chrono::seconds kConnectRetryPeriod{5};

namespace {

// The connection to one server, and its buffers (grown, never shrunk). Runner thread only.
struct Link {
  int index = 0;
  // The endpoint the connection is (or will be) made to, and its version in Impl::endpoints.
  std::string host;
  int port = 0;
  uint64_t endpoint_version = 0;
  std::string address;  // host:port, for messages

  std::optional<tcp::socket> plain;             // without TLS
  std::optional<ssl::stream<tcp::socket>> tls;  // with TLS
  bool connected = false;                       // handshake and hello done, socket open
  data_plane::Limits limits;                    // the server's, from its hello reply
  int ops = 0;                                  // asynchronous operations not yet completed
  uint64_t generation = 0;  // bumped by every Start and close: stale handlers see a change
  // After a failed connect, Start refuses at once until then (calls go by gRPC): an
  // unreachable data port must not cost a connect attempt on every layer of every step.
  Clock::time_point retry_after{};
  absl::Status connect_error;  // why the last connect failed

  std::vector<uint32_t> send;  // the request frame, 4-byte aligned
  size_t send_bytes = 0;
  data_plane::ReplyHeader reply;
  std::vector<float> output;
  size_t output_bytes = 0;
  std::string message;
  bool pending = false;  // started and not settled
  ExpertLinks::Result result;
};

bool IsIpAddress(const std::string& host) {
  ErrorCode ec;
  asio::ip::make_address(host, ec);
  return !ec;
}

}  // namespace

struct ExpertLinks::Impl {
  Impl(int num_servers, const rpc::TransportSecurity& security, int64_t hidden_size);

  absl::Status Connect(Link& l, Clock::time_point deadline);
  // Closes the socket; handlers of operations in flight then complete as aborted (at the next
  // drive). Safe inside handlers.
  void CloseSocket(Link& l);
  // CloseSocket, then runs the aborted handlers and drops the streams. Not inside handlers.
  void Reset(Link& l);
  // Runs handlers until `done` or `deadline`; false on the deadline.
  bool Drive(const bool& done, Clock::time_point deadline);
  // Settles the call in flight on `l` with `status` (a transport failure closes the socket).
  void Settle(Link& l, absl::Status status);
  void ReadReply(Link& l, uint64_t generation);
  absl::Status Unavailable(const Link& l, const std::string& what) const {
    return absl::UnavailableError(
        absl::StrCat("expert server ", l.index, " data plane at ", l.address, ": ", what));
  }
  template <typename F>
  void WithStream(Link& l, F&& f) {
    if (l.tls)
      f(*l.tls);
    else
      f(*l.plain);
  }
  // Whether the server has closed an idle connection (or it failed) since the last call.
  static bool PeerHungUp(Link& l);

  asio::io_context io{1};
  rpc::TransportSecurity security;
  std::optional<ssl::context> tls;
  absl::Status init_status;  // why TLS could not be set up; every Start returns it
  const int64_t H;
  std::vector<Link> links;
  int num_pending = 0;

  struct Endpoint {
    std::string host;
    int port = 0;
    uint64_t version = 0;
  };
  mutable absl::Mutex mu;
  std::vector<Endpoint> endpoints ABSL_GUARDED_BY(mu);
};

ExpertLinks::Impl::Impl(int num_servers, const rpc::TransportSecurity& transport_security,
                        int64_t hidden_size)
    : security(transport_security), H(hidden_size), links(static_cast<size_t>(num_servers)) {
  for (int s = 0; s < num_servers; ++s) links[s].index = s;
  absl::MutexLock lock(&mu);
  endpoints.resize(static_cast<size_t>(num_servers));
  if (security.insecure()) return;
  ssl::context& ctx = tls.emplace(ssl::context::tls_client);
  ErrorCode ec;
  ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                      ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1,
                  ec);
  SSL_CTX_set_ciphersuites(ctx.native_handle(), data_plane::kTls13CipherSuites);
  // The peer is verified as gRPC verifies it: against the cluster CA (or the system roots),
  // with the name expected (server_name, or the host dialled) in its certificate.
  if (!security.ca_pem().empty()) {
    ctx.add_certificate_authority(asio::buffer(security.ca_pem()), ec);
  } else {
    ctx.set_default_verify_paths(ec);
  }
  if (ec) {
    init_status =
        absl::FailedPreconditionError(absl::StrCat("data plane TLS: the CA: ", ec.message()));
    return;
  }
  if (security.has_certificate()) {  // the client certificate mutual TLS asks for
    ctx.use_certificate_chain(asio::buffer(security.cert_pem()), ec);
    if (!ec) ctx.use_private_key(asio::buffer(security.key_pem()), ssl::context::pem, ec);
    if (ec) {
      init_status = absl::FailedPreconditionError(
          absl::StrCat("data plane TLS: the client certificate: ", ec.message()));
      return;
    }
  }
  ctx.set_verify_mode(ssl::verify_peer, ec);
}

bool ExpertLinks::Impl::Drive(const bool& done, Clock::time_point deadline) {
  while (!done) {
    if (io.stopped()) io.restart();
    if (io.run_one_until(deadline) == 0 && !done) {
      // Nothing ran: the deadline passed (or, a bug, nothing is left to wait for).
      if (Clock::now() >= deadline || io.stopped()) return false;
    }
  }
  return true;
}

void ExpertLinks::Impl::CloseSocket(Link& l) {
  ErrorCode ignored;
  if (l.tls) l.tls->next_layer().close(ignored);
  if (l.plain) l.plain->close(ignored);
  l.connected = false;
  ++l.generation;
}

void ExpertLinks::Impl::Reset(Link& l) {
  CloseSocket(l);
  while (l.ops > 0) {  // aborted operations complete at once
    if (io.stopped()) io.restart();
    io.run_one();
  }
  l.tls.reset();
  l.plain.reset();
}

bool ExpertLinks::Impl::PeerHungUp(Link& l) {
  pollfd p{};
  p.fd = l.tls ? l.tls->next_layer().native_handle() : l.plain->native_handle();
  // Not POLLIN: unread bytes alone are no failure.
  p.events = POLLRDHUP;
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

absl::Status ExpertLinks::Impl::Connect(Link& l, Clock::time_point deadline) {
  Reset(l);
  l.address = absl::StrCat(l.host, ":", l.port);
  std::vector<tcp::endpoint> candidates;
  ErrorCode ec;
  const asio::ip::address ip = asio::ip::make_address(l.host, ec);
  if (!ec) {
    candidates.emplace_back(ip, static_cast<uint16_t>(l.port));
  } else {
    // A name (a pod's DNS name, say): resolved here, blocking, once per connection.
    tcp::resolver resolver(io);
    const auto results = resolver.resolve(l.host, std::to_string(l.port), ec);
    if (ec) return Unavailable(l, absl::StrCat("cannot resolve ", l.host, ": ", ec.message()));
    for (const auto& r : results) candidates.push_back(r.endpoint());
  }
  l.plain.emplace(io);
  bool done = false;
  ++l.ops;
  asio::async_connect(*l.plain, candidates, [&](const ErrorCode& e, const tcp::endpoint&) {
    --l.ops;
    ec = e;
    done = true;
  });
  if (!Drive(done, deadline)) {
    Reset(l);
    return absl::DeadlineExceededError(absl::StrCat("expert server ", l.index, " data plane at ",
                                                    l.address, ": connecting timed out"));
  }
  if (ec) {
    Reset(l);
    return Unavailable(l, absl::StrCat("cannot connect: ", ec.message()));
  }
  l.plain->set_option(tcp::no_delay(true), ec);
  if (tls) {
    l.tls.emplace(std::move(*l.plain), *tls);
    l.plain.reset();
    const std::string& name =
        security.options().server_name.empty() ? l.host : security.options().server_name;
    if (!IsIpAddress(name)) SSL_set_tlsext_host_name(l.tls->native_handle(), name.c_str());
    l.tls->set_verify_callback(ssl::host_name_verification(name), ec);
    done = false;
    ++l.ops;
    l.tls->async_handshake(ssl::stream_base::client, [&](const ErrorCode& e) {
      --l.ops;
      ec = e;
      done = true;
    });
    if (!Drive(done, deadline)) {
      Reset(l);
      return absl::DeadlineExceededError(absl::StrCat("expert server ", l.index, " data plane at ",
                                                      l.address, ": TLS handshake timed out"));
    }
    if (ec) {
      Reset(l);
      return Unavailable(l, absl::StrCat("TLS handshake failed: ", ec.message()));
    }
  }
  // The hello: protocol version and hidden size; the server answers with its limits.
  data_plane::HelloHeader hello;
  hello.hidden_size = static_cast<uint32_t>(H);
  data_plane::HelloReplyHeader reply;
  bool wrote = false, read = false;
  ErrorCode write_ec, read_ec;
  WithStream(l, [&](auto& stream) {
    l.ops += 2;
    asio::async_write(stream, asio::buffer(&hello, sizeof(hello)), [&](const ErrorCode& e, size_t) {
      --l.ops;
      write_ec = e;
      wrote = true;
    });
    asio::async_read(stream, asio::buffer(&reply, sizeof(reply)), [&](const ErrorCode& e, size_t) {
      --l.ops;
      read_ec = e;
      read = true;
    });
  });
  const bool in_time = Drive(read, deadline) && Drive(wrote, deadline);
  if (!in_time || write_ec || read_ec) {
    Reset(l);  // runs the handlers above before their variables go
    if (!in_time) {
      return absl::DeadlineExceededError(absl::StrCat("expert server ", l.index, " data plane at ",
                                                      l.address, ": hello timed out"));
    }
    return Unavailable(l, absl::StrCat("hello failed: ", (read_ec ? read_ec : write_ec).message()));
  }
  if (reply.magic != data_plane::kHelloMagic || reply.version != data_plane::kVersion ||
      reply.message_bytes > data_plane::kMaxMessageBytes || reply.status > 16) {
    Reset(l);
    return Unavailable(l, "not a dsmoe data-plane server of this protocol version");
  }
  if (reply.status != 0) {
    l.message.resize(reply.message_bytes);
    read = false;
    WithStream(l, [&](auto& stream) {
      ++l.ops;
      asio::async_read(stream, asio::buffer(l.message), [&](const ErrorCode& e, size_t) {
        --l.ops;
        read_ec = e;
        read = true;
      });
    });
    Drive(read, deadline);
    Reset(l);
    return absl::Status(static_cast<absl::StatusCode>(reply.status),
                        absl::StrCat("expert server ", l.index, " data plane at ", l.address,
                                     " refused the hello: ", read_ec ? "" : l.message));
  }
  l.limits = {reply.hidden_size, reply.max_tokens, reply.max_assignments};
  l.connected = true;
  return absl::OkStatus();
}

void ExpertLinks::Impl::Settle(Link& l, absl::Status status) {
  if (!l.pending) return;
  const bool transport_failure = status.code() == absl::StatusCode::kUnavailable ||
                                 status.code() == absl::StatusCode::kInternal;
  l.result.status = std::move(status);
  l.pending = false;
  --num_pending;
  if (transport_failure) CloseSocket(l);
}

void ExpertLinks::Impl::ReadReply(Link& l, uint64_t generation) {
  WithStream(l, [&](auto& stream) {
    ++l.ops;
    asio::async_read(
        stream, asio::buffer(&l.reply, sizeof(l.reply)),
        [this, &l, &stream, generation](const ErrorCode& ec, size_t) {
          --l.ops;
          if (generation != l.generation || !l.pending) return;
          if (ec) {
            Settle(l, Unavailable(l, ec == asio::error::eof || ec == ssl::error::stream_truncated
                                         ? "the server closed the connection"
                                         : ec.message()));
            return;
          }
          if (absl::Status s = data_plane::CheckReplyHeader(l.reply, l.output_bytes); !s.ok()) {
            Settle(l, Unavailable(l, std::string(s.message())));
            return;
          }
          const bool ok = l.reply.status == 0;
          if (!ok) l.message.resize(l.reply.payload_bytes);
          const asio::mutable_buffer payload =
              ok ? asio::buffer(l.output.data(), l.output_bytes) : asio::buffer(l.message);
          ++l.ops;
          asio::async_read(stream, payload, [this, &l, generation](const ErrorCode& e, size_t) {
            --l.ops;
            if (generation != l.generation || !l.pending) return;
            if (e) {
              Settle(l, Unavailable(l, e.message()));
              return;
            }
            l.result.received_bytes = sizeof(l.reply) + l.reply.payload_bytes;
            l.result.compute_seconds = l.reply.compute_seconds;
            const bool closes = (l.reply.flags & data_plane::kReplyCloses) != 0;
            if (l.reply.status == 0) {
              l.result.output = l.output.data();
              Settle(l, absl::OkStatus());
            } else {
              Settle(l, absl::Status(static_cast<absl::StatusCode>(l.reply.status), l.message));
            }
            if (closes) CloseSocket(l);
          });
        });
  });
}

ExpertLinks::ExpertLinks(int num_servers, const rpc::TransportSecurity& security,
                         int64_t hidden_size)
    : impl_(std::make_unique<Impl>(num_servers, security, hidden_size)) {}

ExpertLinks::~ExpertLinks() {
  for (Link& l : impl_->links) impl_->Reset(l);
}

void ExpertLinks::SetEndpoint(int s, const std::string& host, int port) {
  absl::MutexLock lock(&impl_->mu);
  Impl::Endpoint& e = impl_->endpoints[s];
  if (e.host == host && e.port == port) return;
  e.host = host;
  e.port = port;
  ++e.version;
}

bool ExpertLinks::HasEndpoint(int s) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->endpoints[s].port != 0;
}

absl::Status ExpertLinks::Start(int s, const LinkCall& call, Clock::time_point deadline) {
  Impl& m = *impl_;
  DSMOE_RETURN_IF_ERROR(m.init_status);
  Link& l = m.links[s];
  if (l.pending) {
    return absl::FailedPreconditionError(
        absl::StrCat("a data-plane call to expert server ", s, " is still in flight"));
  }
  {
    absl::MutexLock lock(&m.mu);
    const Impl::Endpoint& e = m.endpoints[s];
    if (e.version != l.endpoint_version) {
      m.Reset(l);  // a new address: the old connection goes
      l.host = e.host;
      l.port = e.port;
      l.endpoint_version = e.version;
      l.retry_after = {};  // a new endpoint is tried at once
    }
  }
  if (l.port == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert server ", s, " has no data-plane endpoint"));
  }
  if (l.connected && Impl::PeerHungUp(l)) m.Reset(l);
  if (!l.connected) {
    if (Clock::now() < l.retry_after) return l.connect_error;
    if (absl::Status connected = m.Connect(l, deadline); !connected.ok()) {
      l.retry_after = Clock::now() + kConnectRetryPeriod;
      l.connect_error = absl::UnavailableError(absl::StrCat(
          connected.message(), " (no new attempt for ", kConnectRetryPeriod.count(), " s)"));
      return connected;
    }
  }

  const size_t T = call.rows.size(), n = call.token.size();
  const size_t H = static_cast<size_t>(m.H);
  if (call.expert.size() != n || call.weight.size() != n) {
    return absl::InvalidArgumentError("token, expert and weight lists differ in length");
  }
  if (T > l.limits.max_tokens || n > l.limits.max_assignments) {
    return absl::ResourceExhaustedError(
        absl::StrCat(T, " tokens and ", n, " assignments exceed the limits of expert server ", s,
                     "'s data plane (", l.limits.max_tokens, ", ", l.limits.max_assignments, ")"));
  }
  // The frame: header, the rows gathered, then token, expert and weight.
  data_plane::RequestHeader header;
  header.layer = call.layer;
  header.num_tokens = static_cast<uint32_t>(T);
  header.num_assignments = static_cast<uint32_t>(n);
  header.payload_bytes = data_plane::RequestPayloadBytes(T, n, H);
  l.send_bytes = sizeof(header) + header.payload_bytes;
  if (l.send.size() * 4 < l.send_bytes) l.send.resize(l.send_bytes / 4);
  auto* bytes = reinterpret_cast<unsigned char*>(l.send.data());
  std::memcpy(bytes, &header, sizeof(header));
  float* hidden = reinterpret_cast<float*>(bytes + sizeof(header));
  for (size_t i = 0; i < T; ++i) {
    std::memcpy(hidden + i * H, call.x + static_cast<size_t>(call.rows[i]) * H, H * sizeof(float));
  }
  uint32_t* token = reinterpret_cast<uint32_t*>(hidden + T * H);
  uint32_t* expert = token + n;
  for (size_t i = 0; i < n; ++i) {
    token[i] = static_cast<uint32_t>(call.token[i]);
    expert[i] = static_cast<uint32_t>(call.expert[i]);
  }
  std::memcpy(expert + n, call.weight.data(), n * sizeof(float));
  l.output_bytes = T * H * sizeof(float);
  if (l.output.size() < T * H) l.output.resize(T * H);

  l.result = Result{};
  l.result.sent_bytes = l.send_bytes;
  l.pending = true;
  ++m.num_pending;
  const uint64_t generation = ++l.generation;
  m.WithStream(l, [&](auto& stream) {
    ++l.ops;
    asio::async_write(stream, asio::buffer(l.send.data(), l.send_bytes),
                      [&m, &l, generation](const ErrorCode& ec, size_t) {
                        --l.ops;
                        if (generation != l.generation || !l.pending || !ec) return;
                        m.Settle(l, m.Unavailable(l, absl::StrCat("send failed: ", ec.message())));
                      });
  });
  m.ReadReply(l, generation);
  // On the wire now (what the socket buffer takes), so the server computes meanwhile.
  if (m.io.stopped()) m.io.restart();
  m.io.poll();
  return absl::OkStatus();
}

void ExpertLinks::WaitAll(Clock::time_point deadline) {
  Impl& m = *impl_;
  while (m.num_pending > 0) {
    if (m.io.stopped()) m.io.restart();
    if (m.io.run_one_until(deadline) == 0 && Clock::now() >= deadline) break;
  }
  for (Link& l : m.links) {
    if (l.pending) {
      m.Settle(l, absl::DeadlineExceededError(absl::StrCat("expert server ", l.index,
                                                           " data plane at ", l.address,
                                                           ": no reply before the deadline")));
      m.CloseSocket(l);  // the reply may still come: the stream is out of step
    }
    if (!l.connected && (l.plain || l.tls)) m.Reset(l);
  }
}

const ExpertLinks::Result& ExpertLinks::result(int s) const { return impl_->links[s].result; }

}  // namespace dsmoe
