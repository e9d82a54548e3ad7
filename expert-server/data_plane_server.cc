#include "expert-server/data_plane_server.h"

#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <list>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/address.h"
#include "expert-server/data_plane_frame.h"

namespace dsmoe {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using asio::ip::tcp;

namespace {

// Operations report errors as values (no exceptions).
constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);

// "host:port" or "[v6]:port".
absl::StatusOr<tcp::endpoint> ParseListen(const std::string& listen) {
  absl::StatusOr<rpc::HostPort> split = rpc::SplitHostPort(listen);
  if (!split.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("data-plane listen address: ", split.status().message()));
  }
  const std::string& host = split->host;
  const int port = split->port;
  boost::system::error_code ec;
  const asio::ip::address address = asio::ip::make_address(host, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("data-plane listen address '", listen, "': '",
                                                   host, "' is not an IP address"));
  }
  return tcp::endpoint(address, static_cast<uint16_t>(port));
}

absl::Status TlsError(const char* what, const boost::system::error_code& ec) {
  return absl::InvalidArgumentError(absl::StrCat("data plane TLS: ", what, ": ", ec.message()));
}

}  // namespace

// One client connection and its buffers (grown, never shrunk). Owned by Impl::connections;
// touched only on the io thread.
struct Connection {
  explicit Connection(tcp::socket socket) : plain(std::move(socket)) {}
  tcp::socket& lowest() { return tls ? tls->next_layer() : *plain; }

  std::optional<tcp::socket> plain;             // without TLS
  std::optional<ssl::stream<tcp::socket>> tls;  // with TLS (the socket moved in)
  data_plane::RequestHeader request;
  std::vector<uint32_t> payload;  // the request's payload, 4-byte aligned
  std::vector<float> output;
  std::string message;
  data_plane::ReplyHeader reply;
};

namespace {

// The status's message, cut to what a client accepts.
void SetMessage(Connection& c, const absl::Status& status) {
  const absl::string_view m = status.message();
  c.message.assign(m.data(), std::min<size_t>(m.size(), data_plane::kMaxMessageBytes));
}

}  // namespace

struct DataPlaneServer::Impl {
  Impl(ExpertService& s, const DataPlaneServerOptions& o) : service(s), options(o), acceptor(io) {}

  absl::Status Listen(const rpc::TransportSecurity& security);
  asio::awaitable<void> Accept();
  template <typename Stream>
  asio::awaitable<void> Serve(Connection& c, Stream& stream);
  // Replies to a hello or a request; `close`: the connection is closed after it.
  template <typename Stream>
  asio::awaitable<bool> ReplyError(Connection& c, Stream& stream, const absl::Status& status,
                                   bool close);
  void Log(LogLevel level, const std::string& message) { options.logger->Log(level, message); }

  ExpertService& service;
  const DataPlaneServerOptions options;
  data_plane::Limits limits;
  asio::io_context io{1};
  std::optional<ssl::context> tls;
  tcp::acceptor acceptor;
  int port = 0;
  std::list<Connection> connections;  // io thread only
  bool stopping = false;              // io thread only
  std::thread thread;
  absl::Mutex shutdown_mu;
  bool shut_down ABSL_GUARDED_BY(shutdown_mu) = false;
};

