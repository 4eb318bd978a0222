"""Entry point shared by ``jobs/train_stage{1,2,3}.py``: the stage is fixed by the script."""

from __future__ import annotations

import sys

from musar.cli import job_main

from .config import TrainConfig


def stage_main(stage: int, argv: list[str] | None = None) -> int:
    from .driver import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    others = [a for a in argv if a.startswith("stage=") and a != f"stage={stage}"]
    if others:
        print(f"jobs/train_stage{stage}.py runs stage {stage}; drop {others[0]!r}", file=sys.stderr)
        return 2
    return job_main(TrainConfig, run_stage, argv + [f"stage={stage}"], prog=f"jobs/train_stage{stage}.py",
                    description=f"MUSAR training stage {stage} on Ray Train + DeepSpeed.")  # fmt: skip
