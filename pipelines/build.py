"""``musar data build``: Subject200K parquet -> single / diptych shards with Ray Data.

    musar data build --input DIR_OR_URI --output DIR [--seed S] [--min-score 5] [--collection collection_2] [--limit N]

Runs on whatever Ray it finds (``RAY_ADDRESS``, a ``ray start`` cluster) or starts a local one.
Stages (each a streaming Ray Data pipeline; the driver only plans and counts):

1. row groups -> read -> filter (collection, quality) -> validate + cut panels -> ``single/`` shards,
   one small report per input row back to the driver (:mod:`pipelines.subjects`);
2. driver: accounting, ``quarantine/``, and the pairing plan from kept ids and categories
   (:mod:`pipelines.pairing`);
3. chunks of pairs -> read both sides from ``single/`` -> compose -> ``diptych_random/`` and
   ``diptych_same_category/`` shards (:mod:`pipelines.diptychs`);
4. optional: encoder actors -> ``encoded/<dataset>/`` tensor shards (:mod:`pipelines.encode`);
5. ``manifest.json`` (:mod:`pipelines.manifest`); the staging folder is swapped in whole
   (:mod:`pipelines.output`).

What touches the driver, all of it metadata handled with vectorised pyarrow / numpy: the input's
file listing and parquet footers; one report per input row (id, outcome, reason, category key,
shard location: ~100 bytes) for accounting, ``quarantine/`` and the pairing plan (global pairing
without replacement needs every kept id at once); the ``sample_id`` / ``content_hash`` columns read
back for the manifest. Image bytes never reach it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .diptychs import compose_chunk, pair_table
from .encode import ENCODED_SCHEMA, EncoderConfig, SampleEncoder, write_encoded
from .images import ImageCodec
from .manifest import accounting, code_version, write_manifest
from .output import check_output, staged_output
from .pairing import random_pairs, same_category_pairs
from .panels import PanelGeometry
from .progress import Progress, say
from .schema import (
    DATASETS,
    ENCODED_DIR,
    FORMAT_VERSION,
    KEPT,
    MANIFEST,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    QUARANTINED,
    SAMPLE_SCHEMA,
)
from .shards import summarise, write_empty
from .source import list_parquet_files, plan_fragments, resolve_input
from .subjects import fragments_to_singles


@dataclass
class DataBuildConfig:
    input: str  # folder, file or URI (s3://, gs://, ...) of Subject200K-format parquet
    output: str  # local or shared-mount folder; built beside it, then swapped in
    seed: int = 0
    min_score: int = 5  # keep rows whose three quality scores are all >= this
    collection: str | None = "collection_2"  # null: every collection
    limit: int | None = None  # only the first N input rows (files sorted by path, in file order)
    overwrite: bool = False  # replace an existing output (atomically); else refuse
    random_pairs: int | None = None  # None: as many pairs as kept subjects (two passes)
    same_category_pairs: int | None = None  # None: as many as subjects in categories of >= 2
    diptych_size: tuple[int, int] = (1024, 512)  # (width, height) of the side-by-side target
    shard_max_rows: int = 128  # single/ is written per max_rows // 2 input rows (memory per task)
    shard_max_mb: int = 256  # image bytes per shard, approximately
    num_blocks: int | None = None  # stage 1 tasks (each reads whole row groups); None: from CPUs and row groups
    encode: bool = False  # also write encoded/ tensor shards (needs encode_model)
    encode_model: str | None = None  # FLUX.1 diffusers folder, or "tiny" for the embedded tiny model
    quiet: bool = False
    geometry: PanelGeometry = field(default_factory=PanelGeometry)
    image: ImageCodec = field(default_factory=ImageCodec)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must not be empty")
        if self.min_score < 0:
            raise ValueError(f"min_score must be >= 0, got {self.min_score}")
        for name in ("limit", "num_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {getattr(self, name)}")
        for name in ("random_pairs", "same_category_pairs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (or null), got {getattr(self, name)}")
        w, h = self.diptych_size
        if w < 2 or h < 1 or w % 2:
            raise ValueError(f"diptych_size must be (even width, height), got {self.diptych_size}")
        if self.shard_max_rows < 2 or self.shard_max_mb < 1:
            raise ValueError(f"shard_max_rows must be >= 2 and shard_max_mb >= 1, got {self.shard_max_rows}, {self.shard_max_mb}")
        if self.encode and not self.encode_model:
            raise ValueError("encode=true needs encode_model (a FLUX.1 diffusers folder, or 'tiny')")
        if self.encode:
            sizes = {"diptych_size": self.diptych_size}
            sizes.update({f"geometry.{n} panel": (b[2] - b[0], b[3] - b[1])
                          for n, b in zip(("left", "right"), self.geometry.boxes)})  # fmt: skip
            for name, (w, h) in sizes.items():
                if w % 16 or h % 16:
                    raise ValueError(f"encode=true needs VAE-packable targets: {name} {w}x{h} is not a multiple of 16")


def ensure_ray():
    """The project's one way to reach Ray (musar.ray_cluster): join a cluster if there is one, else start one."""
    import ray

    from musar.ray_cluster import ensure_ray as connect

    connect()
    return ray


