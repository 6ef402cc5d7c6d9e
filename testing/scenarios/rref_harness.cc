#include "testing/scenarios/rref_harness.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tether::testing {
namespace {

absl::StatusOr<std::pair<bool, std::vector<RRefDescriptor>>> DecodePass(absl::string_view data) {
  if (data.empty() || (data[0] != '0' && data[0] != '1')) {
    return absl::InvalidArgumentError("TEST_CALL: payload must start with a keep flag");
  }
  bool keep = data[0] == '1';
  data.remove_prefix(1);
  std::vector<RRefDescriptor> out;
  while (!data.empty()) {
    size_t colon = data.find(':');
    uint64_t len = 0;
    if (colon == absl::string_view::npos || !absl::SimpleAtoi(data.substr(0, colon), &len) ||
        len > data.size() - colon - 1) {
      return absl::InvalidArgumentError("TEST_CALL: bad descriptor framing");
    }
    auto desc = RRefDescriptor::Parse(data.substr(colon + 1, len));
    if (!desc.ok()) return desc.status();
    out.push_back(*desc);
    data.remove_prefix(colon + 1 + len);
  }
  return std::make_pair(keep, std::move(out));
}

}  // namespace

std::string EncodePass(const std::vector<RRefDescriptor>& descriptors, bool keep) {
  std::string out = keep ? "1" : "0";
  for (const RRefDescriptor& d : descriptors) {
    std::string bytes = d.Serialize();
    absl::StrAppend(&out, bytes.size(), ":", bytes);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<RRefCluster>> RRefCluster::Create(RRefClusterOptions options) {
  std::unique_ptr<RRefCluster> cluster(new RRefCluster(options));
  RRefCluster* raw = cluster.get();
  raw->contexts_.resize(options.num_workers);
  sim::SimWorldOptions o;
  o.num_workers = options.num_workers;
  o.seed = options.seed;
  o.faults = options.faults;
  o.agent.default_timeout = options.call_timeout;
  o.agent.shutdown_timeout = options.shutdown_timeout;
  o.on_agent = [raw](sim::SimWorld& world, WorkerId w, Agent& agent) {
    raw->SetUpWorker(world, w, agent);
  };
  o.on_crash = [raw](sim::SimWorld&, WorkerId w) {
    raw->ledger_.OnCrash(w);
    raw->held_[w].clear();
  };
  auto world = sim::SimWorld::Create(std::move(o));
  if (!world.ok()) return world.status();
  raw->world_ = std::move(*world);
  absl::Status started = raw->world_->Start();
  if (!started.ok()) return started;
  return cluster;
}

RRefCluster::~RRefCluster() {
  held_.clear();
  for (auto& ctx : contexts_) {
    if (ctx) ctx->Close(/*ignore_leaks=*/true).IgnoreError();
  }
  for (auto& ctx : graveyard_) ctx->Close(/*ignore_leaks=*/true).IgnoreError();
}

void RRefCluster::SetUpWorker(sim::SimWorld& world, WorkerId w, Agent& agent) {
  RRefContextOptions o;
  o.incarnation = world.incarnation(w);
  o.first_local_id = options_.first_local_id;
  o.control_timeout = options_.control_timeout;
  o.retry_max_backoff = options_.retry_max_backoff;
  o.child_query_delay = options_.child_query_delay;
  o.observer = &ledger_;
  o.bugs = options_.bugs;
  Clock* clock = &world.clock(w);
  Executor* executor = &world.executor(w);
  std::shared_ptr<RRefContext> ctx = RRefContext::Create(&agent, clock, executor, o);
  if (contexts_[w]) graveyard_.push_back(contexts_[w]);
  contexts_[w] = ctx;
  std::weak_ptr<RRefContext> weak = ctx;
  // As the product wires it (python/runtime.cc): the barrier's join deletes the user references.
  agent.AddShutdownJoinedListener([weak] {
    if (std::shared_ptr<RRefContext> c = weak.lock()) {
      c->DeleteAllUsersAndUnforkedOwners(absl::Seconds(10));
    }
  });
  ctx->SetRemoteRunner(wire::TEST_REMOTE_CALL, [clock, executor](RemoteRequest req) {
    Future<RRefValue> out(executor);
    absl::string_view p = req.payload;
    if (absl::ConsumePrefix(&p, "v:")) {
      RRefValue v;
      v.payload = std::string(p);
      v.creation_reply = absl::StrCat("created ", p);
      out.Set(std::move(v));
    } else if (absl::ConsumePrefix(&p, "e:")) {
      out.Set(absl::InternalError(std::string(p)));
    } else if (absl::ConsumePrefix(&p, "s:")) {
      std::vector<std::string> parts = absl::StrSplit(p, absl::MaxSplits(':', 1));
      int64_t ms = 0;
      if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &ms)) {
        out.Set(absl::InvalidArgumentError("bad slow function"));
      } else {
        RRefValue v;
        v.payload = parts[1];
        clock->Schedule(clock->Now() + absl::Milliseconds(ms), [out, v] { out.Set(v); });
      }
    } else {
      out.Set(absl::InvalidArgumentError(absl::StrCat("unknown test function '", p, "'")));
    }
    return out;
  });
  agent.RegisterHandler(wire::TEST_CALL, [this, weak, w](std::shared_ptr<IncomingCall> call) {
    std::shared_ptr<RRefContext> c = weak.lock();
    if (!c) {
      call->ReplyError(absl::CancelledError("no RRef context"));
      return;
    }
    auto decoded = DecodePass(call->request().envelope.payload());
    if (!decoded.ok()) {
      call->ReplyError(decoded.status());
      return;
    }
    std::vector<RRefHandle> handles;
    absl::Status status;
    for (const RRefDescriptor& d : decoded->second) {
      auto h = c->Receive(d, call->caller());
      if (!h.ok()) {
        if (status.ok()) status = h.status();
        continue;
      }
      handles.push_back(*h);
    }
    if (!status.ok()) {
      call->ReplyError(status);
      return;
    }
    bool keep = decoded->first;
    c->WaitForConfirmations(handles).Then(
        [this, weak, w, call, handles, keep](const absl::StatusOr<Unit>& r) {
          if (!r.ok()) {
            call->ReplyError(r.status());
            return;
          }
          // The "function" runs now; it keeps its arguments if asked. Only
          // the current incarnation's application keeps anything.
          std::shared_ptr<RRefContext> c = weak.lock();
          if (keep && c && contexts_[w] == c) {
            for (const RRefHandle& h : handles) held_[w].push_back(h);
          }
          call->Reply("ok", {});
        });
  });
}

