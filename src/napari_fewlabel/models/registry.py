"""Named models: shipped with the package, installed by the user, or any path.

``resolve_model("cardiac-mr")`` looks for ``cardiac-mr.safetensors`` in the
user's model folder (:func:`user_model_dir`, e.g.
``~/.local/share/napari-fewlabel/models`` on Linux) first, so a user can
replace a shipped model, then in the package's ``models/weights/`` folder.
Anything that is an existing file path is used as it is.

:func:`default_encoder` names the pretrained encoder fine-tuning starts from
when the user gives no model (one of the shipped encoders, see
``docs/model-cards/``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Modality
from napari_fewlabel.models.card import STATE_SUFFIX, is_encoder_only, read_card

#: Starter weights that ship inside the package.
SHIPPED_MODEL_DIR = Path(__file__).parent / "weights"
MODEL_SUFFIX = ".safetensors"
#: The shipped encoder fine-tuning starts from: IDEAL's, which beat a random start and
#: med-moco's on the real tumour target of benchmarks/pretraining.py (docs/benchmarks.md).
DEFAULT_ENCODER = "ideal-encoder"


def user_model_dir() -> Path:
    """The folder for the user's own named models (may not exist yet)."""
    return Path(platformdirs.user_data_dir("napari-fewlabel")) / "models"


@dataclass(frozen=True)
class ModelEntry:
    """A named model file.

    Attributes
    ----------
    name : str
        File name without ``.safetensors``.
    path : Path
    source : {"user", "shipped"}
    """

    name: str
    path: Path
    source: Literal["user", "shipped"]


def list_models() -> list[ModelEntry]:
    """All named models, user folder first, each folder sorted by name."""
    entries: list[ModelEntry] = []
    for source, folder in (("user", user_model_dir()), ("shipped", SHIPPED_MODEL_DIR)):
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
                if path.name.endswith(STATE_SUFFIX):  # a job's resume state, not a model
                    continue
                entries.append(ModelEntry(path.name[: -len(MODEL_SUFFIX)], path, source))  # type: ignore[arg-type]
    return entries


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """The checkpoint file for a model name or a path.

    Raises
    ------
    FewLabelError
        When it is neither an existing file nor a known name; the message lists
        the names there are.
    """
    as_path = Path(name_or_path).expanduser()
    if as_path.is_file():
        return as_path
    name = str(name_or_path)
    if name.endswith(MODEL_SUFFIX):
        name = name[: -len(MODEL_SUFFIX)]
    for entry in list_models():
        if entry.name == name:
            return entry.path
    known = ", ".join(sorted({e.name for e in list_models()})) or "none installed yet"
    raise FewLabelError(
        f"No model file or named model {str(name_or_path)!r}. Known names: {known}. "
        f"Give a path to a .safetensors file, or copy one into {user_model_dir()}."
    )


def default_encoder(modality: Modality) -> Path | None:
    """The pretrained encoder to fine-tune a ``modality`` scan from, or None for random init.

    :data:`DEFAULT_ENCODER` (a user's model of that name replaces the shipped
    one), provided it is a pretrained encoder that has seen scans of this
    modality: pretraining normalises every scan by its own modality (as
    fine-tuning does), so an encoder pretrained on MR and CT (card modality
    ``"unknown"``) serves both, and one pretrained on MR only is not offered
    for CT.
    """
    try:
        path = resolve_model(DEFAULT_ENCODER)
        card = read_card(path)
    except FewLabelError:
        return None
    if not is_encoder_only(card):
        return None
    if card.modality not in ("unknown", modality) and modality != "unknown":
        return None
    return path
