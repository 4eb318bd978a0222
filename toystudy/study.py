"""The toy-scale study: MUSAR and its section-4.4 ablations, trained with the real jobs, judged from images.

One command (``musar toy study``) runs, on top of a toy base model (``musar toy base``):

1. customisation data in Subject200K format with single subjects only (``toystudy.subject200k``;
   condition prompts name the shape alone, so colour and pattern must come from the reference), with
   the evaluation subjects held out, and the data pipeline's shards (``pipelines.build``);
2. per variant and training seed, the curriculum stages through the training job's own driver
   (``training.driver.run_stage``: Ray Train + DeepSpeed on CPU), each stage from the previous LoRA,
   ``concurrent_models`` models at a time (each a Ray task on one thread by default):
   - ``full``: stages 1-3 (single; 80% random diptych + 20% single; same-category diptych);
   - ``no_diptych``: stage 1 only, for all the steps (single-subject data alone);
   - ``no_bias_mitigation``: stages 1-3 without static routing and with one shared LoRA;
   - ``no_dynamic``: stages 1-3 without dynamic routing;
   - (opt-in) ``full_compact_x2``: the full model with compact conditions (``condition_compaction=2``);
3. generation of fixed cases with 1, 2 and 3 held-out subjects (references rendered alone, prompt
   naming each subject by its shape and place; true classifier-free guidance, ``true_cfg_scale``),
   judged by ``toystudy.measure`` (detector, not model);
   the untrained base is judged too: with the shape-only prompt (the floor), with every subject
   described in words (whether the base can draw the world at all), and with the references attached
   but no MUSAR training (what the base copies from them unaided); and the base's copy prior
   (``toystudy.copy_prior``), which customisation has tracked at this scale;
4. a table (fidelity and entanglement per subject count, mean and spread over training seeds), a
   second one of subjects present at the place the prompt asked (``toystudy.measure``'s ``placed``),
   a third of how often dynamic routing sent a subject's region to its reference
   (``toystudy.measure.routing_hits``), a fourth of where entanglement comes from (its chance level,
   the swap probe, fidelity by position), a fifth splitting it into leaks and misbound subjects
   (``toystudy.measure.entanglement_kind``), and a sample figure (Figure 8's layout), in ``report.md``
   and one MLflow run.

Its defaults are not the paper's setup but what made the toy customise at all (README): references
in left panels, 600/150/150 steps, diptych tokens routed by panel in training, routing phrases that
name each subject's place.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .subject200k import item_name
from .world import (
    ALL_SUBJECTS,
    BACKGROUNDS,
    Placement,
    Subject,
    objects_prompt,
    render_scene,
    sample_placements,
    scene_prompt,
    with_article,
)

VARIANTS: dict[str, dict] = {
    "full": {"stages": (1, 2, 3), "musar": {}},
    "no_diptych": {"stages": (1,), "musar": {}},
    "no_bias_mitigation": {"stages": (1, 2, 3), "musar": {"static_routing": False, "shared_lora": True}},
    "no_dynamic": {"stages": (1, 2, 3), "musar": {"dynamic_routing": False}},
    # Not one of the paper's ablations: the full model with compact conditions (references at half the
    # side, a quarter of the tokens), for their quality cost. Opt in: variants=[..., full_compact_x2].
    "full_compact_x2": {"stages": (1, 2, 3), "musar": {"condition_compaction": 2}},
    # Not the paper's either: no_bias_mitigation's two changes one at a time, to tell which of them
    # lets single subjects customise at toy scale (README). Opt in like full_compact_x2.
    "no_static": {"stages": (1, 2, 3), "musar": {"static_routing": False}},
    "shared_lora": {"stages": (1, 2, 3), "musar": {"shared_lora": True}},
}
DEFAULT_VARIANTS = ("full", "no_diptych", "no_bias_mitigation", "no_dynamic")
BASE = "base (untrained)"
BASE_TEXT = "base, subjects described in words"
BASE_REFS = "base + references, no MUSAR training"
PROMPT_TOKENS = 96  # the longest diptych prompt of the toy world fits
CONDITION_PROMPT_TOKENS = 8  # condition prompts name the shape alone ("Triangle", as in the training data)
ROUTING_PHRASES = ("shape", "shape+location")


@dataclass
class StudyConfig:
    base: str = "outputs/toy/base"  # `musar toy base` output
    output: str = "outputs/toy/study"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: int = 240  # toy Subject200K rows (one subject, two scenes each)
    held_out: int = 24  # evaluation subjects never seen in training
    # 5 epochs of single subjects in stage 1 (480 panels, micro-batch 4), then 150 diptych steps
    # each. 60/30/30 (the first studies) and 300/75/75 did not customise at all (README).
    stage_steps: tuple[int, int, int] = (600, 150, 150)
    micro_batch_size: int = 4
    lr: float = 1e-3
    timestep_shift: float = 1.0  # of the customisation training's timesteps (the toy base trains with 3)
    subject_rank: int = 16
    noise_rank: int = 4
    # Where the references sit in RoPE (``MusarConfig.rope_scheme``). Not the core's default: the plane
    # offset overlaps the target's rows and columns, and the toy base pastes a reference there, which
    # routed training unlearns without learning to customise (README); left panels share no position.
    rope_scheme: str = "left_panels_v1"
    # Diptych target tokens route to their own panel's condition in training (``TrainConfig.diptych_routes``):
    # the toy base's attention to shape words carries no location, so the paper's "attention" routes
    # them at chance (README).
    diptych_routes: str = "panels"
    # The prompt words each subject's routing reads (``Subject.phrase``): "shape+location" ("a heart on
    # the left"), where the toy base grounds place, or "shape" ("a heart"), which it does not ground.
    routing_phrase: str = "shape+location"
    # ``MusarConfig.routes_from_layer``: block 0 routes and every block follows it (not the paper, which
    # routes per block; None). The toy base grounds "a heart on the left" in block 0 and loses it later:
    # at inference, 2-subject routing is right 0.93 / 0.75 of the time this way on bases w6r / w7, and
    # 0.69 / 0.64 routed per block (README).
    routes_from_layer: int | None = 0
    num_workers: int = 1
    # One torch thread per model, two models at once: the toy's small matrices leave a second thread
    # nearly idle (a step takes 0.236 s on one thread, 0.218 s on two), while two one-thread models
    # side by side step in 0.264 s each, and each one's Ray Train start-up overlaps the other's steps.
    cpus_per_worker: int = 1
    concurrent_models: int = 2  # models trained and judged at once, each in its own Ray task; 1: in this process
    eval_cases: int = 24  # per subject count (1, 2, 3); at 8 one image moves a 1-subject cell by 0.06
    eval_seeds: int = 2
    inference_steps: int = 16
    # True classifier-free guidance against the empty prompt (the base is trained with prompt dropout);
    # 1 turns it off. Chosen on the base alone, on cases of another seed (see README).
    true_cfg_scale: float = 3.0
    figure_cases: int = 4
    # ``toystudy.swap_probe``: each 2-subject case generated again with its last reference swapped for a
    # twin (same shape, unused colour and pattern), to read whether that reference reaches the other
    # subject. A third more generation per model; false skips it.
    swap_probe: bool = True
    # Pair prompts for the base's copy prior (``toystudy.copy_prior``) in the report: customisation at
    # toy scale has tracked it, loosely (README). 0 skips it.
    copy_prior_pairs: int = 32
    tracking_uri: str = "sqlite:///outputs/toy/mlflow.db"
    experiment: str = "musar-toy-study"
    seed: int = 0
    overwrite: bool = False
    # Judge the models an earlier run of this output trained (``train/<variant>-seed<k>``) instead of
    # training them again, and train only those missing: a re-judge with other evaluation settings
    # (routes_from_layer, eval_cases, ...) or the rest of an interrupted study. Refused where a model
    # was trained with other training settings (:data:`TRAINING_FIELDS`).
    reuse_trained: bool = False
    notes: str = ""  # written into the report (e.g. what changed in the world and why)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}: choose from {sorted(VARIANTS)}")
        if len(self.stage_steps) != 3 or min(self.stage_steps) < 1:
            raise ValueError(f"stage_steps needs three positive step counts, got {self.stage_steps}")
        if not self.seeds:
            raise ValueError("seeds must name at least one training seed")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if self.true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 turns it off), got {self.true_cfg_scale}")
        from musar_core.config import ROPE_SCHEMES

        if self.rope_scheme not in ROPE_SCHEMES:
            raise ValueError(f"rope_scheme must be one of {ROPE_SCHEMES}, got {self.rope_scheme!r}")
        from training.config import DIPTYCH_ROUTES

        if self.diptych_routes not in DIPTYCH_ROUTES:
            raise ValueError(f"diptych_routes must be one of {DIPTYCH_ROUTES}, got {self.diptych_routes!r}")
        if self.routing_phrase not in ROUTING_PHRASES:
            raise ValueError(f"routing_phrase must be one of {ROUTING_PHRASES}, got {self.routing_phrase!r}")
        if self.copy_prior_pairs < 0:
            raise ValueError(f"copy_prior_pairs must be >= 0 (0 skips the copy prior), got {self.copy_prior_pairs}")
        if self.concurrent_models < 1:
            raise ValueError(f"concurrent_models must be >= 1 (1 trains one model at a time), got {self.concurrent_models}")
        if not 3 <= self.held_out < len(ALL_SUBJECTS):
            raise ValueError(f"held_out must lie in [3, {len(ALL_SUBJECTS) - 1}], got {self.held_out}")


# -------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Case:
    subjects: tuple[Subject, ...]
    placements: tuple[Placement, ...]
    background: str

    @property
    def prompt(self) -> str:
        return objects_prompt([f"{ph} {p.location}" for ph, p in zip(self.phrases, self.placements)], self.background)

    @property
    def described(self) -> str:
        """The prompt with every subject fully described in words (what text alone can ask for)."""
        return scene_prompt(self.subjects, self.placements, self.background)

    @property
    def phrases(self) -> list[str]:
        return [with_article(s.shape) for s in self.subjects]

    def references(self, routing_phrase: str = "shape+location") -> list:
        """The subjects as the pipeline takes them: reference image, the prompt words routing reads
        (``StudyConfig.routing_phrase``), and the condition prompt the training data used (the item)."""
        from musar_core import Subject as Ref

        words = [f"{ph} {p.location}" if routing_phrase == "shape+location" else ph
                 for ph, p in zip(self.phrases, self.placements)]  # fmt: skip
        return [Ref(reference(s), w, condition_prompt=item_name(s)) for s, w in zip(self.subjects, words)]


def held_out_subjects(cfg: StudyConfig) -> tuple[Subject, ...]:
    rng = np.random.default_rng([cfg.seed, 7])
    return tuple(ALL_SUBJECTS[int(i)] for i in sorted(rng.choice(len(ALL_SUBJECTS), cfg.held_out, replace=False)))


def evaluation_cases(cfg: StudyConfig) -> list[Case]:
    """``eval_cases`` cases per subject count, subjects of distinct shapes (a prompt names shapes)."""
    pool, rng, cases = held_out_subjects(cfg), np.random.default_rng([cfg.seed, 8]), []
    names = list(BACKGROUNDS)
    for n in (1, 2, 3):
        while sum(len(c.subjects) == n for c in cases) < cfg.eval_cases:
            subjects = tuple(pool[int(i)] for i in rng.choice(len(pool), n, replace=False))
            if len({s.shape for s in subjects}) < n:
                continue
            cases.append(Case(subjects, sample_placements(subjects, rng), names[int(rng.integers(len(names)))]))
    return cases


def reference(subject: Subject, size: int = 64) -> Image.Image:
    """A subject's reference image: alone, centred, on white."""
    return render_scene([subject], [Placement(0.5, 0.5, 0.5)], "white", size, np.random.default_rng(0))


