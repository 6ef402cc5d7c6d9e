#include "sim/fault_spec.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tether::sim {
namespace {

absl::Status BadToken(absl::string_view token, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("fault spec: bad token '", token, "': ", why));
}

bool ParseDur(absl::string_view s, absl::Duration* d) {
  if (s.empty()) return false;
  if (!absl::ParseDuration(std::string(s), d)) return false;
  return *d >= absl::ZeroDuration() && *d != absl::InfiniteDuration();
}

std::string Dur(absl::Duration d) { return absl::FormatDuration(d); }

absl::Status ParseProbability(absl::string_view token, absl::string_view value,
                              double* p) {
  if (!absl::SimpleAtod(value, p) || !(*p >= 0 && *p <= 1)) {
    return BadToken(token, "expected a probability between 0 and 1");
  }
  return absl::OkStatus();
}

absl::Status ParseDelay(absl::string_view token, absl::string_view value,
                        DelayDist* out) {
  DelayDist d;
  if (absl::ConsumePrefix(&value, "exp:")) {
    d.kind = DelayDist::Kind::kExponential;
    if (!ParseDur(value, &d.mean))
      return BadToken(token, "expected exp:MEAN, e.g. exp:5ms");
  } else if (value.find("..") != absl::string_view::npos) {
    std::vector<absl::string_view> parts =
        absl::StrSplit(value, absl::MaxSplits("..", 1));
    if (!ParseDur(parts[0], &d.lo) || !ParseDur(parts[1], &d.hi) ||
        d.hi < d.lo) {
      return BadToken(token,
                      "expected A..B with durations A <= B, e.g. 0..50ms");
    }
  } else {
    if (!ParseDur(value, &d.lo))
      return BadToken(token, "expected a duration, e.g. 2ms");
    d.hi = d.lo;
  }
  *out = d;
  return absl::OkStatus();
}

absl::Status ParseLinkKey(absl::string_view token, absl::string_view key,
                          absl::string_view value, LinkFaults* link) {
  double p = 0;
  if (key == "drop") {
    if (auto s = ParseProbability(token, value, &p); !s.ok()) return s;
    link->drop = p;
  } else if (key == "dup") {
    if (auto s = ParseProbability(token, value, &p); !s.ok()) return s;
    link->dup = p;
  } else if (key == "reorder") {
    if (auto s = ParseProbability(token, value, &p); !s.ok()) return s;
    link->reorder = p;
  } else if (key == "delay") {
    DelayDist d;
    if (auto s = ParseDelay(token, value, &d); !s.ok()) return s;
    link->delay = d;
  } else {
    return absl::NotFoundError("not a link key");
  }
  return absl::OkStatus();
}

bool ParseGroup(absl::string_view s, std::vector<int32_t>* group) {
  if (s.empty()) return false;
  for (absl::string_view part : absl::StrSplit(s, '+')) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id) || id < 0) return false;
    group->push_back(id);
  }
  return true;
}

absl::Status ParseWindow(absl::string_view token, absl::string_view s,
                         absl::Duration* start, absl::Duration* end) {
  std::vector<absl::string_view> parts =
      absl::StrSplit(s, absl::MaxSplits("..", 1));
  if (parts.size() != 2 || !ParseDur(parts[0], start)) {
    return BadToken(
        token,
        "expected a window T1..T2 or T1.. after '@', e.g. @100ms..400ms");
  }
  if (parts[1].empty()) {
    *end = absl::InfiniteDuration();
  } else if (!ParseDur(parts[1], end) || *end <= *start) {
    return BadToken(token, "window end must be a duration after its start");
  }
  return absl::OkStatus();
}

