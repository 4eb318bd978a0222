"""Evaluation cases: DreamBench's tuning-free single-subject set, the shipped multi-subject set, case files."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from evaluation.cases import (
    MULTI_FILE,
    MULTI_SEED,
    DreamBench,
    load_case_file,
    multi_cases,
    multi_definitions,
    multi_prompt,
    occurrence_at,
    select_cases,
    single_cases,
)  # fmt: skip
from musar_core.subjects import Subject, phrase_char_span

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"


@pytest.fixture(scope="module")
def bench() -> DreamBench:
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.fail(f"the DreamBench test copy is missing: expected {DREAMBENCH} (shared/ beside the repository)")
    return DreamBench.open(DREAMBENCH)


def spans(case):
    return [phrase_char_span(case.prompt, Subject(s.condition_image, s.phrase, occurrence=s.occurrence)) for s in case.subjects]


def test_single_cases_follow_the_tuning_free_protocol(bench):
    cases = single_cases(bench)
    assert len(cases) == 750 == len({c.id for c in cases})
    per_subject = Counter(c.subjects[0].name for c in cases)
    assert len(per_subject) == 30 and set(per_subject.values()) == {25}
    by_id = {c.id: c for c in cases}
    assert by_id["single/backpack/01"].prompt == "a backpack in the snow"  # class noun, no unique token
    assert by_id["single/dog/10"].prompt == "a dog wearing a red hat"  # live list for dogs
    assert by_id["single/backpack/10"].prompt == "a backpack with a wheat field in the background"  # object list
    assert by_id["single/bear_plushie/24"].prompt == "a cube shaped stuffed animal"
    for c in cases:
        s = c.subjects[0]
        assert "{" not in c.prompt and s.phrase == bench.protocol.classes[s.name] and s.phrase in c.prompt
        assert Path(s.condition_image).name == "00.jpg"  # the condition image is the first image
        expected = sorted((DREAMBENCH / s.name).glob("*.jpg"))  # scored against all (compared resolved: a
        assert [Path(p).resolve() for p in s.images] == [p.resolve() for p in expected]  # symlinked shared/ is fine)
        assert c.prompt[slice(*spans(c)[0])] == s.phrase


def test_multi_cases_counts_and_rule(bench):
    cases = multi_cases(bench)
    pairs = [c for c in cases if len(c.subjects) == 2]
    triplets = [c for c in cases if len(c.subjects) == 3]
    assert (len(pairs), len(triplets), len(cases)) == (60, 20, 80)
    assert len({c.id for c in cases}) == 80 and len({tuple(s.name for s in c.subjects) for c in cases}) == 80
    # balanced: every subject in exactly 4 pairs and 2 triplets
    assert set(Counter(s.name for c in pairs for s in c.subjects).values()) == {4}
    assert set(Counter(s.name for c in triplets for s in c.subjects).values()) == {2}
    classes = bench.protocol.classes
    same = lambda c: len({classes[s.name] for s in c.subjects}) < len(c.subjects)
    assert sum(map(same, pairs)) >= 10 and sum(map(same, triplets)) >= 5
    for c in cases:
        assert len({s.name for s in c.subjects}) == len(c.subjects)
        for s in c.subjects:  # the prompt names every subject by its class
            assert s.phrase == classes[s.name] and s.phrase in c.prompt
        found = spans(c)  # occurrences pick distinct, non-overlapping words
        assert len(set(found)) == len(found) and all(c.prompt[a:b] == s.phrase for (a, b), s in zip(found, c.subjects))
        nouns = Counter(classes[s.name] for s in c.subjects)
        for noun, n in nouns.items():  # the "another" rule
            if n >= 2:
                assert f"another {noun}" in c.prompt
                assert sorted(s.occurrence for s in c.subjects if classes[s.name] == noun) == list(range(n))
    entries = json.loads(MULTI_FILE.read_text())["cases"]
    for entry, c in zip(entries, cases):  # the background is a scene of every subject's own prompt list
        assert all(f"a {{}} {entry['background']}" in bench.protocol.prompts_for(s.name) for s in c.subjects)
        assert c.prompt.endswith(entry["background"].replace("around it", "around them"))
    pair = next(c for c in pairs if {s.name for s in c.subjects} == {"dog3", "dog5"})
    assert pair.prompt.startswith("a dog and another dog ")
    assert [(s.name, s.occurrence) for s in pair.subjects] == [("dog3", 0), ("dog5", 1)]


def test_multi_rule_is_deterministic_and_the_shipped_file_is_up_to_date(bench):
    first, again = multi_definitions(bench.protocol), multi_definitions(bench.protocol)
    assert first == again
    assert multi_definitions(bench.protocol, seed=MULTI_SEED + 1)["cases"] != first["cases"]
    shipped = json.loads(MULTI_FILE.read_text())
    assert shipped == first, f"{MULTI_FILE} is stale: regenerate it with `python -m evaluation.cases {DREAMBENCH}`"
    assert shipped["counts"] == {"pairs": 60, "triplets": 20}


def test_occurrence_counts_matches_as_phrase_char_span_does():
    prompt = "a dog and another dog on a dog bed"
    assert [occurrence_at(prompt, "dog", i) for i in (2, 18, 27)] == [0, 1, 2]
    with pytest.raises(ValueError):
        occurrence_at(prompt, "dog", 3)


def test_external_case_file(bench, tmp_path):
    mine = tmp_path / "my_can"
    mine.mkdir()
    for name in ("b.jpg", "a.jpg"):
        shutil.copy(DREAMBENCH / "can" / "01.jpg", mine / name)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([
        {"id": "twodogs", "prompt": "a dog and another dog at a cafe",
         "subjects": [{"name": "dog2", "phrase": "dog", "occurrence": 1}, {"name": "dog", "phrase": "dog", "occurrence": 0}]},
        {"prompt": "a can next to a cat", "subjects": [{"dir": "my_can", "phrase": "can"}, {"name": "cat", "phrase": "cat"}]},
    ]))  # fmt: skip
    cases = load_case_file(path, bench, "external/cases")
    assert [c.id for c in cases] == ["external/cases/twodogs", "external/cases/001"]
    assert [s.occurrence for s in cases[0].subjects] == [1, 0]
    can = cases[1].subjects[0]
    assert can.name == "my_can" and Path(can.condition_image).name == "a.jpg" and len(can.images) == 2
    assert can.key == f"dir:{mine}"


@pytest.mark.parametrize("entry, message", [
    ({"prompt": "a dog", "subjects": [{"name": "dog", "phrase": "cat"}]}, "does not occur"),
    ({"prompt": "a dog and another dog", "subjects": [{"name": "dog", "phrase": "dog"}]}, "occurs 2 times"),
    ({"prompt": "a dog and another dog", "subjects": [{"name": "dog", "phrase": "dog", "occurrence": 0},
                                                      {"name": "dog2", "phrase": "dog", "occurrence": 0}]}, "same words"),
    ({"prompt": "a dog", "subjects": [{"name": "dog", "phrase": "dog", "ocurrence": 0}]}, "expected keys"),
    ({"prompt": "a dog", "subjects": [{"name": "nosuch", "phrase": "dog"}]}, "unknown DreamBench subject"),
])  # fmt: skip
def test_bad_case_files_are_refused_with_the_case_named(bench, tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        load_case_file(path, bench, "external/bad")
    assert "bad.json" in str(err.value)


def test_select_cases(bench):
    cases = single_cases(bench)
    picked = select_cases(cases, limit=10)
    assert len(picked) == 10 and len({c.subjects[0].name for c in picked}) == 10  # evenly spaced over subjects
    assert [c.id for c in select_cases(cases, ["single/dog?/00"])] == [f"single/dog{i}/00" for i in (2, 3, 5, 6, 7, 8)]
    assert {c.subjects[0].name for c in select_cases(cases, subjects=["cat", "can"])} == {"cat", "can"}
    assert select_cases(cases, ["single/cat/*"], limit=3) == [cases[150], cases[158], cases[166]]


def test_multi_prompt_groups_classes_and_counts_occurrences(bench):
    classes = bench.protocol.classes
    prompt, subjects = multi_prompt(["cat", "dog", "dog2", "dog3"], classes, "on top of green grass with sunflowers around it")
    assert prompt == "a cat, a dog, another dog and a third dog on top of green grass with sunflowers around them"
    assert [(s["name"], s["phrase"], s["occurrence"]) for s in subjects] == [
        ("cat", "cat", 0), ("dog", "dog", 0), ("dog2", "dog", 1), ("dog3", "dog", 2)]
    prompt, subjects = multi_prompt(["dog", "teapot", "dog2"], classes, "in the snow")
    assert prompt == "a dog, another dog and a teapot in the snow"
    assert [s["name"] for s in subjects] == ["dog", "dog2", "teapot"]