def evaluate(
    pipe, cases: list[Case], cfg: StudyConfig, with_subjects: bool = True, described: bool = False
) -> tuple[dict, list[Image.Image]]:
    """Generate every case with ``eval_seeds`` seeds and judge the images; returns (table, first images).

    Without subjects the prompt names shapes only (the floor); ``described`` spells out every subject.
    With subjects and ``cfg.swap_probe``, each 2-subject case is generated again with the same noise and
    its last reference swapped for a twin (``toystudy.swap_probe``), judged into the 2-subject row."""
    import torch

    from .measure import aggregate, drawn_routing, measure, routing_hits
    from .swap_probe import aggregate_swaps, judge_swap, twin_and_decoy

    def generate(batch: list[Case], noise: list[int], seed: int, routes: bool = False):
        """One batched call; case ``noise[b]``'s generator for row b (a swapped case keeps its original's)."""
        prompts = [c.described if described else c.prompt for c in batch]
        refs = [c.references(cfg.routing_phrase) for c in batch] if with_subjects else None
        generators = [torch.Generator().manual_seed(1000 * i + seed) for i in noise]
        return pipe(prompts, refs, height=64, width=64, num_inference_steps=cfg.inference_steps, guidance_scale=1.0,
                    true_cfg_scale=cfg.true_cfg_scale, generator=generators, progress=False,
                    return_routing=routes)  # fmt: skip

    outcomes, firsts, routing, swaps = [], [None] * len(cases), {}, []
    for n in (1, 2, 3):  # one batched call per subject count (a batch needs equal subject counts)
        picked = [i for i, case in enumerate(cases) if len(case.subjects) == n]
        if not picked:
            continue
        for seed in range(cfg.eval_seeds):
            out = generate([cases[i] for i in picked], picked, seed, routes=bool(with_subjects and n >= 2))
            before = [measure(image, cases[i].subjects, cases[i].placements) for i, image in zip(picked, out.images)]
            if with_subjects and n == 2 and cfg.swap_probe:  # the same noise, the last reference swapped
                pairs = [twin_and_decoy(cases[i].subjects, i) for i in picked]
                twins = [replace(cases[i], subjects=(cases[i].subjects[0], twin)) for i, (twin, _) in zip(picked, pairs)]
                after = [measure(image, c.subjects, c.placements) for c, image in zip(twins, generate(twins, picked, seed).images)]
                swaps += [judge_swap(b, a, twin, decoy) for b, a, (twin, decoy) in zip(before, after, pairs)]
            outcomes += before
            for b, (i, image) in enumerate(zip(picked, out.images)):
                if seed == 0:
                    firsts[i] = image
                if out.routing is not None:  # dynamic routing's choices (none recorded when it is off)
                    routes = [r[b] for step in out.routing.routes for r in step.values()]
                    counts = {"routing": routing_hits(routes, cases[i].placements, out.routing.grid)}
                    drawn = drawn_routing(routes, before[b], out.routing.grid, image.size)
                    counts.update(routing_drawn=drawn["drawn"], routing_misbound=drawn["misbound"])
                    for key, (hits, total) in counts.items():
                        routing[n, key] = [x + y for x, y in zip(routing.get((n, key), (0, 0)), (hits, total))]
    table = aggregate(outcomes)
    if swaps:
        table[2].update(aggregate_swaps(swaps))
    for (n, key), (hits, total) in routing.items():
        if total:
            table[n][key] = hits / total
    return table, firsts


