"""Evaluation cases: what is generated (prompt + subjects) and what it is scored against.

DreamBench's tuning-free protocol (DESIGN.md section 4): prompts use the class noun, no unique token
("a backpack in the snow"); each subject's condition image is its first image (``00.jpg``) and the
generations are scored against all of its real images. Three sources of cases, one shape:

- ``single``: 30 subjects x 25 prompts = 750; the object or live-subject list of
  ``prompts_and_classes.txt`` by subject (live = the cat and dog subjects).
- ``multi``: 60 pairs + 20 triplets = 80, read from the shipped ``data/dreambench_multi.json`` so every
  run evaluates the same set. That file is produced by :func:`multi_definitions` (rule below) and a
  test checks that it is up to date; regenerate it with ``python -m evaluation.cases DREAMBENCH_DIR``.
- external case files: a JSON list (or ``{"cases": [...]}``) of
  ``{"id"?, "prompt", "subjects": [{"name" | "dir", "phrase", "occurrence"?}]}``; ``name`` is a
  DreamBench subject, ``dir`` a folder of images (relative to the file; its first image in sorted
  order is the condition image). Other published multi-subject splits are evaluated this way.

The multi-subject rule (version 1, seed 0): subjects in name order, classes from the protocol file.
1. Pairs: ``random.Random("musar-dreambench-multi-v1/<seed>/pairs")`` shuffles a list holding every
   subject 4 times and cuts it into consecutive pairs; the first draw is kept in which no pair
   repeats a subject, no pair occurs twice and at least 10 pairs share a class. Every subject is
   then in exactly 4 pairs (balanced per-subject breakdown) and same-class pairs ("a dog and another
   dog"), the hard case the paper's stage 3 trains for, are at least one in six.
2. Triplets: the same with ``.../triplets``, every subject twice, 20 triplets, at least 5 of them
   with a repeated class.
3. Cases are sorted (pairs, then triplets, each by subject names) and numbered ``pair_00..59``,
   ``triplet_00..19``. Each takes a background drawn with ``.../backgrounds`` from those valid for
   all its subjects: the object list's scene prompts (text after the class noun: "in the jungle",
   "floating on top of water", ...) that are also in each subject's own list, so a case with a cat
   or dog gets the 10 scenes common to both lists. Attribute prompts ("a red ...") and outfits
   ("wearing a red hat") would be ambiguous with several subjects and are not backgrounds.
4. The prompt names each subject by its class, grouped by class in order of first appearance:
   "a backpack, a dog and another dog in the snow"; a third of one class is "a third dog"; a
   background's "it" becomes "them". Subjects are told apart by ``occurrence`` (the n-th match of
   the phrase, as :func:`musar_core.subjects.phrase_char_span` counts).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects: cat, cat2, dog, dog2, dog3, dog5..dog8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PROMPTS_PER_SUBJECT = 25

MULTI_FILE = Path(__file__).resolve().parent / "data" / "dreambench_multi.json"
MULTI_RULE_VERSION = 1
MULTI_SEED = 0
PAIRS, PAIR_APPEARANCES, MIN_SAME_CLASS_PAIRS = 60, 4, 10
TRIPLETS, TRIPLET_APPEARANCES, MIN_SAME_CLASS_TRIPLETS = 20, 2, 5
_ORDINALS = {2: "third", 3: "fourth", 4: "fifth"}

SINGLE, MULTI, EXTERNAL = "single", "multi", "external"


# ---- the DreamBench folder -------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """What ``prompts_and_classes.txt`` says, in tuning-free form: templates hold ``{}`` for the class noun."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts_for(self, subject: str) -> tuple[str, ...]:
        return self.live_prompts if self.is_live(subject) else self.object_prompts


def parse_protocol(text: str, source: str = PROTOCOL_FILE) -> Protocol:
    """Parse DreamBooth's ``prompts_and_classes.txt``, dropping the unique token ("a {0} {1}" -> "a {}")."""
    head, sep, prompts = text.partition("Object Prompts")
    if not sep or "Live Subject Prompts" not in prompts:
        raise ValueError(f"{source}: expected 'Object Prompts' and 'Live Subject Prompts' sections")
    classes = {}
    for line in head.splitlines():
        m = re.fullmatch(r"\s*([\w-]+)\s*,\s*(.+?)\s*", line)
        if m and m.group(1) != "subject_name":
            classes[m.group(1)] = m.group(2)
    objects, live = prompts.split("Live Subject Prompts", 1)

    def templates(section: str, name: str) -> tuple[str, ...]:
        found = re.findall(r"'([^']*)'\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)", section)
        out = tuple(t.replace("{0} {1}", "{}") for t in found)
        if len(out) != PROMPTS_PER_SUBJECT or any(t.count("{}") != 1 or "{0}" in t or "{1}" in t for t in out):
            raise ValueError(f"{source}: expected {PROMPTS_PER_SUBJECT} '{name}' prompts of the form 'a {{0}} {{1}} ...', "
                             f"found {len(out)}")  # fmt: skip
        return out

    if not classes:
        raise ValueError(f"{source}: no 'subject_name,class' lines found")
    return Protocol(classes, templates(objects, "object"), templates(live, "live subject"))


