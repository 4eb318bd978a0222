"""MUSAR training stage 3: same-category diptychs (paper: 10k iterations), from stage 2's LoRA.

    ray job submit --working-dir . -- python jobs/train_stage3.py --config configs/a100_flux_dev.yaml [key=value ...]
    python jobs/train_stage3.py --config configs/local_tiny.yaml          # local Ray
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not pip-installed

from training.jobs import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main(3))