# --------------------------------------------------------------------------------------- training
# The StudyConfig fields a trained model depends on (with diptych_routes=attention, routes_from_layer
# decides training's routes too); the rest only change how the models are judged.
TRAINING_FIELDS = ("base", "rows", "held_out", "seed", "stage_steps", "micro_batch_size", "lr", "timestep_shift",
                   "subject_rank", "noise_rank", "rope_scheme", "diptych_routes", "num_workers")  # fmt: skip
TRAINED_RECORD = "study_training.json"


def training_settings(cfg: StudyConfig, variant: str, seed: int) -> dict:
    """What one trained model depends on, as JSON: recorded beside it and checked by ``reuse_trained``.
    The base counts by its path and by a hash of its ``toy_base.json`` (steps, loss curve), so a base
    rebuilt in the same folder is a different base."""
    import hashlib

    fields = TRAINING_FIELDS + (("routes_from_layer",) if cfg.diptych_routes == "attention" else ())
    settings = {k: getattr(cfg, k) for k in fields}
    base = Path(cfg.base).expanduser().absolute()
    record = base / "toy_base.json"
    settings["base"] = str(base)
    settings["base_record_sha256"] = hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else None
    spec = VARIANTS[variant]
    settings.update(variant=variant, training_seed=seed, stages=spec["stages"], musar=spec["musar"])
    return json.loads(json.dumps(settings))