@dataclass(frozen=True)
class DreamBench:
    """A DreamBench folder in google/dreambooth's ``dataset/`` layout: one folder of images per subject."""

    root: Path
    protocol: Protocol

    @classmethod
    def open(cls, root: str | Path, key: str = "dreambench") -> DreamBench:
        root = Path(root).expanduser().resolve()
        if not (root / PROTOCOL_FILE).is_file():
            raise FileNotFoundError(f"{key}: {root} is not a DreamBench folder (no {PROTOCOL_FILE}); point it at the "
                                    "dataset/ folder of google/dreambooth")  # fmt: skip
        return cls(root, parse_protocol((root / PROTOCOL_FILE).read_text(), str(root / PROTOCOL_FILE)))

    def images(self, subject: str) -> tuple[str, ...]:
        if subject not in self.protocol.classes:
            raise ValueError(f"unknown DreamBench subject {subject!r} (known: {', '.join(sorted(self.protocol.classes))})")
        return folder_images(self.root / subject)


def folder_images(folder: Path) -> tuple[str, ...]:
    """The images of a subject folder in name order; the first one is the condition image."""
    if not folder.is_dir():
        raise FileNotFoundError(f"subject folder {folder} does not exist")
    images = tuple(str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"subject folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


@functools.cache
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- cases -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseSubject:
    """One subject of a case: ``images[0]`` conditions the generation, all of ``images`` score it."""

    name: str  # DreamBench subject (or an external folder's name): the per-subject breakdown key
    phrase: str
    occurrence: int | None
    images: tuple[str, ...]
    key: str  # what identifies the image set: the DreamBench name, or "dir:<path>"

    @property
    def condition_image(self) -> str:
        return self.images[0]


@dataclass(frozen=True)
class Case:
    id: str  # "<split>/<id>", filesystem-safe: images are stored under it
    split: str
    prompt: str
    subjects: tuple[CaseSubject, ...]

    def to_row(self) -> dict:
        """Plain data for Ray rows, sidecar metadata and tables."""
        return {"case_id": self.id, "split": self.split, "prompt": self.prompt,
                "subjects": [{"name": s.name, "phrase": s.phrase, "occurrence": s.occurrence, "key": s.key,
                              "condition_image": s.condition_image, "images": list(s.images)} for s in self.subjects]}  # fmt: skip

    def generation_digest(self) -> str:
        """Everything of the case that changes a generation: prompt, phrases and condition-image bytes."""
        data = [self.prompt] + [[s.phrase, s.occurrence, file_sha256(s.condition_image)] for s in self.subjects]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def scoring_digest(self) -> str:
        """The generation digest plus every reference image (what the scores depend on)."""
        refs = [[file_sha256(p) for p in s.images] for s in self.subjects]
        return hashlib.sha256(json.dumps([self.id, self.generation_digest(), refs]).encode()).hexdigest()[:16]


def occurrence_at(prompt: str, phrase: str, start: int) -> int:
    """Index of the match of ``phrase`` starting at ``start`` among all its matches (phrase_char_span's count)."""
    starts, pos = [], prompt.find(phrase)
    while pos >= 0:
        starts.append(pos)
        pos = prompt.find(phrase, pos + 1)
    if start not in starts:
        raise ValueError(f"{phrase!r} does not start at character {start} of {prompt!r}")
    return starts.index(start)


def _check_phrases(case: Case, where: str) -> None:
    """Every subject's phrase resolves in the prompt, to spans that do not overlap (else routing is meaningless)."""
    from musar_core.subjects import Subject, phrase_char_span

    spans = []
    for s in case.subjects:
        try:
            spans.append(phrase_char_span(case.prompt, Subject(s.condition_image, s.phrase, occurrence=s.occurrence)))
        except ValueError as err:
            raise ValueError(f"{where}: case {case.id}: {err}") from None
    spans.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"{where}: case {case.id}: two subjects name the same words of the prompt "
                         f"({case.prompt!r}); give each its own phrase or occurrence")  # fmt: skip


