// The distributed-autograd scenarios for the explorer (design note §4.7; //testing/explore:explore
// --scenario=autograd, or one of autograd_chain, autograd_cycle, autograd_trainers,
// autograd_error, autograd_crash, autograd_release_race, autograd_shutdown). Every worker runs
// the core protocol (core/dist_autograd.h) over a fake integer engine (dist_autograd_harness.h);
// forward "calls" are TEST_CALL agent calls made inside a context, recorded as the glue records
// them (send functions on the caller, Join + recv functions on the callee, the callee's involved
// workers on every reply), in shapes drawn from the seed:
//   - nested call trees (A→B→C, replies carry values back), pipelines (each hop forwards and
//     replies at once; the last hop brings the value back to the initiator), cycles (A→B→A);
//   - initiators run their contexts one after another: forward, one or more backward passes
//     (retain_graph for all but the last), exit (Release), then a graceful shutdown.
// After every successful pass the god view checks each worker's gradients exactly; the ledger
// (dist_autograd_ledger.h) checks releases, joins and gradients after release, deadlines and
// exactly-once send functions; after the run every worker that shut down cleanly must hold no
// context and read zero on num_autograd_contexts and num_current_backward_passes.
//
// `autograd` picks one of the variants from the seed.
#ifndef TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_SCENARIOS_H_
#define TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_SCENARIOS_H_

#include "core/dist_autograd.h"

namespace tether::scenarios {

// The planted distributed-autograd bugs the next scenario runs use (tests only; default none).
// Not thread-safe: set it before running.
DistAutogradPlantedBugs& PlantedDistAutogradBugs();

}  // namespace tether::scenarios

#endif  // TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_SCENARIOS_H_
