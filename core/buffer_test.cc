#include "core/buffer.h"

#include <string>

#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(BufferTest, CopyFromOwnsItsBytes) {
  std::string s = "hello";
  Buffer b = Buffer::CopyFrom(s);
  s[0] = 'j';
  EXPECT_EQ(b.view(), "hello");
  EXPECT_EQ(b.size(), 5u);
}

TEST(BufferTest, CopiesAliasAndKeepStorageAlive) {
  Buffer copy;
  {
    Buffer b = Buffer::Allocate(3);
    b.mutable_data()[0] = 'a';
    b.mutable_data()[1] = 'b';
    b.mutable_data()[2] = 'c';
    copy = b;
    EXPECT_EQ(copy.data(), b.data());
  }
  EXPECT_EQ(copy.view(), "abc");
}

TEST(BufferTest, WrapKeepsOwnerAlive) {
  auto owner = std::make_shared<std::string>("payload");
  std::weak_ptr<std::string> weak = owner;
  Buffer b = Buffer::Wrap(owner, owner->data(), owner->size());
  owner.reset();
  EXPECT_FALSE(weak.expired());
  EXPECT_EQ(b.view(), "payload");
  b = Buffer();
  EXPECT_TRUE(weak.expired());
}

TEST(BufferTest, EmptyBuffer) {
  Buffer b = Buffer::Allocate(0);
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.view(), "");
}

}  // namespace
}  // namespace tether