def single_cases(bench: DreamBench) -> list[Case]:
    """The 750 single-subject cases: every subject with every prompt of its (object or live) list."""
    cases = []
    for name in sorted(bench.protocol.classes):
        noun = bench.protocol.classes[name]
        images = bench.images(name)
        for i, template in enumerate(bench.protocol.prompts_for(name)):
            prompt = template.format(noun)
            occurrence = occurrence_at(prompt, noun, template.index("{}"))
            subject = CaseSubject(name, noun, occurrence, images, name)
            cases.append(Case(f"{SINGLE}/{name}/{i:02d}", SINGLE, prompt, (subject,)))
    return cases


# ---- the multi-subject rule ------------------------------------------------------------------------
def backgrounds(protocol: Protocol) -> list[str]:
    """Scene prompts of the object list, as suffixes after the class noun ("in the jungle")."""
    return [t[len("a {} "):] for t in protocol.object_prompts if t.startswith("a {} ")]


def valid_backgrounds(protocol: Protocol, subjects: list[str]) -> list[str]:
    return [b for b in backgrounds(protocol) if all(f"a {{}} {b}" in protocol.prompts_for(s) for s in subjects)]


def _regular_groups(names: list[str], classes: dict[str, str], size: int, appearances: int, count: int,
                    min_same_class: int, rng: random.Random) -> list[tuple[str, ...]]:  # fmt: skip
    if len(names) * appearances != size * count:
        raise ValueError(f"{len(names)} subjects x {appearances} appearances cannot fill {count} groups of {size}")
    slots = [n for n in names for _ in range(appearances)]
    for _ in range(1_000_000):
        rng.shuffle(slots)
        groups = [tuple(sorted(slots[i:i + size])) for i in range(0, len(slots), size)]
        if any(len(set(g)) < size for g in groups) or len(set(groups)) < count:
            continue
        if sum(len({classes[n] for n in g}) < size for g in groups) >= min_same_class:
            return sorted(groups)
    raise RuntimeError("no draw satisfied the multi-subject rule")  # not reached for DreamBench


def multi_prompt(subjects: list[str], classes: dict[str, str], background: str) -> tuple[str, list[dict]]:
    """"a backpack, a dog and another dog in the snow" and each subject's phrase + occurrence."""
    order: list[str] = []
    for noun in dict.fromkeys(classes[s] for s in subjects):  # classes in order of first appearance
        order += [s for s in subjects if classes[s] == noun]
    seen: Counter = Counter()
    parts, starts = [], []
    offset = 0
    for i, s in enumerate(order):
        noun = classes[s]
        n = seen[noun]
        seen[noun] += 1
        lead = "a " if n == 0 else "another " if n == 1 else f"a {_ORDINALS[n]} "
        sep = "" if i == 0 else (" and " if i == len(order) - 1 else ", ")
        offset += len(sep) + len(lead)
        parts.append(sep + lead + noun)
        starts.append(offset)
        offset += len(noun)
    scene = re.sub(r"\bit\b", "them", background)
    prompt = "".join(parts) + " " + scene
    entries = [{"name": s, "class": classes[s], "phrase": classes[s],
                "occurrence": occurrence_at(prompt, classes[s], start)} for s, start in zip(order, starts)]  # fmt: skip
    return prompt, entries


def multi_definitions(protocol: Protocol, seed: int = MULTI_SEED) -> dict:
    """The content of the shipped multi-subject data file: a pure function of the protocol and ``seed``."""
    names, classes = sorted(protocol.classes), protocol.classes
    tag = f"musar-dreambench-multi-v{MULTI_RULE_VERSION}/{seed}"
    pairs = _regular_groups(names, classes, 2, PAIR_APPEARANCES, PAIRS, MIN_SAME_CLASS_PAIRS, random.Random(f"{tag}/pairs"))
    triplets = _regular_groups(names, classes, 3, TRIPLET_APPEARANCES, TRIPLETS, MIN_SAME_CLASS_TRIPLETS,
                               random.Random(f"{tag}/triplets"))  # fmt: skip
    rng = random.Random(f"{tag}/backgrounds")
    cases = []
    for kind, groups in (("pair", pairs), ("triplet", triplets)):
        for i, group in enumerate(groups):
            background = rng.choice(valid_backgrounds(protocol, list(group)))
            prompt, subjects = multi_prompt(list(group), classes, background)
            cases.append({"id": f"{kind}_{i:02d}", "prompt": prompt, "background": background, "subjects": subjects})
    return {
        "name": "dreambench_multi",
        "rule_version": MULTI_RULE_VERSION,
        "seed": seed,
        "generator": "evaluation.cases.multi_definitions (rule in its module docstring)",
        "counts": {"pairs": len(pairs), "triplets": len(triplets)},
        "cases": cases,
    }


