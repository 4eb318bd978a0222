"""Ray Data pipelines: Subject200K -> ``single/``, ``diptych_random/``, ``diptych_same_category/`` shards.

Entry point: :func:`pipelines.build.build_shards` (``musar data build``, ``jobs/build_shards.py``);
test data: :func:`pipelines.synthetic.write_synthetic` (``musar data synth``).

=============  ================================================================================
module         concept
=============  ================================================================================
schema         the one sample schema, reason codes, content hash
source         input listing, row-group fragments, stable row ids (``file#row``)
filters        collection and quality filters (vectorised)
panels         composite geometry and panel cutting (wrong size / undecodable -> quarantine)
images         how shard images are stored (PNG, or JPEG q95)
samples        single / diptych construction, Figure 2 template, "another" rule, spans
subjects       stage 1 task: filter, validate, cut, write ``single/``, report every row
pairing        seeded pairing plans (random, same category) on the driver
diptychs       stage 2: read both sides of each pair where they lie in single/, compose, write
encode         optional stage 3: VAE / T5 / CLIP tensor shards (actor pool)
shards         bounded shard writing (one row per row group) and read-back summaries
manifest       accounting, invariant, code version, manifest.json
output         staging folder and atomic swap; refuse or replace an existing build
progress       progress lines for long stages
build          the config and the orchestration
synthetic      synthetic Subject200K-format parquet with planted faults
=============  ================================================================================
"""
