"""The toy study's world, detector, measure and Subject200K writer (issue 9)."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from pipelines.panels import PanelGeometry, cut_panels
from pipelines.samples import condition_prompts, diptych_prompt
from pipelines.synthetic import SCHEMA
from toystudy.detector import Detection, detect
from toystudy.measure import aggregate, chance_entanglement, drawn_routing, entanglement_kind, judge, match, measure
from toystudy.subject200k import MANIFEST, ToyDataConfig, row_subjects, write_toy_subject200k
from toystudy.world import (
    ALL_SUBJECTS,
    BACKGROUNDS,
    CATEGORIES,
    MAX_SIZE,
    SHAPES,
    VOCABULARY,
    Placement,
    Scene,
    Subject,
    describe_panel,
    object_box,
    render_scene,
    sample_placements,
    sample_scene,
    scene_prompt,
    tokenize,
)

SMALL = PanelGeometry(scale=0.125)  # 132x66 composites, 64x64 panels


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scenes(seed: int, count: int, size: int | tuple[int, int] = 64):
    """(scene, image) pairs of 1, 2 and 3 objects in turn; a (w, h) size spreads them over that frame."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        scene = sample_scene(rng, 1 + k % 3)
        if not isinstance(size, int):
            scene = Scene(scene.subjects, sample_placements(scene.subjects, rng, aspect=size[0] / size[1]),
                          scene.background)  # fmt: skip
        yield scene, scene.render(size, rng)


def read_back(count: int, seed: int, size: int | tuple[int, int] = 64, spoil=None) -> tuple[float, int]:
    """Share of rendered objects whose shape, colour and pattern are all read back; detection count misses."""
    right = total = wrong_count = 0
    rng = np.random.default_rng([seed, 99])
    for scene, image in scenes(seed, count, size):
        if spoil is not None:
            image = spoil(image, rng)
        found = detect(image)
        wrong_count += len(found) != len(scene.subjects)
        for subject, placement in zip(scene.subjects, scene.placements):
            x0, y0, x1, y1 = object_box(subject, placement, size)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            hits = [d for d in found if d.bbox[0] <= cx <= d.bbox[2] and d.bbox[1] <= cy <= d.bbox[3]]
            right += len(hits) == 1 and hits[0].subject == subject
            total += 1
    return right / total, wrong_count


