"""Models whose hidden widths can be masked by a capacity fraction."""

from fedjax_tl.models.base import LayerSpec, ModelDef, build_model

__all__ = ["LayerSpec", "ModelDef", "build_model"]
