#include "transport/frame.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

Message Sample(int buffers, size_t size) {
  Message m;
  m.envelope.set_type(wire::TEST_CALL);
  m.envelope.set_request_id(7);
  m.envelope.set_payload("hello");
  for (int i = 0; i < buffers; ++i) {
    std::string s(size + i, static_cast<char>('a' + i));
    m.buffers.push_back(Buffer::CopyFrom(s));
  }
  return m;
}

std::string Wire(const EncodedFrame& f) {
  std::string s(reinterpret_cast<const char*>(f.header), kFrameHeaderSize);
  s += f.envelope;
  for (const Buffer& b : f.buffers) s += std::string(b.view());
  return s;
}

std::string WireOf(Message m) {
  return Wire(EncodeFrame(std::move(m)).value());
}

absl::Status FeedAll(FrameReader& r, const std::string& bytes,
                     std::vector<Message>* out, size_t chunk = 1 << 30) {
  absl::Status s;
  for (size_t i = 0; i < bytes.size() && s.ok(); i += chunk) {
    size_t n = std::min(chunk, bytes.size() - i);
    s = r.Feed(reinterpret_cast<const uint8_t*>(bytes.data()) + i, n, out);
  }
  return s;
}

TEST(FrameTest, EncodeKeepsBuffersUncopied) {
  Message m = Sample(2, 10);
  const uint8_t* p = m.buffers[1].data();
  EncodedFrame f = EncodeFrame(std::move(m)).value();
  ASSERT_EQ(f.buffers.size(), 2u);
  EXPECT_EQ(f.buffers[1].data(), p);
  EXPECT_EQ(f.size(), kFrameHeaderSize + f.envelope.size() + 21);
}

TEST(FrameTest, RoundTripWholeAndByteByByte) {
  std::string bytes =
      WireOf(Sample(3, 100)) + WireOf(Sample(0, 0)) + WireOf(Message());
  for (size_t chunk : {size_t{1} << 30, size_t{1}, size_t{7}}) {
    FrameReader r;
    std::vector<Message> out;
    ASSERT_TRUE(FeedAll(r, bytes, &out, chunk).ok());
    ASSERT_EQ(out.size(), 3u);
    EXPECT_TRUE(r.at_frame_boundary());
    EXPECT_EQ(out[0].envelope.payload(), "hello");
    EXPECT_EQ(out[0].envelope.request_id(), 7u);
    ASSERT_EQ(out[0].buffers.size(), 3u);
    EXPECT_TRUE(out[0].CheckBuffers().ok());
    EXPECT_EQ(out[0].buffers[2].view(), std::string(102, 'c'));
    EXPECT_TRUE(out[1].buffers.empty());
    EXPECT_EQ(out[2].envelope.type(), wire::MESSAGE_TYPE_UNSPECIFIED);
  }
}

TEST(FrameTest, EmptyBuffersSurvive) {
  Message m;
  m.buffers = {Buffer(), Buffer::CopyFrom("x"), Buffer()};
  FrameReader r;
  std::vector<Message> out;
  ASSERT_TRUE(FeedAll(r, WireOf(std::move(m)), &out).ok());
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].buffers.size(), 3u);
  EXPECT_TRUE(out[0].buffers[0].empty());
  EXPECT_EQ(out[0].buffers[1].view(), "x");
  EXPECT_TRUE(out[0].CheckBuffers().ok());
}

TEST(FrameTest, DirectReadsFillTheBufferInPlace) {
  std::string bytes = WireOf(Sample(1, 1000));
  FrameReader r;
  std::vector<Message> out;
  size_t head = bytes.size() - 1000;
  ASSERT_TRUE(FeedAll(r, bytes.substr(0, head + 10), &out).ok());
  ASSERT_EQ(r.DirectSize(), 990u);
  std::memcpy(r.DirectData(), bytes.data() + head + 10, 990);
  r.CommitDirect(990, &out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].buffers[0].view(), std::string(1000, 'a'));
  EXPECT_EQ(r.DirectSize(), 0u);
}

