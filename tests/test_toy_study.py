"""The toy study's short version: every variant trained through the real jobs, judged, tabulated."""

import dataclasses
import json
from pathlib import Path

import mlflow
import pytest

from toystudy.base import ToyBaseConfig, build_toy_base
from toystudy.study import DEFAULT_VARIANTS, StudyConfig, evaluation_cases, run_study

pytestmark = pytest.mark.slow


def test_evaluation_cases_name_distinct_shapes_of_held_out_subjects(tmp_path):
    cfg = StudyConfig(output=str(tmp_path), eval_cases=5)
    cases = evaluation_cases(cfg)
    assert [len(c.subjects) for c in cases] == [1] * 5 + [2] * 5 + [3] * 5
    assert all(len({s.shape for s in c.subjects}) == len(c.subjects) for c in cases)
    assert cases == evaluation_cases(cfg)  # fixed before any run
    assert "colour" not in cases[-1].prompt and all(p in cases[-1].prompt for p in cases[-1].phrases)
    with pytest.raises(ValueError, match="unknown variants"):
        StudyConfig(variants=("full", "no_routing"))
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
        StudyConfig(true_cfg_scale=0.0)
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        StudyConfig(timestep_shift=0.0)
    with pytest.raises(ValueError, match="rope_scheme must be one of"):
        StudyConfig(rope_scheme="shared")
    with pytest.raises(ValueError, match="diptych_routes must be one of"):
        StudyConfig(diptych_routes="random")
    with pytest.raises(ValueError, match="routing_phrase must be one of"):
        StudyConfig(routing_phrase="colour")
    with pytest.raises(ValueError, match="copy_prior_pairs must be >= 0"):
        StudyConfig(copy_prior_pairs=-1)
    with pytest.raises(ValueError, match="concurrent_models must be >= 1"):
        StudyConfig(concurrent_models=0)


def test_references_route_by_the_words_that_place_each_subject(tmp_path):
    """Each reference names its place in the prompt for routing, and the item as training wrote it."""
    from musar_core.subjects import phrase_char_span

    case = evaluation_cases(StudyConfig(output=str(tmp_path), eval_cases=2))[-1]
    refs = case.references("shape+location")
    assert [r.phrase for r in refs] == [f"{ph} {p.location}" for ph, p in zip(case.phrases, case.placements)]
    assert [r.prompt for r in refs] == [s.shape.capitalize() for s in case.subjects]  # the condition prompt
    spans = [phrase_char_span(case.prompt, r) for r in refs]  # each found once, in the prompt's order
    assert all(case.prompt[a:b] == r.phrase for (a, b), r in zip(spans, refs))
    assert [r.phrase for r in case.references("shape")] == case.phrases
    assert refs[0].image.size == (64, 64)


def test_each_variant_switches_exactly_its_core_switches():
    from toystudy.study import VARIANTS, musar_config

    full = musar_config(StudyConfig(), "full")
    switches = ("static_routing", "dynamic_routing", "shared_lora", "condition_compaction")
    for name, spec in VARIANTS.items():
        cfg = musar_config(StudyConfig(), name)
        changed = {k for k in switches if getattr(cfg, k) != getattr(full, k)}
        assert changed == set(spec["musar"]), name
    # no_bias_mitigation is exactly no_static + shared_lora
    assert VARIANTS["no_bias_mitigation"]["musar"] == {**VARIANTS["no_static"]["musar"], **VARIANTS["shared_lora"]["musar"]}