absl::Status ParsePartition(absl::string_view token, absl::string_view value,
                            FaultSpec* spec) {
  if (value == "random") {
    ++spec->random_partitions;
    return absl::OkStatus();
  }
  PartitionSpec p;
  absl::string_view groups = value;
  const size_t at = value.find('@');
  if (at != absl::string_view::npos) {
    groups = value.substr(0, at);
    if (auto s = ParseWindow(token, value.substr(at + 1), &p.start, &p.end);
        !s.ok())
      return s;
  }
  size_t sep = groups.find('>');
  p.one_way = sep != absl::string_view::npos;
  if (!p.one_way) sep = groups.find('-');
  if (sep == absl::string_view::npos ||
      !ParseGroup(groups.substr(0, sep), &p.left) ||
      !ParseGroup(groups.substr(sep + 1), &p.right)) {
    return BadToken(
        token,
        "expected groups like 0-1 (two-way) or 0+1>2 (one-way), optionally "
        "@T1..T2, or 'random'");
  }
  for (int32_t a : p.left) {
    if (std::find(p.right.begin(), p.right.end(), a) != p.right.end()) {
      return BadToken(token, absl::StrCat("worker ", a, " is on both sides"));
    }
  }
  spec->partitions.push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status ParseCrash(absl::string_view token, absl::string_view value,
                        FaultSpec* spec) {
  if (value == "random") {
    ++spec->random_crashes;
    return absl::OkStatus();
  }
  CrashSpec c;
  std::vector<absl::string_view> parts =
      absl::StrSplit(value, absl::MaxSplits('@', 1));
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &c.worker) ||
      c.worker < 0) {
    return BadToken(
        token, "expected W@T or W@T..R (worker id, crash time, restart time)");
  }
  const size_t dots = parts[1].find("..");
  if (dots == absl::string_view::npos) {
    if (!ParseDur(parts[1], &c.at))
      return BadToken(token, "crash time must be a duration");
  } else {
    absl::Duration r;
    if (!ParseDur(parts[1].substr(0, dots), &c.at) ||
        !ParseDur(parts[1].substr(dots + 2), &r) || r <= c.at) {
      return BadToken(token,
                      "expected W@T..R with restart time R after crash time T");
    }
    c.restart_at = r;
  }
  spec->crashes.push_back(c);
  return absl::OkStatus();
}

void AppendLink(const LinkFaults& l, absl::string_view prefix,
                std::vector<std::string>* out) {
  if (l.drop) out->push_back(absl::StrCat(prefix, "drop=", *l.drop));
  if (l.dup) out->push_back(absl::StrCat(prefix, "dup=", *l.dup));
  if (l.reorder) out->push_back(absl::StrCat(prefix, "reorder=", *l.reorder));
  if (l.delay)
    out->push_back(absl::StrCat(prefix, "delay=", l.delay->ToString()));
}

LinkFaults Merge(const LinkFaults& base, const LinkFaults& over) {
  LinkFaults r = base;
  if (over.drop) r.drop = over.drop;
  if (over.dup) r.dup = over.dup;
  if (over.reorder) r.reorder = over.reorder;
  if (over.delay) r.delay = over.delay;
  return r;
}

absl::Duration RandomDuration(Prng& rng, absl::Duration lo, absl::Duration hi) {
  return lo + absl::Nanoseconds(
                  rng.UniformInt(0, absl::ToInt64Nanoseconds(hi - lo)));
}

PartitionSpec RandomPartition(int n, Prng& rng) {
  PartitionSpec p;
  // Split the workers into two non-empty groups at random.
  std::vector<int32_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = i;
  for (int i = n - 1; i > 0; --i) std::swap(ids[i], ids[rng.Uniform(i + 1)]);
  const int cut = 1 + static_cast<int>(rng.Uniform(std::max(1, n - 1)));
  for (int i = 0; i < n; ++i) (i < cut ? p.left : p.right).push_back(ids[i]);
  std::sort(p.left.begin(), p.left.end());
  std::sort(p.right.begin(), p.right.end());
  p.one_way = rng.Bernoulli(0.5);
  p.start = RandomDuration(rng, absl::ZeroDuration(), absl::Seconds(1));
  p.end =
      p.start + RandomDuration(rng, absl::Milliseconds(20), absl::Seconds(2));
  return p;
}

CrashSpec RandomCrash(int n, Prng& rng) {
  CrashSpec c;
  c.worker = static_cast<int32_t>(rng.Uniform(n));
  c.at = RandomDuration(rng, absl::ZeroDuration(), absl::Seconds(1));
  if (rng.Bernoulli(0.5)) {
    c.restart_at =
        c.at + RandomDuration(rng, absl::Milliseconds(1), absl::Seconds(1));
  }
  return c;
}

}  // namespace

