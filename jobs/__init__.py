"""Thin entry points for `ray job submit` (training stages, evaluation, data builds)."""