def test_study_refuses_true_cfg_on_a_base_without_prompt_dropout(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    (base / "toy_base.json").write_text(json.dumps({"config": {"prompt_dropout": 0.0}}))
    with pytest.raises(ValueError, match="pre-trained without prompt dropout"):
        run_study(StudyConfig(base=str(base), output=str(tmp_path / "study"), true_cfg_scale=3.0))


def test_reuse_trained_refuses_a_model_trained_with_other_settings(tmp_path):
    from toystudy.study import TRAINED_RECORD, trained_lora, training_settings

    cfg = StudyConfig(base=str(tmp_path / "base"), output=str(tmp_path / "study"))
    assert trained_lora(cfg, "full", 0) is None  # nothing trained yet
    root = tmp_path / "study" / "train" / "full-seed0"
    (root / "stage3" / "lora").mkdir(parents=True)
    (root / TRAINED_RECORD).write_text(json.dumps({"settings": training_settings(cfg, "full", 0), "lora": "stage3/lora"}))
    assert trained_lora(cfg, "full", 0) is None  # recorded, but no LoRA there
    (root / "stage3" / "lora" / "musar_lora.json").write_text("{}")
    assert trained_lora(cfg, "full", 0) == root / "stage3" / "lora"
    assert trained_lora(dataclasses.replace(cfg, eval_cases=8, routes_from_layer=None), "full", 0) is not None  # judging only
    with pytest.raises(ValueError, match=r"other settings \(lr=0.001, stage_steps=\[600, 150, 150\]; now lr=0.0001"):
        trained_lora(dataclasses.replace(cfg, lr=1e-4, stage_steps=(60, 30, 30)), "full", 0)
    with pytest.raises(ValueError, match="routes_from_layer not recorded"):  # with attention routes it shapes training
        trained_lora(dataclasses.replace(cfg, diptych_routes="attention"), "full", 0)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "toy_base.json").write_text('{"steps_done": 10}')  # a base rebuilt in the same folder
    with pytest.raises(ValueError, match="base_record_sha256"):
        trained_lora(cfg, "full", 0)
    (root / TRAINED_RECORD).write_text('{"settings": {')  # a record cut short is no finished training
    assert trained_lora(cfg, "full", 0) is None


def test_models_to_train_start_before_models_only_rejudged():
    from toystudy.study import schedule

    lora = Path("outputs/some/lora")
    jobs = [("full", 0, lora), ("full", 1, None), ("no_dynamic", 0, lora), ("no_dynamic", 1, None), ("no_diptych", 0, None)]
    assert schedule(jobs) == [("full", 1, None), ("no_dynamic", 1, None), ("no_diptych", 0, None), ("full", 0, lora),
                              ("no_dynamic", 0, lora)]  # fmt: skip
    assert schedule([]) == []


