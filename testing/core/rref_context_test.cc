// RRef context protocol tests, driven by the deterministic simulator (virtual
// time, no threads). Every test also checks the ghost ledger
// (testing/scenarios/rref_ledger.h).
#include "core/rref_context.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "testing/scenarios/rref_harness.h"

namespace tether {
namespace {

using ::tether::testing::RRefCluster;
using ::tether::testing::RRefClusterOptions;

std::unique_ptr<RRefCluster> MakeCluster(int n,
                                         const std::string& faults = "none",
                                         uint64_t seed = 1) {
  RRefClusterOptions o;
  o.num_workers = n;
  o.seed = seed;
  o.faults = sim::FaultSpec::Parse(faults).value();
  auto c = RRefCluster::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(*c);
}

bool Contains(absl::string_view s, absl::string_view part) {
  return s.find(part) != absl::string_view::npos;
}

// Settles the network and checks the ledger and that nothing leaked.
void ExpectClean(RRefCluster& c) {
  ASSERT_TRUE(c.world().RunUntilIdle());
  EXPECT_TRUE(c.ledger().violations().empty()) << c.ledger().violations()[0];
  auto leaks = c.CheckNoLeaks();
  EXPECT_TRUE(leaks.empty()) << leaks[0];
  auto futures = c.CheckFuturesDone();
  EXPECT_TRUE(futures.empty()) << futures[0];
}

std::string Fetch(RRefCluster& c, WorkerId w, const RRefHandle& h,
                  std::optional<absl::Duration> timeout = std::nullopt) {
  Future<RRefValue> f = c.ctx(w).ToHere(h, timeout);
  c.Track(f);
  EXPECT_TRUE(c.world().RunUntilReady(f));
  if (!f.result().ok())
    return "ERROR: " + std::string(f.result().status().message());
  return f.result()->payload;
}

TEST(RRefContextTest, RemoteCreatesFetchesAndFreesOnLastHandle) {
  auto c = MakeCluster(2);
  RRefHandle h = c->Remote(0, 1, "v:hello").value();
  EXPECT_FALSE(h.is_owner());
  EXPECT_EQ(h.owner(), 1);
  EXPECT_EQ(h.rref_id().worker, 0);
  EXPECT_EQ(Fetch(*c, 0, h), "hello");
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"], 1);
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_forks"], 1);
  RRefHandle copy = h;
  h = RRefHandle();
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"],
            1);  // a copy is still alive
  copy = RRefHandle();
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

// Ids count up from RRefContextOptions::first_local_id: 0 in tether.rpc, as PyTorch's (an RRef's
// repr shows them), 1 by default.
TEST(RRefContextTest, IdsCountFromTheFirstLocalId) {
  for (uint64_t first : {uint64_t{0}, uint64_t{1}}) {
    RRefClusterOptions o;
    o.num_workers = 2;
    o.first_local_id = first;
    auto made = RRefCluster::Create(o);
    ASSERT_TRUE(made.ok()) << made.status();
    RRefCluster& c = **made;
    RRefHandle owned = c.ctx(0).CreateOwned(RRefValue{});
    EXPECT_EQ(owned.rref_id().worker, 0);
    EXPECT_EQ(owned.rref_id().local, first);
    RRefHandle user = c.Remote(0, 1, "v:x").value();
    EXPECT_EQ(user.rref_id().local, first + 1);
    EXPECT_EQ(user.fork_id().local, first + 2);
    EXPECT_EQ(Fetch(c, 0, user), "x");
    owned = RRefHandle();
    user = RRefHandle();
    ExpectClean(c);
  }
}

TEST(RRefContextTest, RemoteToSelfGivesAnOwnerHandle) {
  auto c = MakeCluster(2);
  RRefHandle h = c->Remote(1, 1, "v:mine").value();
  EXPECT_TRUE(h.is_owner());
  EXPECT_EQ(Fetch(*c, 1, h), "mine");
  h = RRefHandle();
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, CreatorReceivesTheCreationReplyOnceAndOwnerDropsIt) {
  auto c = MakeCluster(2);
  for (WorkerId owner : {1, 0}) {  // elsewhere, then self
    std::vector<std::string> replies;
    RRefHandle h =
        c->ctx(0)
            .Remote(
                owner, wire::TEST_REMOTE_CALL, "v:x", {}, std::nullopt, "", "",
                [&replies](absl::string_view r) { replies.emplace_back(r); })
            .value();
    EXPECT_EQ(Fetch(*c, 0, h), "x");
    ASSERT_TRUE(c->world().RunUntilIdle());
    EXPECT_EQ(replies, std::vector<std::string>{"created x"}) << owner;
  }
  // A failed creation tells nobody.
  bool told = false;
  RRefHandle failed =
      c->ctx(0)
          .Remote(1, wire::TEST_REMOTE_CALL, "e:boom", {}, std::nullopt, "", "",
                  [&told](absl::string_view) { told = true; })
          .value();
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(told);
  failed = RRefHandle();
  ExpectClean(*c);
}

TEST(RRefContextTest, CreationErrorIsRaisedByTheNextUse) {
  auto c = MakeCluster(2);
  RRefHandle h = c->Remote(0, 1, "e:boom").value();
  ASSERT_TRUE(c->world().RunUntilIdle());
  absl::Status st = c->ctx(0).Check(h);
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(Contains(st.message(), "RRef creation via rpc.remote() failed (RRef ")) << st;
  EXPECT_TRUE(Contains(st.message(), "boom")) << st;
  std::string fetched = Fetch(*c, 0, h);
  EXPECT_TRUE(Contains(fetched, "RRef creation via rpc.remote() failed (RRef ")) << fetched;
  auto fork = c->ctx(0).Fork(h, 1);
  EXPECT_FALSE(fork.ok());
  EXPECT_TRUE(Contains(fork.status().message(), "boom"));
  h = RRefHandle();
  ExpectClean(*c);  // the owner still freed its (failed) entry
}

TEST(RRefContextTest, CreationTimeoutIsRememberedAndTheOwnerStillFrees) {
  auto c = MakeCluster(2);
  RRefHandle h =
      c->Remote(0, 1, "s:1000:late", absl::Milliseconds(100)).value();
  ASSERT_TRUE(c->world().RunUntil([&] { return !c->ctx(0).Check(h).ok(); }));
  absl::Status st = c->ctx(0).Check(h);
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_TRUE(Contains(st.message(), "RRef creation via rpc.remote() failed (RRef ")) << st;
  h = RRefHandle();
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, DeleteOvertakingCreationDoesNotLeak) {
  // The known PyTorch leak: REMOTE_CALL delayed, USER_DELETE let through.
  auto c = MakeCluster(2, "type=TEST_REMOTE_CALL:delay=300ms");
  RRefHandle h = c->Remote(0, 1, "v:x", absl::Milliseconds(50)).value();
  h = RRefHandle();
  ASSERT_TRUE(c->world().RunUntil([&] {
    return c->ctx(1).GetDebugInfo()["num_deleted_fork_records"] == 1;
  }));
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"],
            0);  // creation still in flight
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);  // ran once on arrival, then freed at once
}

