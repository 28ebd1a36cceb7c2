"""erase: remove concepts from Stable Diffusion UNets by editing weights.

    import erase
    pipe = erase.load_pipeline("mini")
    result = erase.erase(pipe, ["van gogh", "nudity"], method="fia", r2=0.02)
    result.save("runs/vg")
    report = erase.evaluate(pipe, result)
"""

from .api import EraseResult, erase
from .concepts import Concept, load_catalog
from .edits import MaskEdit, fingerprint
from .errors import EraseError
from .evaluation import evaluate
from .export import apply_patch, read_patch
from .methods import METHODS
from .models import clip_tokenizer, load_pipeline

__version__ = "0.1.0"
__all__ = ["Concept", "EraseError", "EraseResult", "METHODS", "MaskEdit", "apply_patch", "clip_tokenizer", "erase",
           "evaluate", "fingerprint", "load_catalog", "load_pipeline", "read_patch", "__version__"]
