"""The detection task of ``q2ext demo --task det``: procedural scenes, an FPN + PAN
CenterNet-style detector with four fusion nodes, COCO mAP scoring."""
from .task import DetConfig, DetTask

__all__ = ["DetConfig", "DetTask"]
