"""The loop behind tools/soak-examples (a file, not stdin: launch.py spawns its workers)."""
import importlib
import sys
import time

SIZES = {
    "parameter_server": {"steps": 5, "verbose": False},
    "reinforcement_learning": {"episodes": 4, "verbose": False},
    "pipeline": {"steps": 6, "micro_batches": 2, "verbose": False},
}


def main() -> None:
    example, runs, examples_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, examples_dir)
    import torch  # noqa: F401

    import tether.sim  # noqa: F401  (the driver imports the simulator, as examples_test.py does)
    from launch import launch

    target = importlib.import_module(example).main
    start = time.time()
    for i in range(1, runs + 1):
        t = time.time()
        try:
            launch(target, 3, timeout=120, **SIZES[example])
        except SystemExit as e:
            print(f"run {i}/{runs}: FAILED after {time.time() - t:.1f}s: {e}", flush=True)
            print(f"soak {example}: {i - 1} clean runs, then a failure", flush=True)
            sys.exit(1)
        print(f"run {i}/{runs}: ok {time.time() - t:.1f}s", flush=True)
    print(f"soak {example}: {runs}/{runs} clean in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
