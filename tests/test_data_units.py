"""Data pipeline pieces without Ray: prompts, spans, the "another" rule, pairing, filters, panels, shards."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from musar.config import ConfigError, load_config
from pipelines.build import DataBuildConfig
from pipelines.diptychs import read_sides
from pipelines.filters import filter_reasons
from pipelines.pairing import matching_passes, random_pairs, same_category_pairs
from pipelines.panels import PanelGeometry, cut_panels
from pipelines.samples import condition_prompts, diptych_prompt
from pipelines.schema import content_hash
from pipelines.shards import split_points, summarise
from pipelines.source import Fragment, flatten, list_parquet_files, plan_fragments, resolve_input
from pipelines.synthetic import SynthConfig, write_synthetic

FIGURE_2 = (
    "Two images concatenated side by side, the left part is: Nourishing scalp oil for healthy hair. In an upscale "
    "city salon, this item stands against a backdrop of sleek black and white decor, illuminated by the modern "
    "track lighting above, the right part is: another Nourishing scalp oil for healthy hair. Placed elegantly on a "
    "stone ledge beside a bubbling stream, this item harmonizes with the dappled sunlight filtering through the "
    "overhead foliage."
)


def test_figure_2_prompt_and_spans():
    item = "Nourishing scalp oil for healthy hair"
    c0, c1 = condition_prompts(item, "Personal Care", item, "Personal Care")
    assert (c0, c1) == (item, "another " + item)
    prompt, spans = diptych_prompt(
        c0, "In an upscale city salon, this item stands against a backdrop of sleek black and white decor, "
        "illuminated by the modern track lighting above.",
        c1, "Placed elegantly on a stone ledge beside a bubbling stream, this item harmonizes with the dappled "
        "sunlight filtering through the overhead foliage.",
    )  # fmt: skip
    assert prompt == FIGURE_2
    assert [prompt[s:e] for s, e in spans] == [c0, c1]


@pytest.mark.parametrize(
    "a, b, another",
    [
        (("Brass trumpet", "Musical Instruments"), ("Brass trumpet", "Musical Instruments"), True),
        (("Brass trumpet", "Musical Instruments"), ("Acoustic ukulele", "Musical Instruments"), True),  # category
        (("Brass trumpet", "Instruments"), ("brass  Trumpet", "Toys"), True),  # item, case and spaces ignored
        (("Brass trumpet", "Musical Instruments"), ("Leather basketball", "Sports Equipment"), False),
    ],
)
def test_another_rule(a, b, another):
    c0, c1 = condition_prompts(a[0], a[1], b[0], b[1])
    assert c0 == a[0]
    assert c1 == ("another " + b[0] if another else b[0])


def test_spans_with_unicode_and_odd_text():
    prompt, spans = diptych_prompt("Café crème mug", "  Ünïcödé scene 🚀.  ", "another Café crème mug", "x")
    assert [prompt[s:e] for s, e in spans] == ["Café crème mug", "another Café crème mug"]
    assert ", the right part is: " in prompt and "🚀, the right" in prompt


def test_random_pairs_are_passes_of_perfect_matchings():
    n = 11
    plan = random_pairs(n, None, seed=3)
    assert len(plan) == n and plan.info["passes"] == 3  # 5 pairs per pass
    assert np.all(plan.a != plan.b)
    for p in range(2):  # full passes: every subject at most once
        used = np.concatenate([plan.a[5 * p : 5 * p + 5], plan.b[5 * p : 5 * p + 5]])
        assert len(set(used.tolist())) == 10
    again = random_pairs(n, None, seed=3)
    assert np.array_equal(plan.a, again.a) and np.array_equal(plan.b_dir, again.b_dir)
    assert not np.array_equal(plan.a, random_pairs(n, None, seed=4).a)
    assert len(random_pairs(n, 25, seed=0)) == 25 and len(random_pairs(1, None, seed=0)) == 0


def test_even_count_default_uses_every_subject_twice():
    plan = random_pairs(10, None, seed=0)
    counts = np.bincount(np.concatenate([plan.a, plan.b]), minlength=10)
    assert np.all(counts == 2)


def test_same_category_pairs():
    cats = np.array(["a"] * 5 + ["b"] * 2 + ["c"] + ["d"] * 3, dtype=object)
    ids = np.array([f"r{i}" for i in range(len(cats))], dtype=object)
    plan = same_category_pairs(cats, ids, None, seed=1)
    assert len(plan) == 10  # subjects in categories with >= 2 members
    assert np.all(plan.a != plan.b) and np.all(cats[plan.a] == cats[plan.b])
    assert plan.info["single_subject_categories"] == {"c": "r7"}
    assert {k: v["pairs"] for k, v in plan.info["categories"].items()} == {"a": 5, "b": 2, "d": 3}
    smaller = same_category_pairs(cats, ids, 4, seed=1)
    assert len(smaller) == 4 and np.all(cats[smaller.a] == cats[smaller.b])
    # a category's pairs depend on its own members and the seed only
    without_d = same_category_pairs(cats[:8], ids[:8], None, seed=1)
    assert np.array_equal(without_d.a[:5], plan.a[:5])


def test_matching_passes_never_repeat_within_a_pass():
    rng = np.random.default_rng(0)
    a, b, passes = matching_passes(7, 9, rng)
    assert passes == 3 and len(a) == 9
    for p in range(2):
        chunk = np.concatenate([a[3 * p : 3 * p + 3], b[3 * p : 3 * p + 3]])
        assert len(set(chunk.tolist())) == 6


def test_filters_quality_and_collection():
    raw = pa.table({
        "collection": pa.array([b"collection_2", b"collection_1", b"collection_2", b"collection_2", None]),
        "q_compositeStructure": pa.array([5, 5, 4, None, 5]),
        "q_objectConsistency": pa.array([5, 5, 5, 5, 5]),
        "q_imageQuality": pa.array([5, 1, 5, 5, 5]),
    })  # fmt: skip
    assert filter_reasons(raw, "collection_2", 5).to_pylist() == [None, "collection", "quality", "quality", "collection"]
    assert filter_reasons(raw, None, 4).to_pylist() == [None, "quality", None, "quality", None]


def _png(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_geometry_and_panel_cutting():
    g = PanelGeometry(scale=0.125)
    assert g.composite_size == (132, 66) and g.boxes == ((1, 1, 65, 65), (66, 1, 130, 65))
    panels, reason, _ = cut_panels(_png((132, 66)), g)
    assert reason is None and [p.size for p in panels] == [(64, 64), (64, 64)]
    assert cut_panels(_png((128, 64)), g)[1:] == ("wrong_image_size", "128x64, expected 132x66")
    assert cut_panels(b"not an image", g)[1] == "undecodable_image"
    assert cut_panels(_png((132, 66))[:60], g)[1] == "undecodable_image"
    with pytest.raises(ValueError, match="non-integer"):
        PanelGeometry(scale=0.1)
    with pytest.raises(ValueError, match="does not fit"):
        PanelGeometry(right=(528, 8, 1100, 520))


def test_config_errors_name_the_problem():
    base = ["input=x", "output=y"]
    for override, match in [
        ("diptych_size=[101, 64]", "diptych_size"),
        ("min_score=-1", "min_score"),
        ("limit=0", "limit"),
        ("encode=true", "encode_model"),
        ("geometry.scale=0.3", "geometry.scale"),
        ("image.format=gif", "image.format"),
        ("shard_max_rows=1", "shard_max_rows"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(DataBuildConfig, None, base + [override])
    with pytest.raises(ConfigError, match="missing required field.*input"):
        load_config(DataBuildConfig, None, ["output=y"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_config(DataBuildConfig, None, base + ["encode=true", "encode_model=tiny", "diptych_size=[120, 64]"])


def test_input_errors(tmp_path):
    fs, root = resolve_input(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_parquet_files(fs, root, "nope")
    (tmp_path / "empty").mkdir()
    fs, root = resolve_input(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no .parquet files"):
        list_parquet_files(fs, root, "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"junk")
    fs, root = resolve_input(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="not a readable parquet file"):
        plan_fragments(fs, list_parquet_files(fs, root, "bad"), None)
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "text": ["y"]}), tmp_path / "other" / "a.parquet")
    fs, root = resolve_input(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"not in Subject200K layout: no column\(s\) \['collection'"):
        plan_fragments(fs, list_parquet_files(fs, root, "other"), None)


def test_fragments_limit_and_row_ids(tmp_path):
    write_synthetic(SynthConfig(output=str(tmp_path), rows=25, rows_per_file=10, row_group_rows=4,
                                geometry=PanelGeometry(scale=0.125)))  # fmt: skip
    fs, root = resolve_input(str(tmp_path))
    files = list_parquet_files(fs, root, str(tmp_path))
    assert [name for _, name in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    fragments = plan_fragments(fs, files, limit=13)
    assert sum(f.num_rows for f in fragments) == 13
    before = fragments[-2]
    assert (before.name, before.row_group, before.first_row, before.num_rows) == ("train-00000-of-00003.parquet", 2, 8, 2)
    last = fragments[-1]
    assert (last.name, last.row_group, last.first_row, last.num_rows) == ("train-00001-of-00003.parquet", 0, 0, 3)
    table = pq.ParquetFile(last.path).read_row_group(0)
    raw = flatten(table, last, 0)
    assert raw.column("row_id").to_pylist()[:2] == ["train-00001-of-00003.parquet#0", "train-00001-of-00003.parquet#1"]


def test_flatten_tolerates_missing_columns_and_fields():
    table = pa.table({"description": pa.array([{"item": "x"}], pa.struct([("item", pa.string())]))})
    raw = flatten(table, Fragment("p", "f.parquet", 0, 7, 1), 0)
    row = raw.to_pylist()[0]
    assert row["row_id"] == "f.parquet#7" and row["item"] == b"x"
    assert row["image_bytes"] is None and row["category"] is None and row["q_imageQuality"] is None


def test_shard_split_bounds():
    sizes = np.array([10] * 10)
    assert split_points(sizes, max_rows=4, max_bytes=1000) == [(0, 4), (4, 8), (8, 10)]
    assert split_points(sizes, max_rows=100, max_bytes=25, unit=2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert split_points(np.array([50, 50]), max_rows=10, max_bytes=10, unit=2) == [(0, 2)]  # a unit never splits


def test_summarise_refuses_duplicate_ids(tmp_path):
    t = pa.table({"sample_id": ["a", "b"], "content_hash": ["1", "2"]})
    pq.write_table(t, tmp_path / "part-1.parquet")
    assert summarise(str(tmp_path))["rows"] == 2
    pq.write_table(t.slice(0, 1), tmp_path / "part-2.parquet")
    with pytest.raises(RuntimeError, match="duplicate sample ids"):
        summarise(str(tmp_path))


def test_content_hash_covers_every_field():
    base = ([b"img"], ["dog"], [[0, 3]], b"target", "a dog")
    h = content_hash(*base)
    assert h == content_hash(*base)
    for i, changed in enumerate(([b"imh"], ["cat"], [[0, 4]], b"targer", "a cat")):
        args = list(base)
        args[i] = changed
        assert content_hash(*args) != h
    assert content_hash([b"ab"], ["c"], None, b"", "") != content_hash([b"a"], ["bc"], None, b"", "")


def test_read_sides_finds_rows_in_any_row_group_layout(tmp_path):
    rows = [dict(subjects=[f"s{i}"], sources=[f"s{i}/0>1"], items=["x"], categories=["c"], condition_images=[bytes([i])],
                 target_image=bytes([100 + i]), target_prompt=f"p{i}") for i in range(10)]  # fmt: skip
    for group in (1, 3, 10):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"g{group}.parquet", row_group_size=group)
        wanted = [(f"g{group}.parquet", r) for r in (7, 2, 9, 7, 0)]
        sides = read_sides(str(tmp_path), wanted)
        assert {k[1]: (v["subject"], v["target_image"], v["description"]) for k, v in sides.items()} == {
            r: (f"s{r}", bytes([100 + r]), f"p{r}") for r in (0, 2, 7, 9)}  # fmt: skip
