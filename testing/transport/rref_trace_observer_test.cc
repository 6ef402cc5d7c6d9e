#include "transport/tracing/rref_trace_observer.h"

#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/agent.h"
#include "core/rref_context.h"
#include "gtest/gtest.h"
#include "sim/sim_world.h"
#include "testing/transport/trace_text.h"
#include "transport/tracing/tracing_network.h"

namespace tether {
namespace {

using ::tether::testing::Count;
using ::tether::testing::Has;
using ::tether::testing::ReadFile;

class Recorder : public RRefObserver {
 public:
  void OnRRefEvent(const RRefEvent& event) override { events.push_back(event); }
  std::vector<RRefEvent> events;
};

// A simulated worker whose network is traced and whose RRef context reports
// to an RRefTraceObserver chained to a Recorder.
struct TracedWorker {
  TracedWorker(sim::SimWorld& world, WorkerId w)
      : path(::testing::TempDir() + "/rref-trace-worker" + std::to_string(w) +
             ".json"),
        traced(&world.network(w), &world.clock(w), path,
               "worker" + std::to_string(w)),
        observer(&traced, &recorder) {
    AgentOptions a;
    a.self = w;
    a.workers = world.worker_infos();
    agent =
        Agent::Create(a, &world.clock(w), &traced, &world.executor(w)).value();
    RRefContextOptions o;
    o.observer = &observer;
    rrefs = RRefContext::Create(agent.get(), &world.clock(w),
                                &world.executor(w), o);
    Executor* executor = &world.executor(w);
    rrefs->SetRemoteRunner(wire::TEST_REMOTE_CALL,
                           [executor](RemoteRequest request) {
                             Future<RRefValue> out(executor);
                             RRefValue v;
                             v.payload = request.payload;
                             out.Set(std::move(v));
                             return out;
                           });
  }
  ~TracedWorker() { std::remove(path.c_str()); }

  const std::string path;
  Recorder recorder;
  TracingNetwork traced;
  RRefTraceObserver observer;  // Outlives `rrefs` (declared before it).
  std::unique_ptr<Agent> agent;
  std::shared_ptr<RRefContext> rrefs;
};

TEST(RRefTraceObserverTest, NamesEveryKindAndDetailsWhatIsSet) {
  std::set<std::string> names;
  for (int k = RRefEvent::kOwnerCreated; k <= RRefEvent::kPeerFailed; ++k) {
    std::string name =
        RRefTraceObserver::EventName(static_cast<RRefEvent::Kind>(k));
    EXPECT_EQ(name.rfind("rref ", 0), 0u) << name;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), RRefEvent::kPeerFailed + 1u);
  EXPECT_EQ(RRefTraceObserver::EventName(RRefEvent::kUserConfirmed),
            "rref user confirmed");

  RRefEvent e;
  e.kind = RRefEvent::kForkAdded;
  e.worker = 1;
  e.rref = {0, 1};
  e.fork = {0, 2};
  e.peer = 0;
  EXPECT_EQ(RRefTraceObserver::EventDetail(e),
            "rref GUID(0:1) fork GUID(0:2) peer 0");
  e.fork = {};
  e.peer = -1;
  EXPECT_EQ(RRefTraceObserver::EventDetail(e), "rref GUID(0:1)");
  RRefEvent failed;
  failed.kind = RRefEvent::kPeerFailed;
  failed.peer = 2;
  EXPECT_EQ(RRefTraceObserver::EventDetail(failed), "peer 2");
}

TEST(RRefTraceObserverTest, RemoteAndToHereAppearOnOwnerAndUserTracks) {
  sim::SimWorldOptions o;
  o.num_workers = 2;
  auto world = sim::SimWorld::Create(o).value();
  // Both workers run on traced networks (the world's own agents stay idle).
  auto user = std::make_unique<TracedWorker>(*world, 0);
  auto owner = std::make_unique<TracedWorker>(*world, 1);
  ASSERT_TRUE(user->agent->Start().ok());
  ASSERT_TRUE(owner->agent->Start().ok());

  RRefHandle h =
      user->rrefs->Remote(1, wire::TEST_REMOTE_CALL, "hello", {}).value();
  const std::string id = h.rref_id().ToString();
  const std::string fork = h.fork_id().ToString();
  Future<RRefValue> f = user->rrefs->ToHere(h);
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  EXPECT_EQ(f.result()->payload, "hello");
  h = RRefHandle();  // The user deletes its fork; the owner frees the value.
  ASSERT_TRUE(world->RunUntilIdle());
  EXPECT_EQ(owner->rrefs->GetDebugInfo()["num_owner_rrefs"], 0);

  for (TracedWorker* w : {user.get(), owner.get()}) {
    auto done = w->agent->Shutdown(false);
    world->RunUntilIdle();
    ASSERT_TRUE(w->rrefs->Close(/*ignore_leaks=*/false).ok());
    w->traced.Stop();  // Writes the file.
  }
  const std::string u = ReadFile(user->path);
  const std::string w = ReadFile(owner->path);

  const std::string user_detail =
      "\"detail\":\"rref " + id + " fork " + fork + " peer 1\"";
  for (const char* name : {"rref user created", "rref user confirmed",
                           "rref user delete sent", "rref user released"}) {
    EXPECT_TRUE(
        Has(u, std::string("{\"name\":\"") + name + "\",\"cat\":\"rref\""))
        << name << "\n"
        << u;
  }
  EXPECT_TRUE(Has(u, user_detail)) << u;
  for (const char* name :
       {"rref owner created", "rref function run", "rref fork added",
        "rref value set", "rref value served", "rref fork removed",
        "rref owner freed"}) {
    EXPECT_TRUE(
        Has(w, std::string("{\"name\":\"") + name + "\",\"cat\":\"rref\""))
        << name << "\n"
        << w;
  }
  // The owner names the same reference and fork, held by worker 0.
  EXPECT_TRUE(Has(w, "\"detail\":\"rref " + id + " fork " + fork + " peer 0\""))
      << w;
  // No owner events on the user's track, and the other way round.
  EXPECT_FALSE(Has(u, "rref owner created"));
  EXPECT_FALSE(Has(w, "rref user created"));

  // Every event was marked once and also reached the chained observer.
  EXPECT_EQ(Count(u, "\"cat\":\"rref\""),
            static_cast<int>(user->recorder.events.size()));
  EXPECT_EQ(Count(w, "\"cat\":\"rref\""),
            static_cast<int>(owner->recorder.events.size()));
  EXPECT_GE(owner->recorder.events.size(), 7u);
}

}  // namespace
}  // namespace tether
