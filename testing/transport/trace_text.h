// Test helpers for the tracing tests: a trace file's text and substring counts
// in it. Tests only.
#ifndef TETHER_TESTING_TRANSPORT_TRACE_TEXT_H_
#define TETHER_TESTING_TRANSPORT_TRACE_TEXT_H_

#include <fstream>
#include <sstream>
#include <string>

namespace tether::testing {

// The whole file at `path` ("" if it cannot be read).
inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Occurrences of `what` in `text` (overlapping ones too).
inline int Count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos;
       at = text.find(what, at + 1))
    ++n;
  return n;
}

inline bool Has(const std::string& text, const std::string& what) {
  return text.find(what) != std::string::npos;
}

}  // namespace tether::testing

#endif  // TETHER_TESTING_TRANSPORT_TRACE_TEXT_H_
