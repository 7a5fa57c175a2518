"""`tslm` with the process group forced on for a single torchrun rank (tests/gpu/check.py, distributed_fsdp).

    torchrun --standalone --nproc_per_node 1 tests/gpu/one_rank_dist.py train --parallel fsdp ...

With one process tslm trains without a process group (`Dist.enabled` is `world_size > 1`), so one GPU never
reaches NCCL, FSDP2 or the gathered save. Here `Dist.enabled` is true for any torchrun rank, so those run for
real on one GPU (NCCL; gloo on a CPU). After the command, one JSON line reports the backend and world size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tinystories_cli import device  # noqa: E402
from tinystories_cli.cli import main  # noqa: E402

device.Dist.enabled = property(lambda self: self.world_size >= 1)  # type: ignore[assignment]

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if torch.distributed.is_initialized():
        print(json.dumps({"one_rank_dist": True, "backend": torch.distributed.get_backend(),
                          "world_size": torch.distributed.get_world_size()}), flush=True)
        torch.distributed.destroy_process_group()
    sys.exit(code)