def blur_and_noise(image: Image.Image, rng) -> Image.Image:
    """Roughly what a small generator's output looks like: soft edges and pixel noise."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ world


def test_world_subjects_and_their_text():
    assert len(ALL_SUBJECTS) == 144 == len(set(ALL_SUBJECTS))
    s = Subject("triangle", "red", "striped")
    assert (s.phrase, s.item, s.category) == ("a red striped triangle", "Red striped triangle", "Polygons")
    assert Subject("ring", "orange", "solid").phrase == "an orange solid ring"
    assert all(Subject.from_text(t.item) == t == Subject.from_text(t.phrase) for t in ALL_SUBJECTS)
    assert {t.category for t in ALL_SUBJECTS} == set(CATEGORIES)
    with pytest.raises(ValueError):
        Subject("blob", "red", "solid")
    prompt = scene_prompt([s, Subject("circle", "blue", "dotted")], [Placement(0.2, 0.5, 0.3), Placement(0.8, 0.5, 0.3)],
                          "pale grey")  # fmt: skip
    assert (
        prompt == "a red striped triangle on the left and a blue dotted circle on the right, on a pale grey background"
    )


def test_same_seed_same_bytes_other_seed_differs():
    def images(seed):
        return [png(image) for _, image in scenes(seed, 12)]

    assert images(3) == images(3)
    assert images(3) != images(4)
    # textured backgrounds draw from the rng too; plain ones are exact
    for name in BACKGROUNDS:
        a, b = (png(render_scene([], [], name, 64, np.random.default_rng(s))) for s in (0, 0))
        assert a == b


def test_scenes_fit_and_render_at_every_size():
    for scene, _ in scenes(5, 150):
        n = len(scene.subjects)
        assert len({p.location for p in scene.placements}) == n  # each object has its own location phrase
        boxes = [object_box(s, p, 64) for s, p in zip(scene.subjects, scene.placements)]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            for a0, b0, a1, b1 in boxes[:i]:  # at least 2 px apart
                assert x1 + 2 <= a0 or a1 + 2 <= x0 or y1 + 2 <= b0 or b1 + 2 <= y0
        assert all(p.size <= MAX_SIZE[n] + 1e-9 for p in scene.placements)
    scene = sample_scene(np.random.default_rng(0), 2)
    for size in (32, 64, 128, (96, 64)):
        image = scene.render(size, np.random.default_rng(0))
        assert image.mode == "RGB" and image.size == ((size, size) if isinstance(size, int) else size)


def test_vocabulary_covers_every_text():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    vocab = set(VOCABULARY)
    texts = [t for s in ALL_SUBJECTS for t in (s.item, s.phrase, s.category)]
    rng = np.random.default_rng(0)
    for k in range(600):
        scene = sample_scene(rng, 1 + k % 3)
        texts.append(scene.prompt)
        texts += [describe_panel(p, scene.background, rng) for p in scene.placements]
    a, b = ALL_SUBJECTS[0], ALL_SUBJECTS[1]  # same category: the diptych's "another" rule applies
    c0, c1 = condition_prompts(a.item, a.category, b.item, b.category)
    texts.append(diptych_prompt(c0, texts[-1], c1, texts[-2])[0])
    missing = {t for text in texts for t in tokenize(text)} - vocab
    assert not missing
    assert tokenize("On a pale grey background, this item sits.") == [
        "on", "a", "pale", "grey", "background", ",", "this", "item", "sits", "."]  # fmt: skip


# --------------------------------------------------------------------------------------------- detector


def test_detector_reads_rendered_ground_truth():
    """300 scenes (100 each of 1, 2, 3 objects; 600 objects) at 64 px: >= 98% required, 100% measured."""
    accuracy, wrong_counts = read_back(300, seed=11)
    assert accuracy >= 0.98, accuracy
    assert wrong_counts == 0


def test_detector_survives_blur_and_noise():
    """Gaussian blur (sigma 0.8 px) + pixel noise (sigma 8) at 64 px, 150 scenes: >= 95% (100% measured).
    32 px panels (objects of 8-16 px), 90 scenes: >= 90% (99.9% measured on 500)."""
    accuracy, _ = read_back(150, seed=12, spoil=blur_and_noise)
    assert accuracy >= 0.95, accuracy
    accuracy, _ = read_back(90, seed=13, size=32)
    assert accuracy >= 0.90, accuracy


def test_detector_reads_wide_frames():
    """2:1 frames (128x64, a diptych target's shape), 60 scenes: >= 98% (100% measured on 300)."""
    accuracy, wrong_counts = read_back(60, seed=14, size=(128, 64))
    assert accuracy >= 0.98 and wrong_counts == 0, accuracy


def test_detector_ignores_backgrounds_and_always_answers():
    rng = np.random.default_rng(0)
    for name in BACKGROUNDS:
        assert detect(render_scene([], [], name, 64, rng)) == []
    tiny = np.full((64, 64, 3), 214, np.uint8)
    tiny[30:33, 30:33] = (200, 0, 0)  # 9 px: below the minimum blob
    assert detect(tiny) == []
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert all(isinstance(d, Detection) for d in detect(noise))  # garbage in, best guesses out, no crash


# ---------------------------------------------------------------------------------------------- measure

TRIANGLE = Subject("triangle", "red", "striped")
CIRCLE = Subject("circle", "blue", "dotted")
LEFT, RIGHT = Placement(0.25, 0.5, 0.36), Placement(0.75, 0.5, 0.36)


def picture(*subjects: Subject) -> Image.Image:
    places = [LEFT, RIGHT][: len(subjects)]
    return render_scene(subjects, places, "pale grey", 64, np.random.default_rng(0))


def test_measure_correct_and_swapped_images():
    right = measure(picture(TRIANGLE, CIRCLE), [TRIANGLE, CIRCLE])
    assert [(o.present, o.entangled) for o in right] == [(True, False), (True, False)]
    # colours swapped: each shape carries the other subject's colour
    swapped = measure(
        picture(Subject("triangle", "blue", "striped"), Subject("circle", "red", "dotted")), [TRIANGLE, CIRCLE]
    )
    assert [(o.present, o.entangled) for o in swapped] == [(False, True), (False, True)]
    # the circle took the triangle's pattern; the triangle is fine
    leaked = measure(picture(TRIANGLE, Subject("circle", "blue", "striped")), [TRIANGLE, CIRCLE])
    assert [(o.present, o.entangled) for o in leaked] == [(True, False), (False, True)]
    # one subject missing, and a wrong colour that no other subject has: neither present nor entangled
    missing = measure(picture(Subject("circle", "green", "dotted")), [TRIANGLE, CIRCLE])
    assert [(o.present, o.entangled) for o in missing] == [(False, False), (False, False)]
    table = aggregate([right, swapped, leaked, missing, measure(picture(TRIANGLE), [TRIANGLE])])
    assert table[1] == {"fidelity": 1.0, "entanglement": 0.0, "entanglement_chance": 0.0, "all_present": 1.0,
                        "cases": 1, "subjects": 1}  # fmt: skip
    assert table[2]["fidelity"] == 3 / 8 and table[2]["entanglement"] == 3 / 8 and table[2]["all_present"] == 1 / 4
    assert table[2]["entanglement_chance"] is None  # one subject set: no unrelated partners to judge against
    assert table[2]["fidelity_by_position"] == [2 / 4, 1 / 4]  # right twice, leaked once; the circle right once
    assert table[2]["cases"] == 4 and table[2]["subjects"] == 8


def test_placed_needs_the_subject_at_the_prompts_location():
    image = picture(TRIANGLE, CIRCLE)  # triangle on the left, circle on the right
    at_place = measure(image, [TRIANGLE, CIRCLE], [LEFT, RIGHT])
    assert [(o.present, o.placed) for o in at_place] == [(True, True), (True, True)]
    swapped = measure(image, [TRIANGLE, CIRCLE], [RIGHT, LEFT])  # present, but not where the prompt asked
    assert [(o.present, o.placed) for o in swapped] == [(True, False), (True, False)]
    absent = measure(picture(CIRCLE), [TRIANGLE], [LEFT])
    assert [(o.present, o.placed) for o in absent] == [(False, False)]
    assert aggregate([at_place, swapped])[2]["placed"] == 0.5
    assert "placed" not in aggregate([measure(image, [TRIANGLE, CIRCLE])])[2]  # no placements, no column
    with pytest.raises(ValueError, match="placements"):
        measure(image, [TRIANGLE, CIRCLE], [LEFT])


def test_measure_fidelity_is_one_on_rendered_cases():
    cases = [measure(image, scene.subjects) for scene, image in scenes(21, 60)]
    table = aggregate(cases)
    assert sorted(table) == [1, 2, 3]
    assert all(row["fidelity"] == 1.0 and row["entanglement"] == 0.0 for row in table.values()), table


def det(shape, colour, pattern, area=100) -> Detection:
    return Detection(shape, colour, pattern, (0, 0, 10, 10), area, 0.9)


def test_chance_entanglement_judges_each_subject_against_other_cases_partners():
    t, c = Subject("triangle", "red", "striped"), Subject("circle", "blue", "dotted")
    q, h = Subject("square", "green", "solid"), Subject("heart", "red", "checkered")
    first = judge([t, c], [det("triangle", "blue", "striped"), det("circle", "blue", "dotted")])
    second = judge([q, h], [det("square", "red", "solid"), det("heart", "red", "checkered")])
    assert [o.entangled for o in first + second] == [True, False, True, False]
    # Against the other case's first subject instead: the triangle's blue is not the square's green, the
    # circle is right; the square's red is the triangle's (and not its own green); the heart is right.
    assert chance_entanglement([first, second]) == 1 / 4
    again = judge([t, c], [det("triangle", "red", "striped"), det("circle", "blue", "dotted")])  # another seed
    # The same subject set under another seed is no decoy: each {t, c} case is judged against the {q, h}
    # case only, and the square against both {t, c} cases (both times entangled with the triangle's red).
    assert chance_entanglement([first, again, second]) == (0 + 0 + 0 + 0 + 2 * 1 + 0) / (4 + 2 * 2)
    table = aggregate([first, second])
    assert table[2]["entanglement"] == 1 / 2 and table[2]["entanglement_chance"] == 1 / 4


def test_entanglement_splits_into_leaks_and_misbound_subjects():
    t, c = Subject("triangle", "red", "striped"), Subject("circle", "blue", "dotted")
    q = Subject("square", "green", "solid")
    # Both drawn, the triangle in the circle's blue: a leak (two subjects, features mixed).
    leak = judge([t, c], [det("triangle", "blue", "striped"), det("circle", "blue", "dotted")])
    # The circle's whole look on a triangle, no circle anywhere: misbound (perhaps the circle, wrong shape).
    misbound = judge([t, c], [det("triangle", "blue", "dotted")])
    # The square is drawn, but the source of the triangle's blue (the circle) is not: still misbound.
    three = judge([t, c, q], [det("triangle", "blue", "striped"), det("square", "green", "solid")])
    assert [entanglement_kind(leak, k) for k in (0, 1)] == ["leak", None]
    assert [entanglement_kind(misbound, k) for k in (0, 1)] == ["misbound", None]
    assert [entanglement_kind(three, k) for k in (0, 1, 2)] == ["misbound", None, None]
    # Two sources (the circle's blue, the square's solid), one of them drawn: a leak.
    two = judge([t, c, q], [det("triangle", "blue", "solid"), det("square", "green", "solid")])
    assert entanglement_kind(two, 0) == "leak"
    table = aggregate([leak, misbound, judge([t, c], [det("triangle", "red", "striped"), det("circle", "blue", "dotted")])])
    assert table[2]["entanglement_leak"] == 1 / 6 and table[2]["entanglement_misbound"] == 1 / 6
    assert table[2]["entanglement_leak"] + table[2]["entanglement_misbound"] == pytest.approx(table[2]["entanglement"])
    assert table[2]["shapes_drawn"] == 2 / 3  # the misbound case lacks its circle
    assert aggregate([three])[3]["shapes_drawn"] == 0.0 and "shapes_drawn" not in aggregate([[leak[0]]])[1]


def test_drawn_routing_reads_routes_inside_the_matched_objects():
    t, c = Subject("triangle", "red", "striped"), Subject("circle", "blue", "dotted")
    top_left = Detection("triangle", "blue", "dotted", (0, 0, 32, 32), 400, 0.9)  # 2 x 2 tokens of a 4 x 4 grid
    right = Detection("circle", "blue", "dotted", (32, 0, 64, 64), 800, 0.9)  # 2 x 4 tokens
    cols = np.tile(np.arange(4), 4)
    to_circle = np.ones(16, int)
    # Misbound: the circle's look on a triangle, no circle drawn; every token routed to the circle's reference.
    misbound = judge([t, c], [top_left])
    assert drawn_routing([to_circle, to_circle], misbound, (4, 4), (64, 64)) == {"drawn": (0, 8), "misbound": (8, 8)}
    # Both drawn (a leak, not misbound), routed by column: the triangle's tokens to it, the circle's to it.
    leak = judge([t, c], [top_left, right])
    assert drawn_routing([(cols >= 2).astype(int)], leak, (4, 4), (64, 64)) == {"drawn": (12, 12), "misbound": (0, 0)}
    assert drawn_routing([to_circle], judge([t, c], []), (4, 4), (64, 64)) == {"drawn": (0, 0), "misbound": (0, 0)}
    # A wide frame (w 64, h 32) on a 2 x 4 grid: x scales with the width, y with the height.
    corner = Detection("triangle", "blue", "dotted", (48, 0, 64, 32), 200, 0.9)  # the last column, both rows
    assert drawn_routing([np.ones(8, int)], judge([t, c], [corner]), (2, 4), (64, 32)) == {"drawn": (0, 2), "misbound": (2, 2)}
    # Overlapping boxes: tokens inside both belong to neither.
    overlap = judge([t, c], [top_left, Detection("circle", "blue", "dotted", (16, 0, 64, 32), 600, 0.9)])
    assert drawn_routing([to_circle], overlap, (4, 4), (64, 64)) == {"drawn": (4, 6), "misbound": (0, 0)}


def test_matching_is_one_to_one_within_shape():
    a, b = Subject("square", "red", "striped"), Subject("square", "blue", "dotted")
    # the exact match wins although a larger same-shape object comes first
    found = [det("square", "blue", "striped", 200), det("square", "red", "striped"), det("circle", "red", "striped")]
    assert match([a], found) == [found[1]]
    # one-to-one: two subjects cannot share one detection; the other square goes to b (pattern leaked)
    outcomes = judge([a, b], found)
    assert [o.detection for o in outcomes] == [found[1], found[0]]
    assert [(o.present, o.entangled) for o in outcomes] == [(True, False), (False, True)]
    # another shape never matches, however many attributes agree
    assert match([Subject("heart", "red", "striped")], found) == [None]
    with pytest.raises(ValueError):
        judge([a, a], found)


# ------------------------------------------------------------------------------------------ subject200k


def read_rows(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


def test_subject200k_writer(tmp_path):
    held = ("Red striped triangle", "Blue dotted circle")
    cfg = ToyDataConfig(output=str(tmp_path / "a"), rows=30, rows_per_file=12, row_group_rows=5, seed=3, hold_out=held,
                        item_words="full")  # fmt: skip
    out = write_toy_subject200k(cfg)
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    table = read_rows(out)
    assert table.schema == SCHEMA and table.num_rows == 30
    items = set()
    for row in table.to_pylist():
        d = row["description"]
        subject = Subject.from_text(d["item"])
        items.add(d["item"])
        assert d["category"] == subject.category and d["description_valid"]
        assert row["collection"] == "collection_2" and set(row["quality_assessment"].values()) == {5}
        assert d["description_0"] != d["description_1"] and "this item" in d["description_0"]
        panels, reason, _ = cut_panels(row["image"]["bytes"], SMALL)
        assert reason is None and [p.size for p in panels] == [(64, 64), (64, 64)]
        for panel in panels:  # exactly one object per panel, and it is the row's subject
            assert [found.subject for found in detect(panel)] == [subject]
    assert len(items) == 30 and not items & set(held)  # 238 subjects to draw from: no repeats in 30 rows
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == 30 and manifest["panel_size"] == [64, 64] and manifest["held_out"] == sorted(held)
    again = write_toy_subject200k(ToyDataConfig(**{**cfg.__dict__, "output": str(tmp_path / "b")}))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(again.glob("*.parquet"))]
    with pytest.raises(FileExistsError):
        write_toy_subject200k(cfg)
    shape_only = write_toy_subject200k(ToyDataConfig(output=str(tmp_path / "e"), rows=4, seed=3))  # the default
    assert {r["description"]["item"] for r in read_rows(shape_only).to_pylist()} <= {s.capitalize() for s in SHAPES}
    subset = ToyDataConfig(output=str(tmp_path / "c"), rows=10, subjects=("Green solid heart", "Yellow checkered ring"))
    assert {s.item for s in row_subjects(subset)} == {"Green solid heart", "Yellow checkered ring"}
    with pytest.raises(ValueError):
        ToyDataConfig(output=str(tmp_path / "d"), subjects=("Green solid heart",), hold_out=("Green solid heart",))


def test_subject200k_builds_into_shards(tmp_path, ray_local):
    from pipelines.build import DataBuildConfig, build_shards

    rows = 24
    data = write_toy_subject200k(ToyDataConfig(output=str(tmp_path / "toy"), rows=rows, rows_per_file=10, seed=1,
                                               item_words="full"))  # fmt: skip
    manifest = build_shards(DataBuildConfig(input=str(data), output=str(tmp_path / "shards"), geometry=SMALL,
                                            diptych_size=(128, 64), quiet=True))  # fmt: skip
    counts = manifest["counts"]
    assert counts["input_rows"] == rows == counts["kept"] and counts["filtered"] == counts["quarantined"] == 0
    assert manifest["rows_per_dataset"]["single"] == 2 * rows
    assert manifest["datasets"]["diptych_random"]["rows"] == rows
    assert manifest["datasets"]["diptych_same_category"]["rows"] > 0  # 3 categories: pairs exist
    single = pq.read_table(tmp_path / "shards" / "single").to_pylist()
    for sample in single[:6]:  # the shards still carry the identity the detector reads
        subject = Subject.from_text(sample["items"][0])
        for data_bytes in (sample["condition_images"][0], sample["target_image"]):
            assert [d.subject for d in detect(Image.open(io.BytesIO(data_bytes)))] == [subject]


def test_routing_hits_count_tokens_inside_one_subject_box():
    import torch

    from toystudy.measure import routing_hits
    from toystudy.world import Placement

    left, right = Placement(0.25, 0.5, 0.5), Placement(0.75, 0.5, 0.5)  # 4 x 4 tokens each on an 8 x 8 grid
    cols = torch.arange(8).repeat(8)
    perfect = (cols >= 4).long()
    assert routing_hits([perfect, perfect], [left, right], (8, 8)) == (64, 64)
    assert routing_hits([1 - perfect], [left, right], (8, 8)) == (0, 32)
    overlapping = [Placement(0.5, 0.5, 0.5), Placement(0.5, 0.5, 0.25)]  # the small box lies inside the big one
    assert routing_hits([torch.zeros(64, dtype=torch.long)], overlapping, (8, 8)) == (12, 12)
