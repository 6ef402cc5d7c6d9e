// The RRef scenarios for the explorer (//testing/explore:explore --scenario=rref, or one of
// rref_chain, rref_tree, rref_cycle, rref_churn, rref_overtake, rref_crash,
// rref_shutdown). Every worker runs an RRef context; references are created
// with remote() (to others and to self), passed along chains, trees and cycles
// of workers, fetched with timeouts, dropped in random orders (some while their
// creation is still in flight, some before a creation that was given up on),
// workers crash mid-fork, and every worker deletes its references and shuts
// down gracefully with references still alive. After each run: the ghost ledger
// (rref_ledger.h) must be clean, every fetch must complete by its deadline
// (recorder), and each worker that shut down cleanly must read zero on every
// RRef debug counter.
//
// `rref` picks one of the variants (and 4 to 8 active workers) from the seed.
#ifndef TETHER_TESTING_SCENARIOS_RREF_SCENARIOS_H_
#define TETHER_TESTING_SCENARIOS_RREF_SCENARIOS_H_

#include "core/rref_context.h"

namespace tether::scenarios {

// The planted RRef bugs the next scenario runs use (tests only; default none).
// Not thread-safe: set it before running.
RRefPlantedBugs& PlantedRRefBugs();

}  // namespace tether::scenarios

#endif  // TETHER_TESTING_SCENARIOS_RREF_SCENARIOS_H_
