"""One process of the two-host test in tests/test_scale.py (not a test module itself).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CONFIG_JSON WORKDIR [RECORD_DIR]

Runs `jaxcond train` (its command line, flags and all) as process PROCESS_ID of a run
coordinated on 127.0.0.1 with gloo CPU collectives, and writes the record ids this
process loaded, by step, to RECORD_DIR/loaded_<PROCESS_ID>.json (default WORKDIR, which
must then be local) so the test can check each host read only its share.
"""

import json
import os
import sys

sys.modules.setdefault("torch", None)  # as `jaxcond` does: diffusers would import it (~5 s)
import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    pid, n, port, config_path, workdir, *rest = sys.argv[1:]
    record_dir = rest[0] if rest else workdir
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("ORBAX_COORDINATION_TIMEOUT"):  # a test's shorter wait for a failed peer (300 s)
        from orbax.checkpoint._src.multihost import multihost
        multihost._DEFAULT_BARRIER_TIMEOUT = int(os.environ["ORBAX_COORDINATION_TIMEOUT"])
    from jaxcond import cli
    from jaxcond.data import pipeline

    loaded: dict[int, list[int]] = {}  # by step: loader threads finish in any order
    batch = pipeline.DemoData.batch

    def recording(self, ids: np.ndarray, step: int) -> dict:
        assert step not in loaded, f"step {step} loaded twice"
        loaded[step] = np.asarray(ids).tolist()
        return batch(self, ids, step)

    pipeline.DemoData.batch = recording
    sys.argv = ["jaxcond", "train", "--config", f"{ROOT}/tests/json_config.py:{config_path}",
                "--workdir", workdir, "--coordinator_address", f"127.0.0.1:{port}",
                "--num_processes", n, "--process_id", pid]
    try:
        cli.main()  # absl's app.run: exits with SystemExit
    finally:
        with open(os.path.join(record_dir, f"loaded_{pid}.json"), "w") as f:
            json.dump({str(k): v for k, v in sorted(loaded.items())}, f)


if __name__ == "__main__":
    main()