absl::Duration DelayDist::Sample(Prng& rng) const {
  if (kind == Kind::kExponential) {
    const double u = rng.UniformDouble();
    const double x = std::min(-std::log1p(-u), 20.0);
    return absl::Nanoseconds(
        static_cast<int64_t>(x * absl::ToDoubleNanoseconds(mean)));
  }
  if (hi <= lo) return lo;
  return RandomDuration(rng, lo, hi);
}

absl::Duration DelayDist::Max() const {
  return kind == Kind::kExponential ? mean * 20 : hi;
}

std::string DelayDist::ToString() const {
  if (kind == Kind::kExponential) return absl::StrCat("exp:", Dur(mean));
  if (lo == hi) return Dur(lo);
  return absl::StrCat(Dur(lo), "..", Dur(hi));
}

bool PartitionSpec::Cuts(int32_t from, int32_t to,
                         absl::Duration elapsed) const {
  if (elapsed < start || elapsed >= end) return false;
  auto in = [](const std::vector<int32_t>& g, int32_t w) {
    return std::find(g.begin(), g.end(), w) != g.end();
  };
  if (in(left, from) && in(right, to)) return true;
  return !one_way && in(right, from) && in(left, to);
}

std::string PartitionSpec::ToString() const {
  std::string s = absl::StrCat(absl::StrJoin(left, "+"), one_way ? ">" : "-",
                               absl::StrJoin(right, "+"));
  if (start != absl::ZeroDuration() || end != absl::InfiniteDuration()) {
    absl::StrAppend(&s, "@", Dur(start), "..",
                    end == absl::InfiniteDuration() ? "" : Dur(end));
  }
  return s;
}

std::string CrashSpec::ToString() const {
  std::string s = absl::StrCat(worker, "@", Dur(at));
  if (restart_at) absl::StrAppend(&s, "..", Dur(*restart_at));
  return s;
}

absl::StatusOr<FaultSpec> FaultSpec::Parse(absl::string_view text) {
  FaultSpec spec;
  text = absl::StripAsciiWhitespace(text);
  if (text.empty())
    return absl::InvalidArgumentError(
        "fault spec: empty (use 'none' or 'all')");
  if (text == "none") return spec;
  if (text == "all") {
    spec.all = true;
    return spec;
  }
  for (absl::string_view token : absl::StrSplit(text, ',')) {
    token = absl::StripAsciiWhitespace(token);
    if (token == "none" || token == "all") {
      return BadToken(token, "'none' and 'all' must stand alone");
    }
    const size_t eq = token.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return BadToken(
          token,
          "expected KEY=VALUE (keys: drop dup reorder delay partition crash "
          "skew drift type)");
    }
    const absl::string_view key = token.substr(0, eq);
    const absl::string_view value = token.substr(eq + 1);
    if (absl::Status s = ParseLinkKey(token, key, value, &spec.link);
        !absl::IsNotFound(s)) {
      if (!s.ok()) return s;
      continue;
    }
    if (key == "partition") {
      if (auto s = ParsePartition(token, value, &spec); !s.ok()) return s;
    } else if (key == "crash") {
      if (auto s = ParseCrash(token, value, &spec); !s.ok()) return s;
    } else if (key == "skew") {
      if (!ParseDur(value, &spec.skew))
        return BadToken(token, "expected a duration, e.g. 50ms");
    } else if (key == "drift") {
      if (!absl::SimpleAtod(value, &spec.drift) ||
          !(spec.drift >= 0 && spec.drift < 0.5)) {
        return BadToken(token,
                        "expected a rate deviation in [0, 0.5), e.g. 0.001");
      }
    } else if (key == "type") {
      const size_t colon = value.find(':');
      const size_t eq2 =
          colon == absl::string_view::npos ? colon : value.find('=', colon);
      if (colon == absl::string_view::npos || eq2 == absl::string_view::npos) {
        return BadToken(token,
                        "expected type=NAME:KEY=VALUE, e.g. "
                        "type=RREF_USER_DELETE:drop=0.5");
      }
      MessageType type;
      if (!ParseMessageType(value.substr(0, colon), &type).ok()) {
        return BadToken(
            token,
            absl::StrCat("unknown message type '", value.substr(0, colon),
                         "' (names as in core/envelope.proto)"));
      }
      const absl::string_view k = value.substr(colon + 1, eq2 - colon - 1);
      absl::Status s =
          ParseLinkKey(token, k, value.substr(eq2 + 1), &spec.by_type[type]);
      if (absl::IsNotFound(s)) {
        return BadToken(token, absl::StrCat("unknown key '", k,
                                            "' (drop, dup, reorder, delay)"));
      }
      if (!s.ok()) return s;
    } else {
      return BadToken(
          token,
          absl::StrCat("unknown key '", key,
                       "' (keys: drop dup reorder delay partition crash skew "
                       "drift type)"));
    }
  }
  return spec;
}

