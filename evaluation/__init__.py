"""DreamBench evaluation of MUSAR: single- and multi-subject cases, Ray Data generation over model
actors (resumable), DINO / CLIP-I / CLIP-T, one MLflow run per evaluation with a report beside the
paper's Table 1.

Entry points: ``python jobs/eval_dreambench.py --config eval.yaml`` or ``musar eval``
(:class:`evaluation.run.EvalConfig`, :func:`evaluation.run.run_eval`). This package imports Ray only
inside the functions that run on it.
"""