void ExpectRejected(const std::string& bytes, const std::string& needle,
                    FrameLimits limits = {}) {
  FrameReader r(limits);
  std::vector<Message> out;
  absl::Status s = FeedAll(r, bytes, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  // The reader stays failed.
  EXPECT_EQ(r.Feed(reinterpret_cast<const uint8_t*>("x"), 1, &out).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FrameTest, RejectsBadHeaders) {
  std::string good = WireOf(Sample(1, 10));
  std::string bad = good;
  bad[0] = 'X';
  ExpectRejected(bad, "wrong magic");
  ExpectRejected("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "wrong magic");
  bad = good;
  bad[4] = 9;
  ExpectRejected(bad, "unsupported version 9");
  bad = good;
  bad[6] = 2;
  ExpectRejected(bad, "unknown flags");
  uint8_t h[kFrameHeaderSize];
  EncodeFrameHeader({0xffffffffu, 0}, h);
  ExpectRejected(std::string(reinterpret_cast<char*>(h), kFrameHeaderSize),
                 "envelope of");
  EncodeFrameHeader({0, 0xffffffffu}, h);
  ExpectRejected(std::string(reinterpret_cast<char*>(h), kFrameHeaderSize),
                 "buffers exceed");
}

TEST(FrameTest, RejectsBadEnvelopes) {
  // Garbage envelope bytes.
  uint8_t h[kFrameHeaderSize];
  EncodeFrameHeader({4, 0}, h);
  ExpectRejected(std::string(reinterpret_cast<char*>(h), kFrameHeaderSize) +
                     "\xff\xff\xff\xff",
                 "does not parse");
  // Header and envelope disagree on the buffer count.
  EncodedFrame f = EncodeFrame(Sample(2, 5)).value();
  EncodeFrameHeader({static_cast<uint32_t>(f.envelope.size()), 1}, f.header);
  ExpectRejected(Wire(f), "announces 1 buffers but the envelope describes 2");
  // A buffer beyond the limits.
  FrameLimits small;
  small.max_buffer_bytes = 100;
  ExpectRejected(WireOf(Sample(1, 101)), "buffer 0 of 101 bytes exceeds",
                 small);
  small.max_buffer_bytes = 1000;
  small.max_total_buffer_bytes = 150;
  ExpectRejected(WireOf(Sample(2, 100)), "buffers total more than", small);
  // An impossible size is rejected before any allocation.
  Message huge;
  huge.envelope.add_buffers()->set_size(~uint64_t{0});
  std::string env = huge.envelope.SerializeAsString();
  EncodeFrameHeader({static_cast<uint32_t>(env.size()), 1}, h);
  ExpectRejected(
      std::string(reinterpret_cast<char*>(h), kFrameHeaderSize) + env,
      "exceeds");
}

TEST(FrameTest, Goodbye) {
  uint8_t h[kFrameHeaderSize];
  FrameHeader goodbye;
  goodbye.goodbye = true;
  EncodeFrameHeader(goodbye, h);
  FrameReader r;
  std::vector<Message> out;
  std::string bytes = WireOf(Sample(1, 3)) +
                      std::string(reinterpret_cast<char*>(h), kFrameHeaderSize);
  ASSERT_TRUE(FeedAll(r, bytes, &out).ok());
  EXPECT_EQ(out.size(), 1u);
  EXPECT_TRUE(r.goodbye());
  // A goodbye that claims to carry a message is bad input.
  EncodeFrameHeader({4, 0, true}, h);
  ExpectRejected(std::string(reinterpret_cast<char*>(h), kFrameHeaderSize),
                 "goodbye frame must not carry");
}

TEST(FrameTest, TruncatedFrameIsNotDelivered) {
  std::string bytes = WireOf(Sample(2, 50));
  for (size_t cut : {size_t{3}, kFrameHeaderSize + 2, bytes.size() - 1}) {
    FrameReader r;
    std::vector<Message> out;
    ASSERT_TRUE(FeedAll(r, bytes.substr(0, cut), &out).ok());
    EXPECT_TRUE(out.empty());
    EXPECT_FALSE(r.at_frame_boundary());
  }
}

}  // namespace
}  // namespace tether
