"""Under torch.distributed every rank runs the same backend: rank 0 decides (measures) and broadcasts, the other
ranks measure nothing (two gloo ranks on the CPU, RESASPP_AUTO=measure, DDP over FusedASPP)."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from test_distributed import _free_port

WORLD = 2


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RESASPP_AUTO="measure",
                      RESASPP_CACHE_DIR=os.path.join(out_dir, "cache"))
    import auto_candidates as planted
    from resaspp_ops import FusedASPP, autotune
    from resaspp_ops.autotune import selection

    def time_candidates(runs, device, budget_s=None):  # "fast" wins on rank 0 and would lose on rank 1
        for run in runs.values():
            run()
        return {name: [(0.1 if rank == 0 else 10.0) if name == "fast" else 1.0] for name in runs}

    selection.time_candidates = time_candidates
    planted.plant("fast", planted.fast())
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(FusedASPP(6, [1, 2], 4, dropout=0.0).double().train())
        x = torch.randn(2, 6, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(rank),
                        requires_grad=True)  # every direction: forward, input grad, weight grad
        for _ in range(2):
            model(x).square().sum().backward()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"counts": autotune.COUNTS,
                       "decisions": {d.key.text(): [d.chosen, d.source] for d in autotune.auto_choices()}}, f)
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_for_every_rank(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    zero, one = ranks
    assert zero["counts"]["measurements"] >= 3 and one["counts"] == {"measurements": 0, "candidate_runs": 0,
                                                                      "timed_runs": 0}
    assert zero["decisions"].keys() == one["decisions"].keys()
    for key, (chosen, source) in zero["decisions"].items():
        assert chosen == "fast" and source == "measured", key
        assert one["decisions"][key] == ["fast", "rank 0"], key
    written = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert sum(len(v) for v in written["environments"].values()) == len(zero["decisions"])  # rank 0 wrote them
