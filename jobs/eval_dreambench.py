"""Ray job: DreamBench evaluation (single- and multi-subject, DINO / CLIP-I / CLIP-T) tracked in MLflow.

    ray job submit --working-dir . -- python jobs/eval_dreambench.py --config eval.yaml
    python jobs/eval_dreambench.py --dreambench /data/dreambooth/dataset --model /models/FLUX.1-dev \
        --lora mlflow:<run_id> --dino-model /models/dino-vits16 --clip-model /models/clip-vit-b-32 --limit 8

Joins the cluster the job runs on (RAY_ADDRESS), else a running `ray start` cluster, else starts a
local Ray; flags and overrides are those of `musar eval` (see evaluation/run.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from evaluation.run import EvalConfig, run_eval  # noqa: E402
from musar.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(EvalConfig, run_eval, prog="jobs/eval_dreambench.py",
                      description="DreamBench evaluation: Ray Data generation + DINO / CLIP-I / CLIP-T, one MLflow run."))