def write_multi_file(dreambench: str | Path, path: str | Path = MULTI_FILE, seed: int = MULTI_SEED) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(multi_definitions(DreamBench.open(dreambench).protocol, seed), indent=1) + "\n")
    return path


# ---- case files ------------------------------------------------------------------------------------
_CASE_KEYS = {"id", "prompt", "subjects", "background", "note"}
_SUBJECT_KEYS = {"name", "dir", "phrase", "occurrence", "class"}


def load_case_file(path: str | Path, bench: DreamBench | None, split: str) -> list[Case]:
    """Cases of a JSON case file (the shipped multi file or an external one); errors name file and case."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"case file {path} does not exist")
    data = json.loads(path.read_text())
    entries = data["cases"] if isinstance(data, dict) and "cases" in data else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of cases (or {{'cases': [...]}})")
    cases, ids = [], set()
    for i, entry in enumerate(entries):
        where = f"{path} case {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry.get("subjects"):
            raise ValueError(f"{where}: each case needs a 'prompt' string and a non-empty 'subjects' list")
        if unknown := set(entry) - _CASE_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_CASE_KEYS)})")
        case_id = str(entry.get("id", f"{i:03d}"))
        if not re.fullmatch(r"[\w.-]+", case_id) or case_id in ids:
            raise ValueError(f"{where}: id {case_id!r} must be unique and made of letters, digits, '_', '-', '.'")
        ids.add(case_id)
        subjects = []
        for s in entry["subjects"]:
            if not isinstance(s, dict) or set(s) - _SUBJECT_KEYS:
                raise ValueError(f"{where}: subject {s!r}: expected keys among {sorted(_SUBJECT_KEYS)}")
            if ("name" in s) == ("dir" in s) or not s.get("phrase"):
                raise ValueError(f"{where}: each subject needs a 'phrase' and exactly one of 'name' / 'dir'")
            occurrence = s.get("occurrence")
            if occurrence is not None and (not isinstance(occurrence, int) or occurrence < 0):
                raise ValueError(f"{where}: occurrence must be a non-negative integer, got {occurrence!r}")
            try:
                if "name" in s:
                    if bench is None:
                        raise ValueError(f"subject {s['name']!r} refers to DreamBench, but no DreamBench folder is available (set dreambench)")
                    subjects.append(CaseSubject(s["name"], s["phrase"], occurrence, bench.images(s["name"]), s["name"]))
                else:
                    folder = (path.parent / s["dir"]).resolve()
                    subjects.append(CaseSubject(folder.name, s["phrase"], occurrence, folder_images(folder), f"dir:{folder}"))
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"{where}: {err}") from None
        case = Case(f"{split}/{case_id}", split, entry["prompt"], tuple(subjects))
        _check_phrases(case, str(path))
        cases.append(case)
    return cases


def multi_cases(bench: DreamBench, path: str | Path | None = None) -> list[Case]:
    return load_case_file(path or MULTI_FILE, bench, MULTI)


def external_split(path: str | Path) -> str:
    stem = re.sub(r"[^\w.-]", "_", Path(path).stem)
    return f"{EXTERNAL}/{stem}"


def select_cases(cases: list[Case], patterns: list[str] = (), subjects: list[str] = (),
                 limit: int | None = None) -> list[Case]:  # fmt: skip
    """Filter by case-id patterns (fnmatch) and subject names, then keep ``limit`` cases evenly spaced
    over the list (a smoke run then touches many subjects instead of the first one's 25 prompts)."""
    if patterns:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    if subjects:
        cases = [c for c in cases if all(s.name in subjects for s in c.subjects)]
    if limit is not None and len(cases) > limit:
        cases = [cases[i * len(cases) // limit] for i in range(limit)]
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.cases", description="Rewrite the shipped multi-subject case file.")
    parser.add_argument("dreambench", help="DreamBench folder (for prompts_and_classes.txt)")
    parser.add_argument("--out", default=str(MULTI_FILE))
    parser.add_argument("--seed", type=int, default=MULTI_SEED)
    args = parser.parse_args(argv)
    print(f"wrote {write_multi_file(args.dreambench, args.out, args.seed)}")


if __name__ == "__main__":
    main()
