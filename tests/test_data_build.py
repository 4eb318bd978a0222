"""The Ray Data build end to end on a small synthetic set with planted corrupt rows."""

import io
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.exceptions import RayError

from pipelines.build import DataBuildConfig, build_shards
from pipelines.encode import EncoderConfig
from pipelines.panels import PanelGeometry
from pipelines.samples import LEFT_INTRO, RIGHT_INTRO, shares_kind
from pipelines.schema import DATASETS, row_content_hash
from pipelines.shards import summarise
from pipelines.synthetic import SynthConfig, write_synthetic

SMALL = PanelGeometry(scale=0.125)  # 132x66 composites, 64x64 panels
PLANTED = dict(corrupt_bytes=2, truncated=1, wrong_size=2, missing_description=4, non_utf8=2, null_quality=2,
               partial_quality=1)  # fmt: skip


def config(input_dir, output, **kw) -> DataBuildConfig:
    return DataBuildConfig(input=str(input_dir), output=str(output), geometry=SMALL, diptych_size=(128, 64),
                           quiet=True, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    write_synthetic(SynthConfig(output=str(out), rows=120, rows_per_file=50, row_group_rows=10, geometry=SMALL,
                                rare_categories=2, **PLANTED))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def built(planted, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("built") / "shards"
    return out, build_shards(config(planted, out, seed=7))


def read(out, dataset, columns=None) -> pa.Table:
    return pq.read_table(out / dataset, columns=columns)


def test_accounting_is_exact(planted, built):
    out, manifest = built
    synth = json.loads((planted / "synthetic_manifest.json").read_text())
    expected = synth["expected"]
    counts = manifest["counts"]
    assert counts["input_rows"] == 120 == counts["kept"] + counts["filtered"] + counts["quarantined"]
    assert counts["kept"] == expected["kept"]
    assert counts["filtered_by"] == {"collection": expected["filtered:collection"], "quality": expected["filtered:quality"]}
    assert counts["quarantined_by"] == {
        "missing_description": 4, "non_utf8_text": 2, "missing_image": 0, "undecodable_image": 3, "wrong_image_size": 2,
    }  # fmt: skip
    quarantine = read(out, "quarantine").to_pylist()
    planted_rows = {k: v.split(":")[1] for k, v in synth["outcome"].items() if v.startswith("quarantined")}
    assert {r["row_id"]: r["reason"] for r in quarantine} == planted_rows
    assert all(r["detail"] for r in quarantine)
    assert manifest["rows_per_dataset"]["single"] == 2 * counts["kept"]
    assert manifest["seed"] == 7 and manifest["code_version"]["musar_core"]


def test_rows_hashes_and_images(built):
    out, manifest = built
    for name in DATASETS:
        table = read(out, name)
        rows = table.to_pylist()
        assert len(rows) == manifest["datasets"][name]["rows"] > 0
        assert all(row_content_hash(r) == r["content_hash"] for r in rows)
        assert summarise(str(out / name))["hash"] == manifest["datasets"][name]["hash"]
        for r in rows[:5]:
            target = Image.open(io.BytesIO(r["target_image"]))
            assert target.size == (r["target_width"], r["target_height"])
            assert all(Image.open(io.BytesIO(c)).size == (64, 64) for c in r["condition_images"])
    singles = read(out, "single").to_pylist()
    by_id = {r["sample_id"]: r for r in singles}
    one = by_id[singles[0]["subjects"][0] + "/1>0"]
    other = by_id[singles[0]["subjects"][0] + "/0>1"]
    assert one["condition_images"] == [other["target_image"]] and other["condition_images"] == [one["target_image"]]
    assert one["condition_prompts"] == [one["items"][0]] and one["target_prompt"] != other["target_prompt"]


def test_diptych_prompts_spans_and_another_rule(built):
    out, _ = built
    singles = {r["sample_id"]: r for r in read(out, "single").to_pylist()}
    for name in ("diptych_random", "diptych_same_category"):
        for r in read(out, name).to_pylist():
            prompt, (c0, c1) = r["target_prompt"], r["condition_prompts"]
            assert [prompt[s:e] for s, e in r["condition_spans"]] == [c0, c1]
            assert r["subjects"][0] != r["subjects"][1]
            a, b = (singles[s] for s in r["sources"])
            share = shares_kind(a["items"][0], a["categories"][0], b["items"][0], b["categories"][0])
            assert c0 == a["items"][0] and c1 == ("another " if share else "") + b["items"][0]
            desc_a = a["target_prompt"].rstrip(".")
            assert prompt == f"{LEFT_INTRO}{c0}. {desc_a}{RIGHT_INTRO}{c1}. {b['target_prompt']}"
            assert r["condition_images"] == [a["condition_images"][0], b["condition_images"][0]]
            if name == "diptych_same_category":
                assert a["categories"][0].casefold() == b["categories"][0].casefold() and c1.startswith("another ")


def test_single_subject_categories_are_reported(built):
    _, manifest = built
    info = manifest["datasets"]["diptych_same_category"]["pairing"]
    assert set(info["single_subject_categories"]) == {"meteorites", "ship models"}
    assert manifest["datasets"]["diptych_same_category"]["rows"] == info["pairable_subjects"] == manifest["counts"]["kept"] - 2
    assert manifest["datasets"]["diptych_random"]["rows"] == manifest["counts"]["kept"]


def test_deterministic_across_parallelism(planted, built, tmp_path):
    out, manifest = built
    other = build_shards(config(planted, tmp_path / "again", seed=7, num_blocks=3, shard_max_rows=6))
    layouts = {n: (manifest["datasets"][n]["shards"], other["datasets"][n]["shards"]) for n in DATASETS}
    assert any(a != b for a, b in layouts.values()), f"same shard layout {layouts}: the test proves nothing"
    for name in DATASETS:
        mine = read(out, name, ["sample_id", "content_hash"]).sort_by("sample_id").to_pylist()
        theirs = read(tmp_path / "again", name, ["sample_id", "content_hash"]).sort_by("sample_id").to_pylist()
        assert mine == theirs, f"{name}: first differences {[(a, b) for a, b in zip(mine, theirs) if a != b][:3]}"
        assert other["datasets"][name]["hash"] == manifest["datasets"][name]["hash"], name


def test_seed_moves_pairs_only(planted, built, tmp_path):
    _, manifest = built
    other = build_shards(config(planted, tmp_path / "seed8", seed=8, limit=60))
    assert other["counts"]["input_rows"] == 60
    assert other["datasets"]["diptych_random"]["hash"] != manifest["datasets"]["diptych_random"]["hash"]
    # read through a pyarrow filesystem URI: same row ids, so the same single samples
    full = build_shards(config(f"file://{planted}", tmp_path / "seed8full", seed=8, same_category_pairs=5,
                               random_pairs=3))  # fmt: skip
    assert full["datasets"]["single"]["hash"] == manifest["datasets"]["single"]["hash"]
    assert full["rows_per_dataset"] == {"single": 2 * full["counts"]["kept"], "diptych_random": 3, "diptych_same_category": 5}


def test_rerun_refuses_then_replaces_whole(planted, built, tmp_path):
    out, manifest = built
    with pytest.raises(FileExistsError, match="already holds a build.*--overwrite"):
        build_shards(config(planted, out, seed=7))
    target = tmp_path / "replaced"
    build_shards(config(planted, target, seed=1, limit=30))
    (target / "single" / "part-stale.parquet").write_bytes(b"left over from the old build")
    again = build_shards(config(planted, target, seed=7, overwrite=True))
    assert not (target / "single" / "part-stale.parquet").exists()
    assert json.loads((target / "manifest.json").read_text())["seed"] == 7
    assert {n: again["datasets"][n]["hash"] for n in DATASETS} == {n: manifest["datasets"][n]["hash"] for n in DATASETS}
    assert sorted(os.listdir(tmp_path)) == ["replaced"]  # no staging or old folders left behind


def test_failed_build_leaves_output_alone(planted, tmp_path):
    target = tmp_path / "kept"
    target.mkdir()
    (target / "marker").write_text("previous build")
    with pytest.raises(FileExistsError):
        build_shards(config(planted, target))
    broken = tmp_path / "broken-model"
    for sub in ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
        (broken / sub).mkdir(parents=True)
    with pytest.raises(RayError):  # the encoder actors fail to start, after stages 1 and 2 wrote shards
        build_shards(config(planted, target, overwrite=True, limit=20, encode=True, encode_model=str(broken),
                            encoder=EncoderConfig(condition_size=64)))  # fmt: skip
    assert os.listdir(target) == ["marker"] and (target / "marker").read_text() == "previous build"
    assert sorted(os.listdir(tmp_path)) == ["broken-model", "kept"]


def test_single_rows_have_no_spans(built):
    out, _ = built
    table = read(out, "single", ["sample_id", "target_width", "condition_spans"])
    assert pc.all(pc.equal(table.column("target_width"), 64)).as_py()
    assert table.column("condition_spans").null_count == table.num_rows
