#include "core/rref_ids.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(GloballyUniqueIdTest, OrderEqualityAndText) {
  GloballyUniqueId a{1, 7}, b{1, 8}, c{2, 0};
  EXPECT_TRUE(a < b);
  EXPECT_TRUE(b < c);  // worker first, then the local counter
  EXPECT_FALSE(c < a);
  EXPECT_EQ(a, (GloballyUniqueId{1, 7}));
  EXPECT_NE(a, b);
  EXPECT_EQ(a.ToString(), "GUID(1:7)");
  EXPECT_FALSE(GloballyUniqueId{}.valid());
  EXPECT_TRUE(c.valid());
}

TEST(RRefDescriptorTest, RoundTrips) {
  RRefDescriptor d;
  d.rref_id = {0, 1};
  d.fork_id = {2, (uint64_t{3} << 40) + 5};
  d.owner = 0;
  d.parent = 2;
  d.type_name = "torch.Tensor";
  absl::StatusOr<RRefDescriptor> back = RRefDescriptor::Parse(d.Serialize());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->rref_id, d.rref_id);
  EXPECT_EQ(back->fork_id, d.fork_id);
  EXPECT_EQ(back->owner, 0);
  EXPECT_EQ(back->parent, 2);
  EXPECT_EQ(back->type_name, "torch.Tensor");
}

TEST(RRefDescriptorTest, RejectsGarbageAndInvalidIds) {
  absl::StatusOr<RRefDescriptor> junk = RRefDescriptor::Parse("junk\xff");
  EXPECT_EQ(junk.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(junk.status().message(), "RRef descriptor: not a serialized descriptor");

  RRefDescriptor d;  // default ids are invalid
  d.rref_id = {1, 1};
  d.owner = 1;
  d.parent = 1;
  absl::StatusOr<RRefDescriptor> bad = RRefDescriptor::Parse(d.Serialize());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(),
            "RRef descriptor: invalid ids (rref GUID(1:1), fork GUID(-1:0), owner 1, parent 1)");
  d.fork_id = {1, 2};
  d.parent = -1;
  EXPECT_FALSE(RRefDescriptor::Parse(d.Serialize()).ok());
  d.parent = 0;
  EXPECT_TRUE(RRefDescriptor::Parse(d.Serialize()).ok());
}

TEST(RRefCodecTest, ForkRefRoundTripsAndKeepsInvalidIds) {
  RRefId r;
  ForkId f;
  ASSERT_TRUE(DecodeForkRef(EncodeForkRef({3, 9}, {4, 10}), &r, &f));
  EXPECT_EQ(r, (RRefId{3, 9}));
  EXPECT_EQ(f, (ForkId{4, 10}));
  // An empty payload parses (proto3 defaults): the ids come back as worker 0, local 0, and
  // checking them is the caller's job.
  ASSERT_TRUE(DecodeForkRef("", &r, &f));
  EXPECT_EQ(r, (RRefId{0, 0}));
  ASSERT_TRUE(DecodeForkRef(EncodeForkRef({5, 1}, ForkId{}), &r, &f));
  EXPECT_FALSE(f.valid());
  EXPECT_FALSE(DecodeForkRef("\xff\xff\xff", &r, &f));
}

TEST(RRefCodecTest, RemoteCallRoundTrips) {
  RemoteCallPayload in;
  in.rref_id = {1, 2};
  in.fork_id = {1, 3};
  in.created_by = "rpc.remote(f)";
  in.type_name = "int";
  in.payload = std::string("\0pickled\xff", 9);
  RemoteCallPayload out;
  ASSERT_TRUE(DecodeRemoteCall(EncodeRemoteCall(in), &out));
  EXPECT_EQ(out.rref_id, in.rref_id);
  EXPECT_EQ(out.fork_id, in.fork_id);
  EXPECT_EQ(out.created_by, in.created_by);
  EXPECT_EQ(out.type_name, in.type_name);
  EXPECT_EQ(out.payload, in.payload);
  EXPECT_FALSE(DecodeRemoteCall("\xff\xff\xff", &out));
}

TEST(RRefCodecTest, ChildControlRoundTrips) {
  ForkId f;
  bool query = true;
  ASSERT_TRUE(DecodeChildControl(EncodeChildControl({2, 7}, /*query=*/false), &f, &query));
  EXPECT_EQ(f, (ForkId{2, 7}));
  EXPECT_FALSE(query);
  ASSERT_TRUE(DecodeChildControl(EncodeChildControl({2, 8}, /*query=*/true), &f, &query));
  EXPECT_TRUE(query);
  EXPECT_FALSE(DecodeChildControl("\xff\xff\xff", &f, &query));
}

TEST(RRefCodecTest, ChildQueryReplyRoundTrips) {
  for (ChildState s : {ChildState::kRefused, ChildState::kPending, ChildState::kDone}) {
    ChildState back = s == ChildState::kDone ? ChildState::kRefused : ChildState::kDone;
    ASSERT_TRUE(DecodeChildQueryReply(EncodeChildQueryReply(s), &back));
    EXPECT_EQ(back, s);
  }
  // REFUSED is the proto3 default: an empty reply means refused.
  EXPECT_EQ(EncodeChildQueryReply(ChildState::kRefused), "");
  ChildState back = ChildState::kDone;
  ASSERT_TRUE(DecodeChildQueryReply("", &back));
  EXPECT_EQ(back, ChildState::kRefused);
  // An enum value this build does not know (field 1 = 9) reads as still pending.
  ASSERT_TRUE(DecodeChildQueryReply(std::string("\x08\x09", 2), &back));
  EXPECT_EQ(back, ChildState::kPending);
  EXPECT_FALSE(DecodeChildQueryReply("\xff\xff\xff", &back));
}

}  // namespace
}  // namespace tether