@pytest.mark.timeout(120)
def test_concurrent_models_raise_the_first_failure_with_its_own_error(tmp_path, ray_local):
    """A model that fails in its Ray task fails the study with its own error type and message."""
    from toystudy.study import train_and_judge_all

    cfg = StudyConfig(base=str(tmp_path / "no-base"), output=str(tmp_path / "study"), concurrent_models=2,
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    finished = []
    jobs = [("full", 0, None), ("full", 1, None), ("no_dynamic", 0, None)]
    with pytest.raises(FileNotFoundError, match="is not a FLUX.1 diffusers folder"):
        train_and_judge_all(cfg, jobs, tmp_path / "shards", [], on_done=lambda job, result: finished.append(job))
    assert finished == []


@pytest.mark.timeout(900)  # ten short Ray Train stages: about 250 s on an idle 2-core machine
def test_short_study_produces_the_table(tmp_path, ray_local, monkeypatch, capsys):
    base = build_toy_base(ToyBaseConfig(output=str(tmp_path / "base"), scenes=24, vae_steps=2, vae_batch=4, steps=2,
                                        batch=4, log_every=1, time_budget_min=None))  # fmt: skip
    cfg = StudyConfig(base=str(base), output=str(tmp_path / "study"), seeds=(0,), rows=24, held_out=6,
                      stage_steps=(1, 1, 1), micro_batch_size=2, eval_cases=1, eval_seeds=1, inference_steps=2,
                      copy_prior_pairs=2, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    report = run_study(cfg)
    text = report.read_text()
    main, rest = text.split("\nPlaced: ")
    placed, routing = rest.split("\nRouting: ")
    routing, leaks = routing.split("\nLeaks: ")
    leaks, split = leaks.split("\nEntanglement, split ")
    names = ["base (untrained)", "base, subjects described in words", "base + references, no MUSAR training",
             *DEFAULT_VARIANTS]
    for table in (main, placed, leaks, split):  # fidelity/entanglement, placed, leak and split tables: the same rows
        rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
        assert [r.split(" | ")[0][2:] for r in rows] == names
    routed = [line.split(" | ")[0][2:] for line in routing.splitlines() if line.startswith("| ") and "model" not in line]
    assert routed == ["base + references, no MUSAR training", "full", "no_diptych", "no_bias_mitigation"]  # no_dynamic: none
    results = json.loads((report.parent / "results.json").read_text())["results"]
    for name, runs in results.items():
        assert all(set(run) == {"1", "2", "3"} for run in runs), name
        swapped = name not in ("base (untrained)", "base, subjects described in words")  # the runs with references
        assert all(("swap_follows" in run["2"]) == swapped and "swap_follows" not in run["3"] for run in runs), name
        assert all(run["2"]["entanglement_chance"] is None for run in runs)  # one case per subject count
        assert all(0 <= run[n]["fidelity"] <= 1 and 0 <= run[n]["placed"] <= run[n]["fidelity"] for run in runs for n in run)
        assert all(run[n]["entanglement_leak"] + run[n]["entanglement_misbound"] == pytest.approx(run[n]["entanglement"])
                   for run in runs for n in ("2", "3"))  # fmt: skip
        assert all("routing_drawn" not in run["2"] or "routing" in run["2"] for run in runs), name  # routed models only
    assert (report.parent / "samples.png").is_file()
    assert f"true CFG scale {cfg.true_cfg_scale}" in text and "routes from block 0" in text
    assert "seeds [0], 2 model(s) at a time on 1 thread(s) each" in text  # the defaults: two Ray tasks
    assert "Base copy prior (`toystudy.copy_prior`, 2 pair prompts" in text
    saved = json.loads((report.parent / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    copy = saved["copy_prior"]
    assert copy["pairs"] == 2 and 0 <= copy["copied"] <= min(copy["same_colour"], copy["same_pattern"]) <= 1
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("musar-toy-study").experiment_id],
                              filter_string="attributes.run_name = 'toy-study'")  # fmt: skip
    assert len(runs) == 1
    assert {"full.fidelity_2", "full.placed_2", "full.routing_3", "base.copy_prior_copied", "full.swap_follows_2",
            "full.twin_present_2", "full.entanglement_chance_1", "full.entanglement_leak_2", "full.shapes_drawn_3",
            "full.entanglement_misbound_3"} <= set(runs[0].data.metrics)  # fmt: skip
    assert "full.entanglement_chance_2" not in runs[0].data.metrics  # None: one case, no null
    assert "no_dynamic.routing_2" not in runs[0].data.metrics
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_study(cfg)
    # Re-judged with other evaluation settings, one model at a time in this process: every model is
    # reused, none trained again.
    capsys.readouterr()
    again = run_study(dataclasses.replace(cfg, reuse_trained=True, overwrite=True, routes_from_layer=None,
                                          concurrent_models=1))  # fmt: skip
    assert capsys.readouterr().out.count("reusing ") == len(DEFAULT_VARIANTS)
    text = again.read_text()
    assert "routes from every block" in text and "not trained again: full-seed0, no_diptych-seed0" in text
    assert not any(k.startswith("train_") for k in json.loads((again.parent / "results.json").read_text())["timing_s"])
    _diptych_routing_benchmark_reads_the_study_shards(base, tmp_path / "study" / "shards", monkeypatch, capsys)


def _diptych_routing_benchmark_reads_the_study_shards(base, shards, monkeypatch, capsys):
    """benchmarks/diptych_routing.py on the short study's encoded diptychs: one row per t, shares in [0, 1]."""
    import runpy
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "diptych_routing.py")
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", [script, "--base", str(base), "--shards", str(shards), "--samples", "2", "--t", "0.5", "0.9"])
    runpy.run_path(script, run_name="__main__")
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| 0.5 |", "| 0.9 |"))]
    assert len(rows) == 2 and all(0 <= float(v) <= 1 for r in rows for v in r.strip("| ").split(" | ")[1:])
    monkeypatch.setattr("sys.argv", [script, "--base", str(base), "--shards", str(shards.parent / "nowhere")])
    with pytest.raises(SystemExit):  # no encoded shards there
        runpy.run_path(script, run_name="__main__")


def test_study_concurrency_benchmark_refuses_bad_input(tmp_path, monkeypatch, capsys):
    """benchmarks/study_concurrency.py stops before Ray starts on a bad count or shards without encoded/."""
    import runpy
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "study_concurrency.py")
    for extra, message in ((["--models", "0"], "must be >= 1"), ([], "no encoded shards")):
        monkeypatch.setattr("sys.argv", [script, "--base", str(tmp_path), "--shards", str(tmp_path), *extra])
        with pytest.raises(SystemExit):
            runpy.run_path(script, run_name="__main__")
        assert message in capsys.readouterr().err
