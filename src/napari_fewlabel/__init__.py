"""napari-fewlabel: annotation-efficient segmentation of MRI and CT.

The package is a headless library (``io``, ``data``, ``models``, ``losses``,
``train``, ``infer``) with a CLI (``fewlabel``) and a napari plugin
(``napari_fewlabel.napari``) on top. Nothing outside ``napari/`` imports
napari or Qt.
"""

from __future__ import annotations

__version__ = "0.1.0"

from napari_fewlabel.errors import FewLabelError

__all__ = ["FewLabelError", "__version__"]