def build_shards(cfg: DataBuildConfig) -> dict:
    """Run the whole build; returns the manifest (also written to ``<output>/manifest.json``)."""
    started = time.perf_counter()
    fs, root = resolve_input(cfg.input)
    files = list_parquet_files(fs, root, cfg.input)
    fragments = plan_fragments(fs, files, cfg.limit)
    input_rows = sum(f.num_rows for f in fragments)
    if input_rows == 0:
        raise ValueError(f"input {cfg.input!r} holds no rows")
    check_output(cfg.output, cfg.overwrite)  # refuse before any work
    model_dir = _model_dir(cfg) if cfg.encode else None
    say(f"{cfg.input}: {len(files)} file(s), {len(fragments)} row group(s), {input_rows:,} rows", cfg.quiet)
    ray = ensure_ray()
    timing = {}
    with staged_output(cfg.output, cfg.overwrite) as stage:
        t = time.perf_counter()
        reports = _singles(cfg, ray, fs, fragments, input_rows, stage)
        counts = accounting(reports, input_rows)
        _write_quarantine(reports, stage)
        kept = (reports.filter(pc.equal(reports.column("status"), KEPT))
                .select(["row_id", "category_key", "shard", "shard_row"]).sort_by("row_id"))  # fmt: skip
        timing["singles_s"] = round(time.perf_counter() - t, 3)
        say(f"kept {counts['kept']:,}, filtered {counts['filtered_by']}, quarantined "
            f"{ {k: v for k, v in counts['quarantined_by'].items() if v} }", cfg.quiet)  # fmt: skip

        t = time.perf_counter()
        plans = {
            "diptych_random": random_pairs(kept.num_rows, cfg.random_pairs, cfg.seed),
            "diptych_same_category": same_category_pairs(
                kept.column("category_key").to_numpy(zero_copy_only=False),
                kept.column("row_id").to_numpy(zero_copy_only=False), cfg.same_category_pairs, cfg.seed),
        }  # fmt: skip
        _diptychs(cfg, ray, plans, kept, stage)
        timing["diptychs_s"] = round(time.perf_counter() - t, 3)

        datasets = {}
        for name in DATASETS:
            summary = summarise(str(stage / name))
            if summary["rows"] == 0:
                write_empty(str(stage / name), SAMPLE_SCHEMA)
            if name in plans:
                summary["pairing"] = plans[name].info
                expected = len(plans[name])
            else:
                expected = 2 * counts["kept"]
            if summary["rows"] != expected:
                raise AssertionError(f"{name}: wrote {summary['rows']} rows, expected {expected}")
            datasets[name] = summary

        encoded = None
        if cfg.encode:
            t = time.perf_counter()
            encoded = _encode(cfg, ray, model_dir, stage, sum(d["rows"] for d in datasets.values()))
            timing["encode_s"] = round(time.perf_counter() - t, 3)
        timing["total_s"] = round(time.perf_counter() - started, 3)

        manifest = {
            "format": FORMAT_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": {"uri": cfg.input, "files": len(files), "row_groups": len(fragments)},
            "seed": cfg.seed,
            "code_version": code_version(),
            "counts": counts,
            "rows_per_dataset": {name: d["rows"] for name, d in datasets.items()},
            "datasets": datasets,
            "image": {
                "format": cfg.image.format,
                "diptych_size": list(cfg.diptych_size),
                "panel_boxes": [list(b) for b in cfg.geometry.boxes],
            },
            "encoded": encoded,
            "config": dataclasses.asdict(cfg),
            "timing_s": timing,
        }
        write_manifest(stage / MANIFEST, manifest)
    out = Path(cfg.output).expanduser().absolute()
    say(f"wrote {out} in {timing['total_s']:.1f}s: {manifest['rows_per_dataset']}", cfg.quiet)
    return manifest


def _unreserved(ds):
    """Turn off Ray Data's per-operator resource reservation for this dataset (its own context).

    Each stage here is one heavy operator; the reservation, meant to keep multi-operator pipelines
    from starving their downstream operators, holds part of a small cluster back from it. Measured
    on 2 CPUs: 8 one-second tasks took 5.5 s with it (the second slot started ~1 s late, ~0.12 s
    between tasks) and 4.1 s without.
    """
    ds.context.op_resource_reservation_enabled = False
    return ds


