"""One process of a multi-host run on CPU (see test_multihost.py): two local
devices per process, gloo collectives, ACDC over a mesh that spans every
process's devices, printed as JSON."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import json  # noqa: E402

import jax  # noqa: E402


def main(process_id: int, n_processes: int, port: int, mesh_spec: str, log: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n_processes,
                               process_id=process_id)
    from acdc_jax import tasks
    from acdc_jax.acdc import acdc

    model, task = tasks.get("tracr-proportion", n_examples=48)
    c = acdc(model, task, 0.05, progress=False, mesh=mesh_spec, log_path=log)
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "decisions": [[d.edge, d.tried, d.kept] for d in c.decisions],
                      "metrics": [d.metric_after for d in c.decisions if d.tried]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
