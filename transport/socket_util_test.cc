#include "transport/socket_util.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "gtest/gtest.h"

namespace tether::socket_util {
namespace {

TEST(SplitHostPortTest, SplitsNamesV4AndBracketedV6) {
  std::string host;
  int port = 0;
  ASSERT_TRUE(SplitHostPort("10.0.0.4:41234", &host, &port).ok());
  EXPECT_EQ(host, "10.0.0.4");
  EXPECT_EQ(port, 41234);
  ASSERT_TRUE(SplitHostPort("[::1]:5", &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 5);
  ASSERT_TRUE(SplitHostPort("localhost:65535", &host, &port).ok());
  EXPECT_EQ(host, "localhost");
}

TEST(SplitHostPortTest, RejectsWhatIsNotHostPort) {
  std::string host = "unchanged";
  int port = -7;
  absl::Status s = SplitHostPort("localhost", &host, &port);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "address 'localhost' has no ':port'");
  for (const char* bad : {":80", "h:0", "h:65536", "h:x1", "h:", "[]:80"}) {
    s = SplitHostPort(bad, &host, &port);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(s.message(), std::string("address '") + bad + "' is not host:port");
  }
  EXPECT_EQ(host, "unchanged");
  EXPECT_EQ(port, -7);
}

TEST(ResolveTest, ResolvesLiteralsAndPrintsThem) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  ASSERT_TRUE(Resolve("127.0.0.1", 4242, /*passive=*/false, &ss, &len).ok());
  EXPECT_EQ(ss.ss_family, AF_INET);
  EXPECT_EQ(len, sizeof(sockaddr_in));
  EXPECT_EQ(SockaddrText(ss), "127.0.0.1:4242");
  EXPECT_EQ(SockaddrPort(ss), 4242);
  ASSERT_TRUE(Resolve("::1", 7, /*passive=*/false, &ss, &len).ok());
  EXPECT_EQ(ss.ss_family, AF_INET6);
  EXPECT_EQ(SockaddrText(ss), "[::1]:7");
  EXPECT_EQ(SockaddrPort(ss), 7);
  sockaddr_storage unix_addr{};
  unix_addr.ss_family = AF_UNIX;
  EXPECT_EQ(SockaddrText(unix_addr), "?");
  EXPECT_EQ(SockaddrPort(unix_addr), 0);
}

TEST(ResolveTest, UnresolvableHostIsInvalidArgument) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  absl::Status s = Resolve("no such host.invalid", 1, /*passive=*/false, &ss, &len);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("cannot resolve host 'no such host.invalid'"), absl::string_view::npos)
      << s;
}

int GetInt(int fd, int level, int name) {
  int value = -1;
  socklen_t len = sizeof(value);
  EXPECT_EQ(getsockopt(fd, level, name, &value, &len), 0) << std::strerror(errno);
  return value;
}

TEST(SetSocketOptionsTest, SetsNoDelayKeepaliveAndUserTimeout) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  KeepaliveOptions o;
  o.idle = absl::Seconds(7);
  o.interval = absl::Milliseconds(300);  // rounds down, but to at least one second
  o.count = 0;                           // at least one probe
  o.user_timeout = absl::Milliseconds(1500);
  SetSocketOptions(fd, o);
  EXPECT_EQ(GetInt(fd, IPPROTO_TCP, TCP_NODELAY), 1);
  EXPECT_EQ(GetInt(fd, SOL_SOCKET, SO_KEEPALIVE), 1);
  EXPECT_EQ(GetInt(fd, IPPROTO_TCP, TCP_KEEPIDLE), 7);
  EXPECT_EQ(GetInt(fd, IPPROTO_TCP, TCP_KEEPINTVL), 1);
  EXPECT_EQ(GetInt(fd, IPPROTO_TCP, TCP_KEEPCNT), 1);
  EXPECT_EQ(GetInt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT), 1500);
  close(fd);
}

TEST(ErrnoTextTest, IsStrerror) { EXPECT_EQ(ErrnoText(ECONNREFUSED), std::strerror(ECONNREFUSED)); }

}  // namespace
}  // namespace tether::socket_util
