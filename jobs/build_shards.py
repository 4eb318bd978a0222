"""Ray job: Subject200K parquet -> single / diptych shards (see pipelines/build.py).

    ray job submit --working-dir . -- python jobs/build_shards.py --input s3://bucket/subjects200k --output /mnt/shared/shards
    python jobs/build_shards.py --input data/subjects200k --output outputs/shards --limit 1000

Joins the cluster the job runs on (RAY_ADDRESS), else a running `ray start` cluster, else starts a
local Ray; flags and overrides are those of `musar data build`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from musar.cli import job_main
from pipelines.build import DataBuildConfig, build_shards

if __name__ == "__main__":
    sys.exit(job_main(DataBuildConfig, build_shards, prog="jobs/build_shards.py",
                      description="Subject200K parquet -> single / diptych shards with Ray Data."))
