"""Where a job's ``model`` setting points: the embedded tiny model, or a local FLUX.1 diffusers folder."""

from __future__ import annotations

from pathlib import Path


def resolve_flux_dir(model: str) -> Path:
    """``"tiny"`` builds (once) and returns the embedded tiny random model; anything else must be a FLUX folder."""
    if model == "tiny":
        from musar_core.tiny import tiny_flux_dir

        return tiny_flux_dir()
    path = Path(model).expanduser().resolve()
    if not (path / "model_index.json").is_file() or not (path / "transformer").is_dir():
        raise FileNotFoundError(f"model: {path} is not a FLUX.1 diffusers folder (model_index.json, transformer/)")
    return path
