"""The loop behind tools/soak-examples (a file, not stdin: launch.py spawns its workers)."""
import importlib
import os
import sys
import tempfile
import time

SIZES = {
    "parameter_server": {"steps": 5, "verbose": False},
    "reinforcement_learning": {"episodes": 4, "verbose": False},
    "pipeline": {"steps": 6, "micro_batches": 2, "verbose": False},
}


# What a swallowed error of the extension looks like in a worker's output (printed while
# dropping a reference, or reported as unraisable): a run that prints one fails, as a crash would.
SWALLOWED = ("tether: error", "Exception ignored", "pybind11_object_dealloc", "Traceback")


def run_capturing_stderr(fn):
    """Runs fn() with fd 2 (inherited by the spawned workers) going to a file; returns what was
    written there, after echoing it to the real stderr."""
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            out.seek(0)
            text = out.read().decode(errors="replace")
            sys.stderr.write(text)
    return text


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
        failure = None
        try:
            text = run_capturing_stderr(lambda: launch(target, 3, timeout=120, **SIZES[example]))
            found = [marker for marker in SWALLOWED if marker in text]
            if found:
                failure = f"the workers printed {found}"
        except SystemExit as e:
            failure = str(e)
        if failure is not None:
            print(f"run {i}/{runs}: FAILED after {time.time() - t:.1f}s: {failure}", flush=True)
            print(f"soak {example}: {i - 1} clean runs, then a failure", flush=True)
            sys.exit(1)
        print(f"run {i}/{runs}: ok {time.time() - t:.1f}s", flush=True)
    print(f"soak {example}: {runs}/{runs} clean in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