absl::StatusOr<RRefHandle> RRefCluster::Remote(WorkerId from, WorkerId owner, std::string function,
                                               std::optional<absl::Duration> timeout) {
  return contexts_[from]->Remote(owner, wire::TEST_REMOTE_CALL, std::move(function), {}, timeout);
}

Future<Message> RRefCluster::Pass(WorkerId from, WorkerId to,
                                  const std::vector<RRefHandle>& handles, bool keep) {
  std::vector<RRefDescriptor> descs;
  for (const RRefHandle& h : handles) {
    auto d = contexts_[from]->Fork(h, to);
    if (!d.ok()) {
      Future<Message> failed(&world_->executor(from));
      failed.Set(d.status());
      messages_.push_back(failed);
      return failed;
    }
    descs.push_back(*d);
  }
  Future<Message> f = world_->agent(from).Call(to, wire::TEST_CALL, EncodePass(descs, keep), {});
  messages_.push_back(f);
  return f;
}

void RRefCluster::Crash(WorkerId w, bool restart) {
  world_->Crash(w);
  if (restart) world_->Restart(w).IgnoreError();
}

std::vector<std::string> RRefCluster::CheckFuturesDone() const {
  std::vector<std::string> out;
  int pending = 0;
  for (const auto& f : messages_) pending += f.ready() ? 0 : 1;
  for (const auto& f : values_) pending += f.ready() ? 0 : 1;
  if (pending > 0) out.push_back(absl::StrCat(pending, " future(s) never completed"));
  return out;
}

namespace {
std::vector<std::string> CheckZero(const RRefCluster& cluster, const char* when,
                                   const std::vector<std::shared_ptr<RRefContext>>& contexts,
                                   const sim::SimWorld& world) {
  std::vector<std::string> out;
  for (size_t w = 0; w < contexts.size(); ++w) {
    if (world.crashed(static_cast<WorkerId>(w)) || !contexts[w]) continue;
    for (const auto& [key, value] : contexts[w]->GetDebugInfo()) {
      if (key == "num_deleted_fork_records" || key == "num_freed_rref_records") continue;
      if (value != 0) {
        out.push_back(absl::StrCat(when, ": worker ", w, " ", key, "=", value));
      }
    }
    for (const LeakedRRef& leak : contexts[w]->Leaks()) {
      out.push_back(absl::StrCat(when, ": worker ", w, " leaked ", leak.ToString()));
    }
  }
  (void)cluster;
  return out;
}
}  // namespace

std::vector<std::string> RRefCluster::CheckNoLeaks() const {
  return CheckZero(*this, "after settling", contexts_, *world_);
}

std::vector<std::string> RRefCluster::CheckCountersZero() const {
  return CheckZero(*this, "after graceful shutdown", contexts_, *world_);
}

void RRefCluster::DropAllHeld() { held_.clear(); }

std::vector<absl::Status> RRefCluster::ShutdownAll() {
  std::vector<Future<Unit>> agents;
  for (WorkerId w = 0; w < size(); ++w) {
    if (world_->crashed(w)) continue;
    Future<Unit> done(&world_->executor(w));
    agents.push_back(done);
    world_->agent(w).Shutdown(/*graceful=*/true).Then([done](const absl::StatusOr<Unit>& r) {
      done.Set(r);
    });
  }
  world_->RunUntilIdle();
  std::vector<absl::Status> out;
  for (auto& f : agents) {
    out.push_back(f.ready() ? f.result().status()
                            : absl::DeadlineExceededError("shutdown never completed"));
  }
  return out;
}

}  // namespace tether::testing