TEST(RRefContextTest, UserToUserForkChain) {
  auto c = MakeCluster(4);
  RRefHandle h = c->Remote(0, 1, "v:chain").value();
  Future<Message> p1 = c->Pass(0, 2, {h});
  ASSERT_TRUE(c->world().RunUntilReady(p1));
  ASSERT_TRUE(p1.result().ok()) << p1.result().status();
  ASSERT_EQ(c->held(2).size(), 1u);
  Future<Message> p2 = c->Pass(2, 3, {c->held(2)[0]});
  ASSERT_TRUE(c->world().RunUntilReady(p2));
  ASSERT_TRUE(p2.result().ok()) << p2.result().status();
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_forks"], 3);
  h = RRefHandle();
  c->held(2).clear();
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"],
            1);  // worker 3 still holds it
  EXPECT_EQ(Fetch(*c, 3, c->held(3)[0]), "chain");
  c->held(3).clear();
  ExpectClean(*c);
}

TEST(RRefContextTest, OwnerToUserAndUserToOwnerAndToSelf) {
  auto c = MakeCluster(3);
  RRefValue v;
  v.payload = "owned";
  RRefHandle h = c->ctx(1).CreateOwned(v);
  Future<Message> p = c->Pass(1, 2, {h});  // owner -> user
  ASSERT_TRUE(c->world().RunUntilReady(p));
  ASSERT_TRUE(p.result().ok()) << p.result().status();
  RRefHandle user = c->held(2)[0];
  EXPECT_FALSE(user.is_owner());
  Future<Message> back = c->Pass(2, 1, {user});  // user -> owner
  ASSERT_TRUE(c->world().RunUntilReady(back));
  ASSERT_TRUE(back.result().ok()) << back.result().status();
  EXPECT_TRUE(c->held(1)[0].is_owner());
  Future<Message> self = c->Pass(2, 2, {user});  // user -> itself
  ASSERT_TRUE(c->world().RunUntilReady(self));
  ASSERT_TRUE(self.result().ok()) << self.result().status();
  Future<Message> own_self = c->Pass(1, 1, {h});  // owner -> itself
  ASSERT_TRUE(c->world().RunUntilReady(own_self));
  ASSERT_TRUE(own_self.result().ok()) << own_self.result().status();
  EXPECT_EQ(Fetch(*c, 2, c->held(2)[1]), "owned");
  h = RRefHandle();
  user = RRefHandle();
  c->DropAllHeld();
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, OwnerReceivesItsReferenceBeforeTheCreationArrives) {
  auto c = MakeCluster(2, "type=TEST_REMOTE_CALL:delay=200ms");
  RRefHandle h = c->Remote(0, 1, "v:early").value();
  Future<Message> p = c->Pass(0, 1, {h});  // overtakes the remote call
  h = RRefHandle();
  ASSERT_TRUE(c->world().RunUntilReady(p));
  ASSERT_TRUE(p.result().ok()) << p.result().status();
  ASSERT_EQ(c->held(1).size(), 1u);
  EXPECT_TRUE(c->held(1)[0].is_owner());
  EXPECT_EQ(Fetch(*c, 1, c->held(1)[0]), "early");  // waits for the creation
  c->DropAllHeld();
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, CallWaitsForConfirmationAndParentStaysPinned) {
  auto c = MakeCluster(3, "type=RREF_FORK_REQUEST:delay=200ms");
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  ASSERT_TRUE(c->world().RunUntilIdle());
  absl::Time start = c->world().Now();
  Future<Message> p = c->Pass(0, 2, {h});
  h = RRefHandle();  // the parent's last handle goes while the child is
                     // unconfirmed
  ASSERT_TRUE(c->world().RunUntilReady(p));
  ASSERT_TRUE(p.result().ok()) << p.result().status();
  // The callee's function ran only after the owner confirmed the fork (virtual
  // time).
  EXPECT_GE(c->world().Now() - start, absl::Milliseconds(200));
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"], 1);
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_forks"],
            1);  // only the child's fork remains
  EXPECT_EQ(Fetch(*c, 2, c->held(2)[0]), "x");
  c->DropAllHeld();
  ExpectClean(*c);
}

