"""The field's evaluation protocols: numbers that sit beside the papers' (docs/evaluation.md, protocols).

A registry of protocols, one file each (as erase/methods and erase/attacks): a protocol's class names the samples it
generates (prompt, seed, guidance) and scores their images (i2p: NudeNet's exposed-class counts; imagenette: a
ResNet-50's top-1; coco: CLIP score and FID; prompts: the CLIP judge and NudeNet). erase/protocols/core.py does the
rest for every protocol: the images of both models, sharded over the processes of a launch and resumable from a
manifest, and the report.
"""

from __future__ import annotations

from ..registry import Registry

PROTOCOLS = Registry("protocol")
register = PROTOCOLS.register
get_protocol = PROTOCOLS.lookup

from . import coco, i2p, imagenette, prompts  # noqa: E402, F401  (registration)
from .core import ProtocolReport, ProtocolSettings, evaluate_protocol  # noqa: E402

__all__ = ["PROTOCOLS", "ProtocolReport", "ProtocolSettings", "evaluate_protocol", "get_protocol"]
