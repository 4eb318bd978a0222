"""Ray Data pipelines: Subject200K -> single / diptych shards (see the data-pipeline issue)."""
