"""Rows/second of the Ray Data build vs a plain single-process loop over the same input.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 600] [--cpus 2] [--repeats 1] [--scale 1.0] [--work DIR]

Both produce the same three datasets from the same synthetic Subject200K-format set (full 1056x528
geometry by default) with the same pure functions (pyarrow read, PIL decode, crop, encode, write,
then pairing and diptych composition), and the script checks that their dataset hashes agree, so
the comparison is work for work. Ray is started (``num_cpus``) and warmed up on a tiny input
before timing, so the figure is throughput at a size where start-up is amortised; the start-up
itself is printed separately. Goal: pipeline >= 0.8 x cores x loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.build import DataBuildConfig, build_shards
from pipelines.images import ImageCodec
from pipelines.manifest import accounting
from pipelines.pairing import random_pairs, same_category_pairs
from pipelines.panels import PanelGeometry
from pipelines.samples import diptych_sample
from pipelines.schema import KEPT, SAMPLE_SCHEMA
from pipelines.shards import summarise, write_shards
from pipelines.source import flatten, list_parquet_files, plan_fragments, resolve_input
from pipelines.subjects import process_rows
from pipelines.synthetic import SynthConfig, write_synthetic


def plain_loop(cfg: DataBuildConfig) -> dict:
    """The whole build in one process, no Ray: the baseline."""
    out = Path(cfg.output)
    fs, root = resolve_input(cfg.input)
    reports, singles = [], {}
    max_bytes = cfg.shard_max_mb << 20
    for fragment in plan_fragments(fs, list_parquet_files(fs, root, cfg.input), cfg.limit):
        table = pq.ParquetFile(fragment.path).read_row_group(fragment.row_group)
        rep, samples = process_rows(flatten(table, fragment, 0), collection=cfg.collection,
                                    min_score=cfg.min_score, geometry=cfg.geometry, codec=cfg.image)  # fmt: skip
        reports += rep
        if samples:
            write_shards(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), str(out / "single"),
                         max_rows=cfg.shard_max_rows, max_bytes=max_bytes, unit=2)  # fmt: skip
            singles.update((s["sample_id"], s) for s in samples)
    reports = pa.Table.from_pylist(reports)
    accounting(reports, reports.num_rows)
    kept = reports.filter(pc.equal(reports.column("status"), KEPT)).sort_by("row_id")
    ids = np.array(kept.column("row_id").to_pylist(), dtype=object)
    plans = {
        "diptych_random": random_pairs(len(ids), cfg.random_pairs, cfg.seed),
        "diptych_same_category": same_category_pairs(np.array(kept.column("category_key").to_pylist(), dtype=object),
                                                     ids, cfg.same_category_pairs, cfg.seed),
    }  # fmt: skip
    for dataset, plan in plans.items():
        rows = []
        for k in range(len(plan)):
            sides = []
            for subject, direction in ((plan.a[k], plan.a_dir[k]), (plan.b[k], plan.b_dir[k])):
                s = singles[f"{ids[subject]}/{direction}>{1 - direction}"]
                sides.append(dict(subject=s["subjects"][0], source=s["sources"][0], item=s["items"][0],
                                  category=s["categories"][0], condition_image=s["condition_images"][0],
                                  target_image=s["target_image"], description=s["target_prompt"]))  # fmt: skip
            rows.append(diptych_sample(f"{dataset}/{k:08d}", dataset, *sides, tuple(cfg.diptych_size), cfg.image))
        if rows:
            write_shards(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), str(out / dataset),
                         max_rows=cfg.shard_max_rows, max_bytes=max_bytes)  # fmt: skip
    return {name: summarise(str(out / name)) for name in ("single", *plans)}


class Busy:
    """Busy cores while a block runs: the whole machine's (``/proc/stat``) and this process tree's
    (``/proc/<pid>/stat``: this process, the Ray it started, Ray's workers), so a figure taken next
    to someone else's load says how much of the machine that load took (``background``)."""

    def __enter__(self):
        self.start, self.own_start, self.t = self._machine(), self._tree(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        total, idle = (b - a for a, b in zip(self.start, self._machine()))
        self.cores = (total - idle) / max(total, 1) * (os.cpu_count() or 1)
        end = self._tree()
        ticks = sum(v - self.own_start.get(pid, 0) for pid, v in end.items())
        self.own = ticks / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)
        self.background = max(0.0, self.cores - self.own)

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    @staticmethod
    def _tree() -> dict[int, int]:
        """CPU ticks (user + system, with reaped children) of this process and its descendants."""
        stats, parent = {}, {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(name)] = int(fields[1])
                stats[int(name)] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        mine, me = {}, os.getpid()
        for pid, ticks in stats.items():
            p = pid
            while p not in (0, 1) and p != me:
                p = parent.get(p, 0)
            if p == me:
                mine[pid] = ticks
        return mine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="composite geometry scale (1.0 = 1056x528)")
    parser.add_argument("--image-format", default="png", choices=["png", "jpeg"])
    parser.add_argument("--repeats", type=int, default=1, help="alternating loop / ray rounds (report each and best)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one; given: the input is kept)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="musar-bench-"))
    geometry = PanelGeometry(scale=args.scale)
    pw, ph = (geometry.left_box[2] - geometry.left_box[0]), (geometry.left_box[3] - geometry.left_box[1])
    t = time.perf_counter()
    synth = SynthConfig(output=str(work / "input"), rows=args.rows, rows_per_file=200, row_group_rows=20,
                        geometry=geometry, overwrite=True)  # fmt: skip
    made = work / "input" / "synthetic_manifest.json"
    if not (made.is_file() and json.loads(made.read_text())["config"] == json.loads(json.dumps(asdict(synth)))):
        write_synthetic(synth)
        print(f"synthetic input: {args.rows} rows in {time.perf_counter() - t:.1f}s")

    def config(name: str, **kw) -> DataBuildConfig:
        return DataBuildConfig(input=str(work / "input"), output=str(work / name), overwrite=True, quiet=True,
                               geometry=geometry, diptych_size=(2 * pw, ph), image=ImageCodec(format=args.image_format), **kw)  # fmt: skip

    with Busy() as idle:
        time.sleep(3)
    print(f"background load before timing: {idle.background:.2f} busy cores of {os.cpu_count()}")

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    build_shards(config("warmup", limit=40))
    print(f"ray.init {init_s:.1f}s, warm-up build (40 rows) {time.perf_counter() - t:.1f}s (neither counted)")

    rounds = []
    for r in range(args.repeats):  # alternate, so background load hits both sides alike
        shutil.rmtree(work / "loop", ignore_errors=True)
        t = time.perf_counter()
        with Busy() as loop_busy:
            loop = plain_loop(config("loop"))
        loop_s = time.perf_counter() - t
        t = time.perf_counter()
        with Busy() as ray_busy:
            manifest = build_shards(config("ray"))
        ray_s = time.perf_counter() - t
        same = all(loop[n]["hash"] == manifest["datasets"][n]["hash"] for n in loop)
        rounds.append((loop_s, loop_busy, ray_s, ray_busy, same, manifest["timing_s"]))
    ray.shutdown()

    print(f"input rows {args.rows} ({manifest['counts']['kept']} kept), composite {geometry.composite_size}, "
          f"{args.image_format}; outputs {manifest['rows_per_dataset']}")  # fmt: skip
    print(f"{'round':6s}{'loop s':>8s}{'rows/s':>8s}{'own':>6s}{'bg':>6s}{'ray s':>8s}{'rows/s':>8s}{'own':>6s}"
          f"{'bg':>6s}{'ratio':>7s}{'x cores':>9s}  same  ray stages (s)")  # fmt: skip
    for r, (loop_s, lb, ray_s, rb, same, stages) in enumerate(rounds):
        ratio = loop_s / ray_s
        print(f"{r:<6d}{loop_s:8.1f}{args.rows / loop_s:8.2f}{lb.own:6.2f}{lb.background:6.2f}{ray_s:8.1f}"
              f"{args.rows / ray_s:8.2f}{rb.own:6.2f}{rb.background:6.2f}{ratio:8.2f}{ratio / args.cpus:8.2f}  "
              f"{same!s:5s} {stages}")  # fmt: skip
    best = min(r[0] for r in rounds) / min(r[2] for r in rounds)
    print(f"best of {len(rounds)}: ratio {best:.2f}x = {best / args.cpus:.2f} x cores (goal >= 0.8 x cores). own / bg: "
          "busy cores of this process tree / of everything else on the machine while timing")  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[4] for r in rounds) else 1

if __name__ == "__main__":
    sys.exit(main())