def _model_dir(cfg: DataBuildConfig) -> str:
    if cfg.encode_model == "tiny":
        from musar_core.tiny import tiny_flux_dir

        return str(tiny_flux_dir())
    path = Path(cfg.encode_model).expanduser().absolute()
    missing = [s for s in ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2") if not (path / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"encode_model {cfg.encode_model!r} is not a FLUX.1 diffusers folder (missing {missing})")
    return str(path)


def _singles(cfg: DataBuildConfig, ray, fs, fragments, input_rows: int, stage: Path) -> pa.Table:
    import ray.data

    items = [dataclasses.asdict(f) for f in fragments]
    # Row groups are often small (Subject200K: ~100 rows); a task per row group would pay Ray's
    # per-task gap (~0.15 s) every fraction of a second, so tasks take several, still >= 8 per CPU.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = cfg.num_blocks or max(min(len(items), 8 * cpus), math.ceil(len(items) / 16))
    ds = _unreserved(ray.data.from_items(items, override_num_blocks=min(blocks, len(items))))
    ds = ds.map_batches(
        fragments_to_singles, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(filesystem=fs, out_dir=str(stage), max_rows=cfg.shard_max_rows, max_bytes=cfg.shard_max_mb << 20,
                       collection=cfg.collection, min_score=cfg.min_score, geometry=cfg.geometry, codec=cfg.image),
    )  # fmt: skip
    progress = Progress("filter, crop, write single/", input_rows, quiet=cfg.quiet)
    reports = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        reports.append(batch)
        progress.update(batch.num_rows)
    progress.finish()
    return pa.concat_tables(reports)


def _write_quarantine(reports: pa.Table, stage: Path) -> None:
    rows = (reports.filter(pc.equal(reports.column("status"), QUARANTINED))
            .select(["row_id", "reason", "detail"]).sort_by("row_id"))  # fmt: skip
    (stage / QUARANTINE_DIR).mkdir()
    pq.write_table(rows.cast(QUARANTINE_SCHEMA), stage / QUARANTINE_DIR / "quarantine.parquet")


def _diptychs(cfg: DataBuildConfig, ray, plans: dict, kept: pa.Table, stage: Path) -> None:
    """Stage 2 (see :mod:`pipelines.diptychs`): chunks of pairs, one task and one shard each."""
    import ray.data

    total = sum(len(p) for p in plans.values())
    if total == 0:
        return
    cpus = int(ray.cluster_resources().get("CPU", 1))
    chunk = max(1, min(cfg.shard_max_rows, math.ceil(total / (8 * cpus))))  # >= 8 tasks per CPU: even tails
    chunks = []
    for name, plan in plans.items():  # a loop over the two datasets, then over chunks
        table = pair_table(name, plan, kept)
        chunks += [table.slice(i, chunk) for i in range(0, table.num_rows, chunk)]
    ds = _unreserved(ray.data.from_arrow(chunks)).map_batches(
        compose_chunk, batch_size=None, batch_format="pyarrow",
        fn_kwargs=dict(single_dir=str(stage / "single"), out_dir=str(stage), size=tuple(cfg.diptych_size),
                       codec=cfg.image, max_rows=cfg.shard_max_rows, max_bytes=cfg.shard_max_mb << 20),
    )  # fmt: skip
    progress = Progress("compose + write diptychs", total, unit="pairs", quiet=cfg.quiet)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.update(pc.sum(batch.column("rows")).as_py() or 0)
    progress.finish()


def _encode(cfg: DataBuildConfig, ray, model_dir: str, stage: Path, total: int) -> dict:
    import ray.data

    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.encoder.actors or max(1, gpus)
    ds = _unreserved(ray.data.read_parquet([str(stage / name) for name in DATASETS]))
    ds = ds.map_batches(
        SampleEncoder, fn_constructor_kwargs=dict(model_dir=model_dir, cfg=cfg.encoder),
        batch_size=cfg.encoder.batch_size, batch_format="pyarrow", concurrency=actors,
        **({"num_gpus": 1} if gpus else {}),
    )  # fmt: skip
    ds = ds.map_batches(write_encoded, batch_size=cfg.shard_max_rows, batch_format="pyarrow",
                        fn_kwargs=dict(out_dir=str(stage / ENCODED_DIR), max_rows=cfg.shard_max_rows,
                                       max_bytes=cfg.shard_max_mb << 20))  # fmt: skip
    say(f"encoding {total:,} samples with {actors} actor(s){' on GPU' if gpus else ' on CPU'} ({model_dir})", cfg.quiet)
    progress = Progress("encode", total, unit="samples", quiet=cfg.quiet)
    sizes = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        sizes.append(batch)
        progress.update(batch.num_rows)
    progress.finish()
    sizes = pa.concat_tables(sizes) if sizes else pa.table({"dataset": pa.array([], pa.string()), "bytes": pa.array([], pa.int64())})
    per_dataset = {}
    for name in DATASETS:
        b = pc.filter(sizes.column("bytes"), pc.equal(sizes.column("dataset"), name))
        n = len(b)
        per_dataset[name] = {
            "rows": n,
            "bytes": pc.sum(b).as_py() or 0,
            "bytes_per_sample_mean": round((pc.sum(b).as_py() or 0) / n, 1) if n else 0,
            "bytes_per_sample_max": pc.max(b).as_py() or 0,
        }
        if n == 0:
            write_empty(str(stage / ENCODED_DIR / name), ENCODED_SCHEMA)
    return {"model": model_dir, "storage_dtype": cfg.encoder.storage_dtype, "condition_size": cfg.encoder.condition_size,
            "datasets": per_dataset}  # fmt: skip
