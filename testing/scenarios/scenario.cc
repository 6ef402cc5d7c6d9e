#include "testing/scenarios/scenario.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tether::scenarios {

void ScenarioWorker::RunRestarted(WorkerEnv& env) {
  ShutdownWorker(env, /*graceful=*/true, /*expect_ok=*/false);
}

ScenarioRegistry& ScenarioRegistry::Global() {
  static ScenarioRegistry* registry = new ScenarioRegistry();
  return *registry;
}

bool ScenarioRegistry::Register(ScenarioInfo info) {
  std::string name = info.name;
  return scenarios_.emplace(std::move(name), std::move(info)).second;
}

const ScenarioInfo* ScenarioRegistry::Find(const std::string& name) const {
  auto it = scenarios_.find(name);
  return it == scenarios_.end() ? nullptr : &it->second;
}

void After(WorkerEnv& env, absl::Duration delay, std::function<void()> fn) {
  Executor* ex = env.executor;
  env.clock->Schedule(
      env.clock->Now() + delay,
      [ex, fn = std::move(fn)]() mutable { ex->Post(std::move(fn)); });
}

std::string TrackedPayload(Recorder::Token token, const std::string& body) {
  return absl::StrCat(token, "|", body);
}

bool ParseTracked(const std::string& payload, Recorder::Token* token,
                  std::string* body) {
  const size_t bar = payload.find('|');
  if (bar == std::string::npos) return false;
  if (!absl::SimpleAtoi(absl::string_view(payload).substr(0, bar), token))
    return false;
  *body = payload.substr(bar + 1);
  return true;
}

Future<Message> TrackedCall(
    WorkerEnv& env, WorkerId to, const std::string& body,
    std::optional<absl::Duration> timeout, CallExpectation expect,
    std::function<void(const absl::StatusOr<Message>&)> then,
    MessageType type) {
  const Recorder::Token token =
      Recorder::MakeToken(env.id, env.incarnation, env.NextSeq());
  const absl::Duration effective =
      timeout.value_or(env.agent->default_timeout());
  env.recorder->CallIssued(token, env.id, env.incarnation, to, env.clock->Now(),
                           effective, std::move(expect));
  Future<Message> f =
      env.agent->Call(to, type, TrackedPayload(token, body), {}, timeout);
  Recorder* recorder = env.recorder;
  Clock* clock = env.clock;
  f.Then([recorder, clock, token,
          then = std::move(then)](const absl::StatusOr<Message>& r) {
    recorder->CallCompleted(token, clock->Now(), r.status(),
                            r.ok() ? r->envelope.payload() : std::string());
    if (then) then(r);
  });
  return f;
}

std::optional<std::string> AcceptTracked(WorkerEnv& env,
                                         const IncomingCall& call) {
  Recorder::Token token;
  std::string body;
  if (!ParseTracked(call.request().envelope.payload(), &token, &body)) {
    env.recorder->Violation(
        absl::StrCat("worker ", env.id, " got an untracked request '",
                     call.request().envelope.payload(), "'"));
    return std::nullopt;
  }
  env.recorder->HandlerRan(token, env.id);
  return body;
}

void ShutdownWorker(WorkerEnv& env, bool graceful, bool expect_ok,
                    std::function<void(const absl::Status&)> then) {
  const bool first =
      env.recorder->ShutdownBegan(env.id, env.incarnation, graceful, expect_ok);
  Recorder* recorder = env.recorder;
  const WorkerId id = env.id;
  const uint64_t inc = env.incarnation;
  env.agent->Shutdown(graceful).Then(
      [recorder, id, inc, first,
       then = std::move(then)](const absl::StatusOr<Unit>& r) {
        if (first) recorder->ShutdownDone(id, inc, r.status());
        if (then) then(r.status());
      });
}

}  // namespace tether::scenarios
