"""erase: remove concepts from Stable Diffusion UNets by editing weights.

    import erase
    pipe = erase.load_pipeline("mini")
    result = erase.erase(pipe, ["van gogh", "nudity"], method="fia", r2=0.02)
    result.save("runs/vg")
    report = erase.evaluate(pipe, result)
    attacked = erase.attack(pipe, result)    # adversarial recovery: attack success rate per concept
    erase.evaluate_protocol(pipe, result, "i2p", "runs/vg/i2p", prompts="i2p.csv")  # a field protocol

The public names load on first use (PEP 562), so `erase-concepts --version`, a bad option or Ctrl-C during
start-up answers before torch is imported.
"""

import importlib

_PUBLIC = {"attack": "attacks", "EraseResult": "api", "erase": "api", "Concept": "concepts", "load_catalog": "concepts",
           "MaskEdit": "edits", "fingerprint": "edits", "EraseError": "errors", "evaluate": "evaluation",
           "apply_patch": "export", "read_patch": "export", "METHODS": "methods", "clip_tokenizer": "models",
           "load_pipeline": "models", "evaluate_protocol": "protocols", "PROTOCOLS": "protocols"}

__version__ = "0.1.0"
__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    try:  # erase.edits, erase.training, ...: submodules, as an eager package would have them
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return __all__
