"""Which kind of model folder a path is, from the file that describes it (nothing heavy is imported here, so a
command can answer a wrong path before loading torch's model libraries)."""

from __future__ import annotations

from pathlib import Path

# The embedded default: the shapes domain's APTP bundle, what `aptp serve` and `aptp generate` use unless told.
DEFAULT_BUNDLE = Path("bundles/shapes/aptp")
# The describing file of each kind of folder a bundle path may name.
KINDS = {"bundle": "manifest.json", "teacher": "teacher.json", "pipeline": "model_index.json"}


def folder_kind(path: str | Path) -> str | None:
    """`bundle`, `teacher` or `pipeline` (a bundle's manifest wins), or None."""
    return next((kind for kind, name in KINDS.items() if (Path(path) / name).is_file()), None)


def not_a_model_folder(path: str | Path) -> str:
    """What to say of a path that is none of the kinds."""
    path = Path(path)
    if not path.exists():
        return f"{path}: no such folder"
    looked = ", ".join(f"a {kind} ({name})" for kind, name in KINDS.items())
    return f"{path}: not {looked.replace(', a pipeline', ' or a diffusers pipeline')} folder"