std::string FaultSpec::ToString() const {
  if (all) return "all";
  std::vector<std::string> tokens;
  AppendLink(link, "", &tokens);
  for (const auto& [type, l] : by_type) {
    AppendLink(l, absl::StrCat("type=", MessageTypeName(type), ":"), &tokens);
  }
  for (const PartitionSpec& p : partitions)
    tokens.push_back("partition=" + p.ToString());
  for (int i = 0; i < random_partitions; ++i)
    tokens.push_back("partition=random");
  for (const CrashSpec& c : crashes) tokens.push_back("crash=" + c.ToString());
  for (int i = 0; i < random_crashes; ++i) tokens.push_back("crash=random");
  if (skew > absl::ZeroDuration()) tokens.push_back("skew=" + Dur(skew));
  if (drift > 0) tokens.push_back(absl::StrCat("drift=", drift));
  if (tokens.empty()) return "none";
  return absl::StrJoin(tokens, ",");
}

bool FaultSpec::CanLose() const {
  if (all || !partitions.empty() || random_partitions > 0 || !crashes.empty() ||
      random_crashes > 0) {
    return true;
  }
  if (link.drop.value_or(0) > 0) return true;
  for (const auto& [type, l] : by_type) {
    if (l.drop.value_or(0) > 0) return true;
  }
  return false;
}

absl::Status FaultSpec::Validate(int num_workers) const {
  for (const PartitionSpec& p : partitions) {
    for (const auto* g : {&p.left, &p.right}) {
      for (int32_t w : *g) {
        if (w >= num_workers) {
          return BadToken("partition=" + p.ToString(),
                          absl::StrCat("worker ", w, " does not exist (",
                                       num_workers, " workers)"));
        }
      }
    }
  }
  for (const CrashSpec& c : crashes) {
    if (c.worker >= num_workers) {
      return BadToken("crash=" + c.ToString(),
                      absl::StrCat("worker ", c.worker, " does not exist (",
                                   num_workers, " workers)"));
    }
  }
  return absl::OkStatus();
}

const LinkFaults& FaultPlan::For(MessageType type) const {
  auto it = by_type.find(type);
  return it == by_type.end() ? link : it->second;
}

std::string FaultPlan::ToString() const {
  // Only what differs from "none" (zero probabilities, the default latency).
  auto interesting = [](const LinkFaults& l, const LinkFaults* base) {
    LinkFaults r;
    const std::string default_delay = DelayDist().ToString();
    if (l.drop && *l.drop > 0 && (!base || base->drop != l.drop))
      r.drop = l.drop;
    if (l.dup && *l.dup > 0 && (!base || base->dup != l.dup)) r.dup = l.dup;
    if (l.reorder && *l.reorder > 0 && (!base || base->reorder != l.reorder)) {
      r.reorder = l.reorder;
    }
    if (l.delay && (base ? l.delay->ToString() != base->delay->ToString()
                         : l.delay->ToString() != default_delay)) {
      r.delay = l.delay;
    }
    return r;
  };
  std::vector<std::string> tokens;
  AppendLink(interesting(link, nullptr), "", &tokens);
  for (const auto& [type, l] : by_type) {
    AppendLink(interesting(l, &link),
               absl::StrCat("type=", MessageTypeName(type), ":"), &tokens);
  }
  for (const PartitionSpec& p : spec.partitions)
    tokens.push_back("partition=" + p.ToString());
  for (const CrashSpec& c : spec.crashes)
    tokens.push_back("crash=" + c.ToString());
  if (spec.skew > absl::ZeroDuration())
    tokens.push_back("skew=" + Dur(spec.skew));
  if (spec.drift > 0) tokens.push_back(absl::StrCat("drift=", spec.drift));
  return absl::StrJoin(tokens, ",");
}