TEST(RRefContextTest, FetchTimeoutHoldsOnOwnerAndUser) {
  auto c = MakeCluster(2);
  RRefHandle own = c->Remote(1, 1, "s:5000:slow").value();
  RRefHandle user = c->Remote(0, 1, "s:5000:slow").value();
  absl::Time start = c->world().Now();
  std::string a = Fetch(*c, 1, own, absl::Milliseconds(100));
  EXPECT_TRUE(Contains(a, "not ready before the timeout")) << a;
  EXPECT_EQ(c->world().Now() - start, absl::Milliseconds(100));
  std::string b = Fetch(*c, 0, user, absl::Milliseconds(100));
  EXPECT_TRUE(Contains(b, "ERROR")) << b;
  own = RRefHandle();
  user = RRefHandle();
  ExpectClean(*c);
}

TEST(RRefContextTest, LostCallCarryingAForkReleasesTheParent) {
  auto c = MakeCluster(3, "type=TEST_CALL:drop=1");
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  Future<Message> p = c->Pass(0, 2, {h});
  h = RRefHandle();
  ASSERT_TRUE(c->world().RunUntilReady(p));
  EXPECT_EQ(p.result().status().code(), absl::StatusCode::kDeadlineExceeded);
  ExpectClean(
      *c);  // the child refused the fork when asked; the parent was released
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, OwnerFailureFailsUsesWithAClearError) {
  auto c = MakeCluster(3);
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  ASSERT_TRUE(c->world().RunUntilIdle());
  c->Crash(1, /*restart=*/false);
  ASSERT_TRUE(c->world().RunUntilIdle());
  absl::Status st = c->ctx(0).Check(h);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(Contains(st.message(), "owner worker 1")) << st;
  std::string f = Fetch(*c, 0, h);
  EXPECT_TRUE(Contains(f, "owner worker 1")) << f;
  h = RRefHandle();
  ExpectClean(*c);
}

TEST(RRefContextTest, HolderFailureReleasesItsForks) {
  auto c = MakeCluster(3);
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  Future<Message> p = c->Pass(0, 2, {h});
  ASSERT_TRUE(c->world().RunUntilReady(p));
  h = RRefHandle();
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->ctx(1).GetDebugInfo()["num_owner_rrefs"], 1);
  c->Crash(2, /*restart=*/true);
  ExpectClean(*c);
  EXPECT_EQ(c->ledger().frees(), 1);
}