def _trained_root(cfg: StudyConfig, variant: str, seed: int) -> Path:
    return Path(cfg.output).expanduser().resolve() / "train" / f"{variant}-seed{seed}"


def trained_lora(cfg: StudyConfig, variant: str, seed: int) -> Path | None:
    """The LoRA an earlier run trained for (variant, seed) with these training settings; None if there
    is none. Raises ValueError when one is there but was trained differently (nothing is overwritten)."""
    from musar_core.checkpoint import METADATA_FILE

    root = _trained_root(cfg, variant, seed)
    try:
        saved = json.loads((root / TRAINED_RECORD).read_text())
    except (OSError, ValueError):  # none, or cut short: not a finished training
        return None
    lora = root / saved.get("lora", "")
    if not (lora / METADATA_FILE).is_file():  # recorded, but its LoRA is gone: train it again
        return None
    wanted = training_settings(cfg, variant, seed)
    had = saved.get("settings", {})
    changed = sorted(k for k in wanted.keys() | had.keys() if wanted.get(k) != had.get(k))
    if changed:
        then = ", ".join(f"{k}={had[k]!r}" if k in had else f"{k} not recorded" for k in changed)
        raise ValueError(f"reuse_trained: {root} was trained with other settings ({then}; now "
                         f"{', '.join(f'{k}={wanted.get(k)!r}' for k in changed)}): use another output, or "
                         "reuse_trained=false overwrite=true to train every model again")  # fmt: skip
    return lora