FaultPlan ResolveFaults(const FaultSpec& input, int num_workers, Prng& rng) {
  FaultPlan plan;
  FaultSpec spec = input;
  if (spec.all) {
    spec = FaultSpec();
    const double drops[] = {0, 0.01, 0.05};
    const double dups[] = {0, 0.02, 0.1};
    const double reorders[] = {0, 0.05, 0.2};
    spec.link.drop = drops[rng.Uniform(3)];
    spec.link.dup = dups[rng.Uniform(3)];
    spec.link.reorder = reorders[rng.Uniform(3)];
    DelayDist d;
    switch (rng.Uniform(4)) {
      case 0:
        d.lo = absl::ZeroDuration(), d.hi = absl::Milliseconds(1);
        break;
      case 1:
        d.lo = absl::ZeroDuration(), d.hi = absl::Milliseconds(10);
        break;
      case 2:
        d.lo = absl::Milliseconds(1), d.hi = absl::Milliseconds(50);
        break;
      default:
        d.kind = DelayDist::Kind::kExponential, d.mean = absl::Milliseconds(2);
        break;
    }
    spec.link.delay = d;
    if (rng.Bernoulli(0.25)) {
      const MessageType targets[] = {
          wire::TEST_CALL,       wire::RESPONSE,       wire::ERROR_RESPONSE,
          wire::SHUTDOWN_INTENT, wire::SHUTDOWN_QUERY, wire::SHUTDOWN_REPORT,
          wire::SHUTDOWN_COMMIT, wire::SHUTDOWN_ACK};
      LinkFaults& t = spec.by_type[targets[rng.Uniform(8)]];
      if (rng.Bernoulli(0.5)) {
        t.drop = 0.3;
      } else {
        t.dup = 0.5;
      }
    }
    if (rng.Bernoulli(0.2)) spec.random_partitions = 1;
    if (rng.Bernoulli(0.2)) spec.random_crashes = 1;
    if (rng.Bernoulli(0.5)) spec.skew = absl::Milliseconds(50);
    if (rng.Bernoulli(0.5)) spec.drift = 0.001;
  }
  for (int i = 0; i < spec.random_partitions && num_workers >= 2; ++i) {
    spec.partitions.push_back(RandomPartition(num_workers, rng));
  }
  spec.random_partitions = 0;
  for (int i = 0; i < spec.random_crashes && num_workers >= 1; ++i) {
    spec.crashes.push_back(RandomCrash(num_workers, rng));
  }
  spec.random_crashes = 0;

  plan.link.drop = spec.link.drop.value_or(0);
  plan.link.dup = spec.link.dup.value_or(0);
  plan.link.reorder = spec.link.reorder.value_or(0);
  plan.link.delay = spec.link.delay.value_or(DelayDist());
  for (const auto& [type, l] : spec.by_type)
    plan.by_type[type] = Merge(plan.link, l);
  for (int w = 0; w < num_workers; ++w) {
    const int64_t skew_ns = absl::ToInt64Nanoseconds(spec.skew);
    plan.clock_skew.push_back(
        skew_ns > 0 ? absl::Nanoseconds(rng.UniformInt(-skew_ns, skew_ns))
                    : absl::ZeroDuration());
    plan.clock_rate.push_back(
        spec.drift > 0 ? 1.0 + spec.drift * (2 * rng.UniformDouble() - 1)
                       : 1.0);
  }
  plan.spec = std::move(spec);
  return plan;
}

}  // namespace tether::sim