TEST(RRefContextTest, ShutdownWithRefsAliveLeavesZeroCounters) {
  auto c = MakeCluster(4);
  RRefHandle a = c->Remote(0, 1, "v:a").value();
  RRefHandle b = c->Remote(2, 2, "v:b").value();
  RRefHandle d = c->Remote(3, 1, "s:50:d").value();
  c->Pass(0, 3, {a});
  c->Pass(2, 0, {b});
  c->Pass(3, 2, {d}, /*keep=*/true);
  for (const absl::Status& s : c->ShutdownAll()) EXPECT_TRUE(s.ok()) << s;
  auto zero = c->CheckCountersZero();
  for (auto& z : zero) ADD_FAILURE() << z;
  EXPECT_TRUE(c->ledger().violations().empty()) << c->ledger().violations()[0];
  EXPECT_EQ(c->ctx(0).Check(a).code(), absl::StatusCode::kCancelled);
}

TEST(RRefContextTest, CloseReportsLeaks) {
  auto c = MakeCluster(2);
  RRefHandle h = c->Remote(0, 1, "v:x", std::nullopt).value();
  ASSERT_TRUE(c->world().RunUntilIdle());
  absl::Status owner = c->ctx(1).Close(/*ignore_leaks=*/false);
  EXPECT_EQ(owner.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(owner.message(), h.rref_id().ToString())) << owner;
  EXPECT_TRUE(Contains(owner.message(), "created by worker 0")) << owner;
  EXPECT_TRUE(Contains(owner.message(), "remote(TEST_REMOTE_CALL)")) << owner;
  absl::Status user = c->ctx(0).Close(/*ignore_leaks=*/true);
  EXPECT_TRUE(user.ok());
  EXPECT_TRUE(c->ctx(0).Close(false).ok());  // idempotent
}

TEST(RRefContextTest, DebugInfoHasPyTorchKeys) {
  auto c = MakeCluster(2, "type=RREF_FORK_REQUEST:delay=100ms");
  auto info = c->ctx(0).GetDebugInfo();
  for (const char* key : {"num_owner_rrefs", "num_pending_futures",
                          "num_pending_users", "num_forks"}) {
    EXPECT_EQ(info.count(key), 1u) << key;
  }
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  EXPECT_EQ(c->ctx(0).GetDebugInfo()["num_pending_users"], 1);
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->ctx(0).GetDebugInfo()["num_pending_users"], 0);
}

TEST(RRefContextTest, BadInputGetsClearErrors) {
  auto c = MakeCluster(3);
  EXPECT_EQ(RRefDescriptor::Parse("junk\xff").status().code(),
            absl::StatusCode::kInvalidArgument);
  RRefHandle h = c->Remote(0, 1, "v:x").value();
  RRefDescriptor d = c->ctx(0).Fork(h, 2).value();
  auto wrong_parent = c->ctx(2).Receive(d, 1);
  EXPECT_EQ(wrong_parent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(wrong_parent.status().message(), "parent"))
      << wrong_parent.status();
  EXPECT_EQ(c->Remote(0, 7, "v:x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ctx(0).Remote(1, wire::TEST_CALL, "", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ctx(0).Fork(h, 9).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ctx(0).Fork(RRefHandle(), 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (MessageType t :
       {wire::RREF_USER_DELETE, wire::RREF_FORK_REQUEST, wire::RREF_FETCH_CALL,
        wire::RREF_CHILD_ACCEPT, wire::TEST_REMOTE_CALL}) {
    Future<Message> f = c->world().agent(0).Call(1, t, "\xff\xff garbage", {});
    ASSERT_TRUE(c->world().RunUntilReady(f));
    EXPECT_EQ(f.result().status().code(), absl::StatusCode::kInvalidArgument)
        << MessageTypeName(t) << " " << f.result().status();
  }
  // The descriptor made above is never received: the parent asks the child and
  // is released.
  h = RRefHandle();
  ExpectClean(*c);
}

TEST(RRefContextTest, DropsAndDuplicatesChangeNothing) {
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    auto c = MakeCluster(4, "drop=0.1,dup=0.3,reorder=0.2,delay=0..20ms", seed);
    std::vector<RRefHandle> roots;
    for (int i = 0; i < 4; ++i)
      roots.push_back(c->Remote(i, (i + 1) % 4, "v:r").value());
    for (int i = 0; i < 4; ++i) {
      c->Pass(i, (i + 2) % 4, {roots[i]});
      c->Pass(i, i, {roots[i]});
    }
    c->world().RunFor(absl::Milliseconds(30));
    roots.clear();
    c->world().RunFor(absl::Seconds(2));
    for (int w = 0; w < 4; ++w) {
      std::vector<RRefHandle> held = c->held(w);
      for (const RRefHandle& h : held) c->Pass(w, (w + 1) % 4, {h});
    }
    c->world().RunFor(absl::Seconds(10));
    c->DropAllHeld();
    ExpectClean(*c);
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << "seed " << seed;
      break;
    }
  }
}

}  // namespace
}  // namespace tether
