// explore: the simulator's command line. See testing/explore/explorer.h for flags and
// output.
#include <iostream>
#include <string>
#include <vector>

#include "testing/explore/explorer.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << tether::sim::Usage();
      return 0;
    }
  }
  absl::StatusOr<tether::sim::ExploreOptions> options =
      tether::sim::ParseExploreArgs(args);
  if (!options.ok()) {
    std::cerr << options.status().message() << "\n" << tether::sim::Usage();
    return 2;
  }
  tether::sim::ExploreSummary summary =
      tether::sim::Explore(*options, std::cout);
  std::cout.flush();
  return summary.failed > 0 ? 1 : 0;
}