absl::Status DataPlaneServer::Impl::Listen(const rpc::TransportSecurity& security) {
  limits.hidden_size = static_cast<uint32_t>(service.hidden_size());
  limits.max_tokens = static_cast<uint32_t>(std::min<int64_t>(service.max_tokens(), UINT32_MAX));
  limits.max_assignments =
      static_cast<uint32_t>(std::min<int64_t>(service.max_assignments(), UINT32_MAX));
  if (!security.insecure()) {
    if (!security.has_certificate()) {
      return absl::InvalidArgumentError(
          "the data plane's TLS needs a server certificate and key (--tls-cert, --tls-key); "
          "plain text only with --insecure");
    }
    const rpc::TransportSecurityOptions& o = security.options();
    if (o.require_client_cert && security.ca_pem().empty()) {
      return absl::InvalidArgumentError(
          "client certificates are required (mutual TLS) but no CA verifies them: give --tls-ca "
          "or --tls-client-auth=none");
    }
    ssl::context& ctx = tls.emplace(ssl::context::tls_server);
    boost::system::error_code ec;
    ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                        ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1,
                    ec);
    SSL_CTX_set_ciphersuites(ctx.native_handle(), data_plane::kTls13CipherSuites);
    ctx.use_certificate_chain(asio::buffer(security.cert_pem()), ec);
    if (ec) return TlsError("the server certificate", ec);
    ctx.use_private_key(asio::buffer(security.key_pem()), ssl::context::pem, ec);
    if (ec) return TlsError("the server key", ec);
    if (o.require_client_cert) {
      ctx.add_certificate_authority(asio::buffer(security.ca_pem()), ec);
      if (ec) return TlsError("the CA", ec);
      ctx.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
    } else {
      ctx.set_verify_mode(ssl::verify_none, ec);
    }
  }
  DSMOE_ASSIGN_OR_RETURN(const tcp::endpoint endpoint, ParseListen(options.listen));
  boost::system::error_code ec;
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("data plane cannot listen on ", options.listen, ": ", ec.message()));
  }
  port = acceptor.local_endpoint(ec).port();
  return absl::OkStatus();
}

asio::awaitable<void> DataPlaneServer::Impl::Accept() {
  bool warned = false;
  while (!stopping) {
    auto [ec, socket] = co_await acceptor.async_accept(kAwait);
    if (stopping || !acceptor.is_open()) co_return;
    if (ec) {
      // Out of descriptors, say: wait a little rather than spin.
      Log(LogLevel::kWarning, absl::StrCat("data plane: accept failed: ", ec.message()));
      asio::steady_timer timer(io, std::chrono::milliseconds(100));
      co_await timer.async_wait(kAwait);
      continue;
    }
    if (static_cast<int>(connections.size()) >= options.max_connections) {
      if (!warned) {
        Log(LogLevel::kWarning, absl::StrCat("data plane: ", options.max_connections,
                                             " connections already; refusing more"));
        warned = true;
      }
      boost::system::error_code ignored;
      socket.close(ignored);
      continue;
    }
    warned = false;
    boost::system::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    Connection& c = connections.emplace_back(std::move(socket));
    auto it = std::prev(connections.end());
    auto done = [this, it](std::exception_ptr) { connections.erase(it); };
    if (tls) {
      c.tls.emplace(std::move(*c.plain), *tls);
      c.plain.reset();
      asio::co_spawn(io, Serve(c, *c.tls), done);
    } else {
      asio::co_spawn(io, Serve(c, *c.plain), done);
    }
  }
}

template <typename Stream>
asio::awaitable<bool> DataPlaneServer::Impl::ReplyError(Connection& c, Stream& stream,
                                                        const absl::Status& status, bool close) {
  SetMessage(c, status);
  c.reply = data_plane::ReplyHeader{};
  c.reply.status = static_cast<uint16_t>(status.code());
  c.reply.flags = close ? data_plane::kReplyCloses : 0;
  c.reply.payload_bytes = c.message.size();
  const std::array<asio::const_buffer, 2> buffers = {asio::buffer(&c.reply, sizeof(c.reply)),
                                                     asio::buffer(c.message)};
  auto [ec, n] = co_await asio::async_write(stream, buffers, kAwait);
  co_return !ec && !close;
}

