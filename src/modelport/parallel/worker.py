"""Entry point of one tensor-parallel child rank: `python -m modelport.parallel.worker CFG RANK PORT`."""

from __future__ import annotations

import pickle
import sys


def main(argv: list[str]) -> int:
    import torch

    from modelport.engine.core_client import prepare_child_process
    from modelport.parallel.workers import cpu_threads_per_rank, init_process_group, worker_loop
    from modelport.runner.model_runner import ModelRunner

    prepare_child_process()
    path, rank, port = argv[0], int(argv[1]), int(argv[2])
    with open(path, "rb") as f:
        config = pickle.load(f)
    size = config.parallel_config.tensor_parallel_size
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(config.parallel_config.world_size))
    else:  # the group's devices start at the config's (a data-parallel replica's first GPU)
        torch.cuda.set_device((torch.device(config.device).index or 0) + rank)
    init_process_group(device_type, rank, size, port)
    runner = ModelRunner(config, tp_rank=rank)
    runner.load_model()
    try:
        worker_loop(runner)
    except Exception:
        return 1  # rank 0 went away: nothing left to serve
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
