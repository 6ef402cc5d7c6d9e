#include "python/call_profiling.h"

#include <ATen/record_function.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/profiler/api.h>

#include <algorithm>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace tether {
namespace pycall {

namespace profiler = ::torch::autograd::profiler;
using ::torch::profiler::impl::ActiveProfilerType;
using ::torch::profiler::impl::ProfilerConfig;
using ::torch::profiler::impl::ProfilerState;

// One enable of the server-process profiler; `outer` is the one it nests in.
struct HandlerProfile::ServerEntry {
  explicit ServerEntry(ProfilerConfig c, std::shared_ptr<ServerEntry> o)
      : config(std::move(c)), outer(std::move(o)) {}
  const ProfilerConfig config;
  const std::shared_ptr<ServerEntry> outer;
  absl::Mutex mu;
  std::vector<profiler::thread_event_lists> results ABSL_GUARDED_BY(mu);
};

namespace {

// Process-wide: the server-process profiler is one per process, as in PyTorch
// (python/process_state.h lists it).
ABSL_CONST_INIT absl::Mutex g_server_mu(absl::kConstInit);
std::shared_ptr<HandlerProfile::ServerEntry> g_server ABSL_GUARDED_BY(g_server_mu);
std::atomic<bool> g_server_on{false};  // g_server != nullptr, read unlocked

std::shared_ptr<HandlerProfile::ServerEntry> CurrentServerEntry() {
  absl::MutexLock lock(&g_server_mu);
  return g_server;
}

bool LegacyProfilerOn() {
  return torch::profiler::impl::profilerEnabled() &&
         torch::profiler::impl::profilerType() == ActiveProfilerType::LEGACY;
}

// The handles of this thread's RecordFunction callbacks.
std::vector<at::CallbackHandle> ThreadCallbacks() {
  std::vector<at::CallbackHandle> out;
  for (const auto& e : at::get_record_function_tls_().sorted_tls_callbacks_)
    out.push_back(e.handle_);
  return out;
}

// What PyTorch's callee records too: CPU events, shapes and memory if asked.
// (Stacks would make every operator of a builtin call take the GIL.)
ProfilerConfig FromRequest(const ProfilingRequest& r) {
  return ProfilerConfig(ProfilerState::CPU, r.record_shapes(), r.profile_memory());
}

}  // namespace

void SetNodeId(int worker_id) { at::RecordFunction::setDefaultNodeId(worker_id); }

// ---------------------------------------------------------------------------
// Caller.

CallerProfile::CallerProfile(std::string key, ProfilingRequest request)
    : key_(std::move(key)), request_(std::move(request)) {}

std::shared_ptr<const CallerProfile> CallerProfile::Capture(std::string key) {
  if (!LegacyProfilerOn()) return nullptr;
  ProfilerConfig config = torch::profiler::impl::getProfilerConfig();
  ProfilingRequest request;
  request.set_record_shapes(config.report_input_shapes);
  request.set_profile_memory(config.profile_memory);
  request.set_with_stack(config.with_stack);
  request.set_with_flops(config.with_flops);
  request.set_with_modules(config.with_modules);
  return std::make_shared<const CallerProfile>(std::move(key), std::move(request));
}

absl::Status CallerProfile::AddRemoteEvents(const std::string& bytes) const {
  if (bytes.empty()) return absl::OkStatus();
  absl::StatusOr<std::vector<profiler::LegacyEvent>> events = DecodeEvents(bytes);
  if (!events.ok()) return events.status();
  const std::string prefix = absl::StrCat(key_, kRemoteOpPrefix);
  for (profiler::LegacyEvent& e : *events) {
    e.setName(at::StringView(absl::StrCat(prefix, e.name())));
  }
  try {
    // If the profile has ended before the reply came, the captured state is
    // no longer the profile's: the events go nowhere (as in PyTorch).
    at::ThreadLocalStateGuard guard(state_);
    profiler::addEventList(std::move(*events));
  } catch (const std::exception& e) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot add remote profiling events: ", e.what()));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Callee.

HandlerProfile::HandlerProfile(bool requested, std::shared_ptr<ServerEntry> server)
    : requested_(requested), server_(std::move(server)) {}

std::shared_ptr<HandlerProfile> HandlerProfile::Start(const ProfilingRequest* request) {
  // The common case (no profiling at all) takes no lock.
  if (request == nullptr && !g_server_on.load(std::memory_order_relaxed)) return nullptr;
  std::shared_ptr<ServerEntry> server = CurrentServerEntry();
  if (request == nullptr && server == nullptr) return nullptr;
  if (torch::profiler::impl::profilerEnabled()) return nullptr;
  std::vector<at::CallbackHandle> before = ThreadCallbacks();
  try {
    profiler::enableProfilerLegacy(request != nullptr ? FromRequest(*request) : server->config);
  } catch (const std::exception&) {
    return nullptr;
  }
  // Constructed after the enable: its state_ holds this thread's profiler.
  auto profile = std::make_shared<HandlerProfile>(request != nullptr, std::move(server));
  for (at::CallbackHandle h : ThreadCallbacks()) {
    if (std::find(before.begin(), before.end(), h) == before.end()) profile->callback_ = h;
  }
  return profile;
}

void HandlerProfile::LeaveThread() {
  if (left_.exchange(true)) return;
  absl::MutexLock lock(&mu_);
  try {
    // Turn this thread's profiler off; the events stay in the state for
    // Finish().
    profiler::disableProfilerLegacy(profiler::ProfilerDisableOptions(
        /*shouldCleanupTLSState=*/true, /*shouldConsolidate=*/false));
  } catch (const std::exception&) {
  }
  // A Finish() that ran on this thread first (under a guard of its saved
  // state) has made the profiler forget its callback's handle, and the guard
  // put the callback back: remove it by the handle noted at Start.
  std::vector<at::CallbackHandle> now = ThreadCallbacks();
  if (callback_ != at::INVALID_CALLBACK_HANDLE &&
      std::find(now.begin(), now.end(), callback_) != now.end()) {
    at::removeCallback(callback_);
  }
}

std::string HandlerProfile::Finish() {
  if (finished_.exchange(true)) return "";
  profiler::thread_event_lists lists;
  try {
    absl::MutexLock lock(&mu_);
    at::ThreadLocalStateGuard guard(state_);
    // The guard's thread state is dropped when it ends; the starting thread's
    // profiler and callback are LeaveThread()'s to remove.
    lists = profiler::disableProfilerLegacy(profiler::ProfilerDisableOptions(
        /*shouldCleanupTLSState=*/false, /*shouldConsolidate=*/true));
  } catch (const std::exception&) {
    return "";
  }
  for (ServerEntry* e = server_.get(); e != nullptr; e = e->outer.get()) {
    absl::MutexLock lock(&e->mu);
    e->results.push_back(lists);
  }
  if (!requested_) return "";
  std::vector<profiler::LegacyEvent> flat;
  for (auto& list : lists) {
    for (auto& event : list) flat.push_back(std::move(event));
  }
  return EncodeEvents(flat);
}

HandlerProfile::~HandlerProfile() {
  try {
    Finish();
  } catch (...) {  // Nothing may leave a destructor.
  }
}

// ---------------------------------------------------------------------------
// Server-process profiler.

void EnableServerProfiler(const ProfilerConfig& config) {
  absl::MutexLock lock(&g_server_mu);
  g_server = std::make_shared<HandlerProfile::ServerEntry>(config, g_server);
  g_server_on = true;
}

absl::StatusOr<std::vector<profiler::thread_event_lists>> DisableServerProfiler() {
  std::shared_ptr<HandlerProfile::ServerEntry> top;
  {
    absl::MutexLock lock(&g_server_mu);
    if (g_server == nullptr) {
      return absl::FailedPreconditionError("the server-process profiler is not enabled");
    }
    top = g_server;
    g_server = top->outer;
    g_server_on = g_server != nullptr;
  }
  absl::MutexLock lock(&top->mu);
  return std::move(top->results);
}

// ---------------------------------------------------------------------------
// Wire form: a TorchScript pickle of the list of LegacyEvent::toIValue().

std::string EncodeEvents(const std::vector<profiler::LegacyEvent>& events) {
  c10::impl::GenericList list(c10::AnyType::get());
  list.reserve(events.size());
  for (const profiler::LegacyEvent& e : events) list.push_back(e.toIValue());
  std::vector<char> bytes = torch::jit::pickle(c10::IValue(std::move(list)));
  return std::string(bytes.data(), bytes.size());
}

absl::StatusOr<std::vector<profiler::LegacyEvent>> DecodeEvents(const std::string& bytes) {
  std::vector<profiler::LegacyEvent> events;
  try {
    c10::IValue value = torch::jit::unpickle(bytes.data(), bytes.size(), nullptr, {});
    if (!value.isList()) {
      return absl::InvalidArgumentError("profiled events: expected a list of events");
    }
    for (const c10::IValue& item : value.toListRef()) {
      if (!item.isList()) {
        return absl::InvalidArgumentError("profiled events: an event is not a list");
      }
      events.push_back(profiler::LegacyEvent::fromIValue(item));
      events.back().kindStr();  // Throws for a kind that is not one.
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed profiled events: ", e.what()));
  }
  return events;
}

}  // namespace pycall
}  // namespace tether