template <typename Stream>
asio::awaitable<void> DataPlaneServer::Impl::Serve(Connection& c, Stream& stream) {
  if constexpr (!std::is_same_v<Stream, tcp::socket>) {
    auto [ec] = co_await stream.async_handshake(ssl::stream_base::server, kAwait);
    if (ec) {
      // Most often a client without a certificate of the cluster: worth a line, not more.
      Log(LogLevel::kWarning, absl::StrCat("data plane: TLS handshake failed: ", ec.message()));
      co_return;
    }
  }
  // The hello: the client's protocol and hidden size against ours.
  data_plane::HelloHeader hello;
  {
    auto [ec, n] = co_await asio::async_read(stream, asio::buffer(&hello, sizeof(hello)), kAwait);
    if (ec) co_return;
  }
  const absl::Status hello_status = data_plane::CheckHello(hello, limits);
  data_plane::HelloReplyHeader hello_reply;
  hello_reply.status = static_cast<uint32_t>(hello_status.code());
  hello_reply.hidden_size = limits.hidden_size;
  hello_reply.max_tokens = limits.max_tokens;
  hello_reply.max_assignments = limits.max_assignments;
  SetMessage(c, hello_status);
  hello_reply.message_bytes = static_cast<uint32_t>(c.message.size());
  {
    const std::array<asio::const_buffer, 2> buffers = {
        asio::buffer(&hello_reply, sizeof(hello_reply)), asio::buffer(c.message)};
    auto [ec, n] = co_await asio::async_write(stream, buffers, kAwait);
    if (ec || !hello_status.ok()) co_return;
  }
  const uint64_t H = limits.hidden_size;
  while (!stopping) {
    {
      auto [ec, n] =
          co_await asio::async_read(stream, asio::buffer(&c.request, sizeof(c.request)), kAwait);
      if (ec) co_return;  // closed by the client (or by Shutdown)
    }
    if (absl::Status s = data_plane::CheckRequestHeader(c.request, limits); !s.ok()) {
      co_await ReplyError(c, stream, s, /*close=*/true);
      co_return;
    }
    c.payload.resize((c.request.payload_bytes + 3) / 4);
    {
      auto [ec, n] = co_await asio::async_read(
          stream, asio::buffer(c.payload.data(), c.request.payload_bytes), kAwait);
      if (ec) co_return;
    }
    const data_plane::RequestView v = data_plane::ViewPayload(c.request, c.payload.data(), H);
    const size_t n = c.request.num_assignments;
    ComputeCall call;
    call.layer = c.request.layer;
    call.num_tokens = c.request.num_tokens;
    call.hidden = v.hidden;
    call.hidden_bytes = static_cast<size_t>(c.request.num_tokens * H * sizeof(float));
    call.token = {v.token, n};
    call.expert = {v.expert, n};
    call.weight = {v.weight, n};
    double seconds = 0;
    const absl::Status status = service.Compute(
        call,
        [&](int64_t T) {
          c.output.resize(static_cast<size_t>(T) * H);
          return c.output.data();
        },
        &seconds, std::chrono::steady_clock::now() + std::chrono::seconds(30));
    if (!status.ok()) {
      if (!co_await ReplyError(c, stream, status, /*close=*/false)) co_return;
      continue;
    }
    c.reply = data_plane::ReplyHeader{};
    c.reply.compute_seconds = seconds;
    c.reply.payload_bytes = c.request.num_tokens * H * sizeof(float);
    const std::array<asio::const_buffer, 2> buffers = {
        asio::buffer(&c.reply, sizeof(c.reply)),
        asio::buffer(c.output.data(), c.reply.payload_bytes)};
    auto [ec, written] = co_await asio::async_write(stream, buffers, kAwait);
    if (ec) co_return;
  }
}

DataPlaneServer::DataPlaneServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<DataPlaneServer>> DataPlaneServer::Start(
    ExpertService& service, const rpc::TransportSecurity& security,
    const DataPlaneServerOptions& options) {
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("data plane max_connections is ", options.max_connections, ", not >= 1"));
  }
  auto impl = std::make_unique<Impl>(service, options);
  DSMOE_RETURN_IF_ERROR(impl->Listen(security));
  Impl* p = impl.get();
  asio::co_spawn(p->io, p->Accept(), asio::detached);
  p->thread = std::thread([p] { p->io.run(); });
  return std::unique_ptr<DataPlaneServer>(new DataPlaneServer(std::move(impl)));
}

DataPlaneServer::~DataPlaneServer() { Shutdown(); }

int DataPlaneServer::port() const { return impl_->port; }

void DataPlaneServer::Shutdown() {
  {
    absl::MutexLock lock(&impl_->shutdown_mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
  }
  Impl* p = impl_.get();
  // Runs on the io thread once the handler running now (a computation, say) returns: closing
  // the sockets ends every connection's coroutine, and with them the io_context's work.
  asio::post(p->io, [p] {
    p->stopping = true;
    boost::system::error_code ignored;
    p->acceptor.close(ignored);
    for (Connection& c : p->connections) {
      c.lowest().shutdown(tcp::socket::shutdown_both, ignored);
      c.lowest().close(ignored);
    }
  });
  if (p->thread.joinable()) p->thread.join();
}

}  // namespace dsmoe