def _train(cfg: StudyConfig, variant: str, seed: int, shards: Path) -> Path:
    from training.config import TrainConfig
    from training.driver import run_stage

    spec = VARIANTS[variant]
    (_trained_root(cfg, variant, seed) / TRAINED_RECORD).unlink(missing_ok=True)  # written again when all stages are
    lora = None
    for stage in spec["stages"]:
        steps = sum(cfg.stage_steps) if spec["stages"] == (1,) else cfg.stage_steps[stage - 1]
        tc = TrainConfig(stage=stage, model=cfg.base, init_lora=lora, steps=steps, micro_batch_size=cfg.micro_batch_size,
                         grad_accum=1, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, seed=seed,
                         checkpoint_every=steps, log_every=min(steps, 20), timestep_shift=cfg.timestep_shift,
                         diptych_routes=cfg.diptych_routes,
                         output_dir=str(_trained_root(cfg, variant, seed)),
                         musar=musar_config(cfg, variant))  # fmt: skip
        tc.data.shards, tc.data.target_size, tc.data.max_prompt_tokens = str(shards), 64, PROMPT_TOKENS
        tc.optim.lr, tc.optim.warmup_steps = cfg.lr, max(1, steps // 10)
        tc.tracking.tracking_uri, tc.tracking.experiment = cfg.tracking_uri, cfg.experiment
        tc.tracking.run_name, tc.tracking.sample_grid = f"{variant}-seed{seed}-stage{stage}", False
        lora = str(run_stage(tc).lora_dir)
    root = _trained_root(cfg, variant, seed)
    record = {"settings": training_settings(cfg, variant, seed), "lora": str(Path(lora).resolve().relative_to(root))}
    (root / f".{TRAINED_RECORD}.tmp").write_text(json.dumps(record, indent=1))
    (root / f".{TRAINED_RECORD}.tmp").replace(root / TRAINED_RECORD)  # whole or not at all
    return Path(lora)


def musar_config(cfg: StudyConfig, variant: str):
    from musar_core import MusarConfig

    return MusarConfig(subject_rank=cfg.subject_rank, noise_rank=cfg.noise_rank, condition_size=64,
                       condition_prompt_max_tokens=CONDITION_PROMPT_TOKENS, rope_scheme=cfg.rope_scheme,
                       routes_from_layer=cfg.routes_from_layer,
                       **VARIANTS[variant]["musar"])  # fmt: skip


def _train_and_judge(cfg: StudyConfig, variant: str, seed: int, lora: Path | None, shards: Path,
                     cases: list[Case]) -> tuple[dict, list[Image.Image], float | None]:
    """One model: trained (unless ``lora`` is an earlier run's) and judged; returns (table, first
    images, training seconds or None when reused)."""
    from musar_core import MUSARPipeline

    train_s = None
    if lora is None:
        tick = time.perf_counter()
        lora = _train(cfg, variant, seed, shards)
        train_s = round(time.perf_counter() - tick, 1)
    pipe = MUSARPipeline.from_pretrained(cfg.base, config=musar_config(cfg, variant), lora=lora)
    table, images = evaluate(pipe, cases, cfg)
    return table, images, train_s


def _in_ray_task(cfg: StudyConfig, *args):
    """:func:`_train_and_judge` in a Ray task: judged on the threads one model's training had."""
    import torch

    torch.set_num_threads(cfg.num_workers * cfg.cpus_per_worker)
    return _train_and_judge(cfg, *args)


def schedule(jobs: list[tuple[str, int, Path | None]]) -> list[tuple[str, int, Path | None]]:
    """The order models start in: those to train first, those only re-judged (a reused LoRA) last,
    config order within each. Longest first: short re-judgings then fill the end beside the last
    training, instead of one training running alone at the end (w9's study: 13 min on one core)."""
    return sorted(jobs, key=lambda job: job[2] is not None)


def train_and_judge_all(cfg: StudyConfig, jobs: list[tuple[str, int, Path | None]], shards: Path, cases: list[Case],
                        on_done=None) -> dict[tuple[str, int], tuple]:
    """Every (variant, seed, reused LoRA or None) in ``jobs``, ``cfg.concurrent_models`` at a time.

    Above one, each model is a Ray task (no CPUs of its own: its Ray Train workers hold them) that
    runs its stages' trainers and judges the result; the first failure cancels the rest and is raised.
    Models start in :func:`schedule`'s order. ``on_done(job, result)`` is called as each model
    finishes, in the order they finish."""
    done: dict[tuple[str, int], tuple] = {}
    jobs = schedule(jobs)
    if cfg.concurrent_models == 1:
        for variant, seed, lora in jobs:
            done[variant, seed] = _train_and_judge(cfg, variant, seed, lora, shards, cases)
            if on_done:
                on_done((variant, seed), done[variant, seed])
        return done
    import mlflow
    import ray

    # The tracking store's tables and the experiment, made here once: two tasks that both find them
    # missing would race to create them, and one would fail.
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    if client.get_experiment_by_name(cfg.experiment) is None:
        client.create_experiment(cfg.experiment)
    task = ray.remote(num_cpus=0, max_retries=0)(_in_ray_task)
    queue, running = list(jobs), {}
    try:
        while queue or running:
            while queue and len(running) < cfg.concurrent_models:
                variant, seed, lora = queue.pop(0)
                running[task.remote(cfg, variant, seed, lora, shards, cases)] = (variant, seed)
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            done[job] = ray.get(ready[0])
            if on_done:
                on_done(job, done[job])
    finally:
        for ref in running:  # a model failed (or the driver was interrupted): stop the others' trainings
            ray.cancel(ref, force=True)
    return done


# ----------------------------------------------------------------------------------------- report
def _copy_line(copy: dict) -> str:
    return (f"copied {copy['copied']:.2f} (same colour {copy['same_colour']:.2f}, same pattern "
            f"{copy['same_pattern']:.2f}); left panel right {copy['left']:.2f}, right panel right {copy['right']:.2f}")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _cell_or_dash(values: list) -> str:
    """:func:`_cell`, or "-" where a seed has no value (None)."""
    return "-" if None in values else _cell(values)


def table_markdown(results: dict[str, list[dict]]) -> str:
    """Rows: variants; columns: fidelity for 1/2/3 subjects, entanglement for 2/3 (mean ± sd over seeds)."""
    head = "| model | fidelity 1 | fidelity 2 | fidelity 3 | entanglement 2 | entanglement 3 | seeds |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        cells = [_cell([r[n]["fidelity"] for r in runs]) for n in (1, 2, 3)]
        cells += [_cell([r[n]["entanglement"] for r in runs]) for n in (2, 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def placed_markdown(results: dict[str, list[dict]]) -> str:
    """Rows: variants; columns: the share of requested subjects present *at the place the prompt asked*
    for 1/2/3 subjects. A model that pastes its reference (centred) scores fidelity but not this."""
    lines = ["| model | placed 1 | placed 2 | placed 3 | seeds |", "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        cells = [_cell([r[n].get("placed", float("nan")) for r in runs]) for n in (1, 2, 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def routing_markdown(results: dict[str, list[dict]]) -> str:
    """Rows: models that route; columns for 2/3 subjects: routing accuracy on the prompt's layout
    (``measure.routing_hits``), on the drawn objects, and the share of misbound objects' tokens routed
    to their source partner (``measure.drawn_routing``; "-" where a seed had none)."""
    lines = ["| model | routing 2 | routing 3 | on drawn 2 | on drawn 3 | misbound to partner 2 | "
             "misbound to partner 3 | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, runs in results.items():
        if all("routing" in r[n] for r in runs for n in (2, 3)):
            cells = [_cell_or_dash([r[n].get(key) for r in runs])
                     for key in ("routing", "routing_drawn", "routing_misbound") for n in (2, 3)]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def leak_markdown(results: dict[str, list[dict]]) -> str:
    """Rows: models; columns: entanglement beside its chance level (``measure.chance_entanglement``)
    for 2/3 subjects, the swap probe's follows / drifts / twin present (``toystudy.swap_probe``; "-"
    where a model has no value: a single subject set, or no references to swap), then 2-subject
    fidelity of the first and the second subject (reference) apart, means over seeds."""
    keys = [(2, "entanglement"), (2, "entanglement_chance"), (3, "entanglement"), (3, "entanglement_chance"),
            (2, "swap_follows"), (2, "swap_drifts"), (2, "twin_present")]  # fmt: skip
    lines = ["| model | ent 2 | chance 2 | ent 3 | chance 3 | follows 2 | drifts 2 | twin present 2 | "
             "present 1st / 2nd (2) | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for name, runs in results.items():
        cells = [_cell_or_dash([r[n].get(key) for r in runs]) for n, key in keys]
        cells.append(" / ".join(f"{statistics.mean(r[2]['fidelity_by_position'][k] for r in runs):.2f}" for k in (0, 1)))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def split_markdown(results: dict[str, list[dict]]) -> str:
    """Rows: models; columns per 2/3 subjects: entanglement, its leaks and misbound subjects
    (``measure.entanglement_kind``; they sum to it), and the share of cases with every requested
    shape drawn (with 2 subjects only those cases can hold a leak). Mean ± sd over seeds."""
    keys = ("entanglement", "entanglement_leak", "entanglement_misbound", "shapes_drawn")
    lines = ["| model | ent 2 | leak 2 | misbound 2 | all shapes drawn 2 | ent 3 | leak 3 | misbound 3 | "
             "all shapes drawn 3 | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, runs in results.items():
        cells = [_cell([r[n][key] for r in runs]) for n in (2, 3) for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def figure(cases: list[Case], columns: dict[str, list[Image.Image]], count: int) -> Image.Image:
    """Figure 8's layout: per case its references, then one generated sample per model."""
    picked = [i for i, c in enumerate(cases) if len(c.subjects) >= 2][:count]
    names = list(columns)
    cell = 64
    sheet = Image.new("RGB", (cell * (3 + len(names)), cell * len(picked)), "white")
    for row, i in enumerate(picked):
        for k, subject in enumerate(cases[i].subjects):
            sheet.paste(reference(subject), (k * cell, row * cell))
        for col, name in enumerate(names):
            sheet.paste(columns[name][i], ((3 + col) * cell, row * cell))
    return sheet


# -------------------------------------------------------------------------------------------- run
def run_study(cfg: StudyConfig) -> Path:
    """Data -> trainings -> generation -> table; returns the report's path."""
    import mlflow

    from musar.config import to_dict
    from musar.ray_cluster import ensure_ray
    from musar_core import MUSARPipeline
    from pipelines.build import DataBuildConfig, build_shards
    from pipelines.encode import EncoderConfig
    from pipelines.panels import PanelGeometry
    from training.tracking import resolve_tracking_uri

    from .subject200k import ToyDataConfig, write_toy_subject200k

    started = time.perf_counter()
    out = Path(cfg.output).expanduser().absolute()
    if (out / "report.md").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a study: pass overwrite=true to run it again "
                              "(with reuse_trained=true it judges the models trained there again)")
    base = Path(cfg.base).expanduser().absolute()
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"base: {base} is not a toy base model folder (build it with `musar toy base`)")
    base_info = json.loads((base / "toy_base.json").read_text()) if (base / "toy_base.json").is_file() else {}
    if cfg.true_cfg_scale > 1 and not base_info.get("config", {}).get("prompt_dropout"):
        raise ValueError(f"base: {base} was pre-trained without prompt dropout, so it has no unconditional "
                         "prediction for true CFG to guide against: pass true_cfg_scale=1 or rebuild the base")  # fmt: skip
    cfg.base = str(base)
    cfg.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    if cfg.reuse_trained:  # refuse now, not after hours of training the models that are missing
        for variant in cfg.variants:
            for seed in cfg.seeds:
                trained_lora(cfg, variant, seed)
    ensure_ray(min_cpus=cfg.concurrent_models * cfg.num_workers * cfg.cpus_per_worker + 2)

    held = held_out_subjects(cfg)
    data = write_toy_subject200k(ToyDataConfig(output=str(out / "data"), rows=cfg.rows, seed=cfg.seed, overwrite=True,
                                               hold_out=tuple(s.item for s in held)))  # fmt: skip
    # Pre-encoded once (fp32, the sizes training uses): every stage of every model then skips the VAE
    # and text encoders; a variant trained at another reference size (compaction) reads the images.
    encoder = EncoderConfig(condition_size=64, condition_prompt_max_tokens=CONDITION_PROMPT_TOKENS,
                            prompt_max_tokens=PROMPT_TOKENS, storage_dtype="float32")  # fmt: skip
    build_shards(DataBuildConfig(input=str(data), output=str(out / "shards"), geometry=PanelGeometry(scale=0.125),
                                 diptych_size=(128, 64), seed=cfg.seed, overwrite=True, quiet=True, encode=True,
                                 encode_model=str(base), encoder=encoder))  # fmt: skip
    timing = {"data_s": round(time.perf_counter() - started, 1)}

    cases = evaluation_cases(cfg)
    reused: list[str] = []
    results: dict[str, list[dict]] = {}
    samples: dict[str, list[Image.Image]] = {}
    # The untrained base (full routing, no LoRA): shape-only prompt, subjects in words, references attached.
    untrained = MUSARPipeline.from_pretrained(base, config=musar_config(cfg, "full"))
    for name, kwargs in ((BASE, dict(with_subjects=False)), (BASE_TEXT, dict(with_subjects=False, described=True)),
                         (BASE_REFS, {})):  # fmt: skip
        table, images = evaluate(untrained, cases, cfg, **kwargs)
        results[name], samples[name] = [table], images
    copy = None
    if cfg.copy_prior_pairs:
        from .copy_prior import copy_prior, pair_cases

        tick = time.perf_counter()
        copy = copy_prior(untrained, pair_cases(cfg.copy_prior_pairs, seed=cfg.seed), steps=cfg.inference_steps,
                          true_cfg_scale=cfg.true_cfg_scale, seed=cfg.seed)  # fmt: skip
        timing["copy_prior_s"] = round(time.perf_counter() - tick, 1)
        print(f"[toy study] base copy prior: {_copy_line(copy)}", flush=True)
    jobs = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            lora = trained_lora(cfg, variant, seed) if cfg.reuse_trained else None
            if lora is not None:
                reused.append(f"{variant}-seed{seed}")
                print(f"[toy study] {variant} seed {seed}: reusing {lora}", flush=True)
            jobs.append((variant, seed, lora))

    def report_model(job, result):
        print(f"[toy study] {job[0]} seed {job[1]}: " + ", ".join(
            f"n={n}: fidelity {t['fidelity']:.2f} entanglement {t['entanglement']:.2f}" for n, t in result[0].items()),
            flush=True)  # fmt: skip

    print(f"[toy study] {len(jobs)} models, {cfg.concurrent_models} at a time", flush=True)
    done = train_and_judge_all(cfg, jobs, out / "shards", cases, on_done=report_model)
    for variant, seed, _ in jobs:  # in config order, whatever order they finished in
        table, images, train_s = done[variant, seed]
        results.setdefault(variant, []).append(table)
        samples.setdefault(variant, images)
        if train_s is not None:
            timing[f"train_{variant}_seed{seed}_s"] = train_s
    timing["total_s"] = round(time.perf_counter() - started, 1)

    markdown = table_markdown(results)
    sheet = figure(cases, samples, cfg.figure_cases)
    out.mkdir(parents=True, exist_ok=True)
    sheet.save(out / "samples.png")
    report = [
        "# Toy-scale MUSAR study", "",
        f"Base: `{base}` ({base_info.get('total_steps', base_info.get('steps_done', '?'))} pretraining steps, "
        f"{base_info.get('timing_s', {}).get('total_s', '?')} s). Study (base excluded): {timing['total_s']:.0f} s.",
        f"Training: stage steps {list(cfg.stage_steps)}, micro-batch {cfg.micro_batch_size}, lr {cfg.lr}, timestep shift "
        f"{cfg.timestep_shift}, RoPE scheme {cfg.rope_scheme}, diptych routes {cfg.diptych_routes}, LoRA ranks "
        f"{cfg.subject_rank}/{cfg.noise_rank}, seeds {list(cfg.seeds)}, {cfg.concurrent_models} model(s) at a time on "
        f"{cfg.num_workers * cfg.cpus_per_worker} thread(s) each"
        + (f"; reused from an earlier run, not trained again: {', '.join(reused)}" if reused else "") + "."
        f" Evaluation: {cfg.eval_cases} cases per subject "
        f"count x {cfg.eval_seeds} seeds, {cfg.held_out} held-out subjects, {cfg.inference_steps} steps, true CFG "
        f"scale {cfg.true_cfg_scale} (negative: the empty prompt, no subjects); routing phrase {cfg.routing_phrase}, "
        f"routes from {'every block' if cfg.routes_from_layer is None else f'block {cfg.routes_from_layer}'}, "
        "condition prompt the item as in the training data.", "",
        *([f"Base copy prior (`toystudy.copy_prior`, {copy['pairs']} pair prompts: left panel described, right "
           f"named by its shape): {_copy_line(copy)}.", ""] if copy else []),
        "Fidelity: a requested subject found with its shape, colour and pattern; entanglement: found with its shape "
        "but another requested subject's colour or pattern (`toystudy.measure`). Mean ± sd over training seeds.", "",
        markdown, "",
        "Placed: a requested subject present (as above) *and* at the third of the frame its location words "
        "name. References are drawn centred on white, so a model that pastes its reference scores fidelity "
        "but rarely this.", "", placed_markdown(results), "",
        "Routing: of the target tokens inside one requested subject's box (the prompt's placement), the share "
        "that dynamic routing sent to that subject's reference, over every denoising step and block (chance: "
        "1/2 and 1/3). *On drawn*: the same inside the box of the object the measure matched to each subject "
        "(what was drawn, wherever it was). *Misbound to partner*: of the tokens of misbound objects (see the "
        "split below), the share routed to the partner whose look they carry. Models without dynamic routing "
        "have no row.", "", routing_markdown(results), "",
        "Leaks: entanglement beside its chance level, the same outcomes judged against the subjects of "
        "other cases as partners (`measure.chance_entanglement`): entanglement above it is what the requested "
        "partners caused. Then the swap probe (`toystudy.swap_probe`), 2-subject cases generated again with "
        "the same noise and the second reference swapped for a twin (same shape, a colour and pattern no "
        "subject has): *follows*, the first subject newly carries the twin's colour or pattern; *drifts*, "
        "newly carries the decoy's (another unused pair, which no reference had: the null for follows); "
        "*twin present*, the second subject drawn as the twin. Last, 2-subject fidelity of the first and "
        "the second subject apart.", "", leak_markdown(results), "",
        "Entanglement, split (`measure.entanglement_kind`): a *leak* is an entangled subject whose source "
        "partner (the one whose colour or pattern it carries) is drawn too, by its own shape: two subjects, "
        "features mixed. *Misbound*: no source partner is drawn, so the object with this subject's shape and "
        "the partner's look may be the partner drawn with the wrong shape. Leak and misbound sum to "
        "entanglement; *all shapes drawn* is the share of cases with every requested shape found.", "",
        split_markdown(results), "",
        "![samples](samples.png)", "",
        "Figure: per row the references, then one sample per model (columns: " + ", ".join(samples) + ").", "",
        f"Timing (s): `{json.dumps(timing)}`", *([f"Notes: {cfg.notes}"] if cfg.notes else []), "",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(report))
    saved = {"results": {k: [{str(n): t for n, t in r.items()} for r in v] for k, v in results.items()},
             "copy_prior": copy,
             "timing_s": timing, "config": asdict(cfg)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(saved, indent=1))
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name="toy-study"):
        mlflow.log_params({k: str(v)[:500] for k, v in to_dict(cfg).items()})
        for name, runs in results.items():
            key = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")  # MLflow metric names: no commas
            for n in (1, 2, 3):
                mlflow.log_metric(f"{key}.fidelity_{n}", statistics.mean(r[n]["fidelity"] for r in runs))
                mlflow.log_metric(f"{key}.entanglement_{n}", statistics.mean(r[n]["entanglement"] for r in runs))
                for extra in ("placed", "routing", "entanglement_chance", "swap_follows", "swap_drifts", "twin_present",
                              "entanglement_leak", "entanglement_misbound", "shapes_drawn", "routing_drawn",
                              "routing_misbound"):  # fmt: skip
                    if all(r[n].get(extra) is not None for r in runs):
                        mlflow.log_metric(f"{key}.{extra}_{n}", statistics.mean(r[n][extra] for r in runs))
        for k, v in (copy or {}).items():
            if k != "pairs" and v is not None:  # None: no left panel was right
                mlflow.log_metric(f"base.copy_prior_{k}", v)
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifact(str(out / "samples.png"))
        mlflow.log_artifact(str(out / "results.json"))
    print(f"[toy study] report: {out / 'report.md'} ({timing['total_s']:.0f} s)\n\n{markdown}", flush=True)
    return out / "report.md"
