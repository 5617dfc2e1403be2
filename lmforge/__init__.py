"""lmforge: a language model's whole life in one PyTorch package.

    import lmforge
    llm = lmforge.load("preset:teenygpt")       # or a model folder, a .gguf file, "smollm2"
    print(llm.generate("to be or not", max_new_tokens=40, temperature=0.8, seed=0))
"""

from lmforge.config import Config
from lmforge.llm import LLM, load
from lmforge.presets import get_preset, list_presets
from lmforge.version import __version__

__all__ = ["Config", "LLM", "get_preset", "list_presets", "load", "serve", "__version__"]


def __getattr__(name: str):
    # `lmforge.serve(llm, host, port)`: the serving package, callable; imported on first use only
    if name == "serve":
        import importlib

        return importlib.import_module("lmforge.serve")
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
