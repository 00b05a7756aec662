"""Write docs/model-cards/<name>.md from the cards inside the shipped encoders.

    python scripts/write_model_cards.py

The card embedded in each ``.safetensors`` (written by the pretraining run
itself) is the source of truth; this renders it for people, so the two never
disagree. Run it after ``scripts/pretrain_shipped_encoders.sh``.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.models.registry import DEFAULT_ENCODER, SHIPPED_MODEL_DIR

OUT = Path(__file__).resolve().parents[1] / "docs" / "model-cards"


def render(path: Path) -> str:
    card = read_card(path)
    t = dict(card.training)
    arch = {k: v for k, v in card.architecture.items() if k != "num_classes"}
    scans = t.get("data", {}).get("scans", [])
    rows = "\n".join(
        f"| `{Path(s['path']).name}` | {s.get('modality', '?')} | {s.get('shape_zyx', '?')} | "
        f"{s.get('spacing_mm_zyx', '?')} | {s.get('slice_axes', '?')} |"
        for s in scans
    )
    default = (
        " It is the default starting point of fine-tuning." if path.stem == DEFAULT_ENCODER else ""
    )
    differences = "\n".join(f"- {d}" for d in t.get("differences_from_paper", [])) or "- none"
    size_mb = path.stat().st_size / 2**20
    return f"""# Model card: `{path.stem}`

A pretrained encoder shipped with napari-fewlabel (`{path.name}`, {size_mb:.1f} MB,
weights stored as {t.get("storage_dtype", "float32")}). It holds the encoder of the
fine-tuning network only: fine-tuning adds the two decoders and trains the
whole network on the user's labelled slices.{default}

- **Method**: {t.get("method")}
- **Made by**: `scripts/pretrain_shipped_encoders.sh` (napari-fewlabel {card.package_version})
- **Date**: {t.get("date")}
- **Hardware**: {t.get("hardware")}; device {t.get("device")}, {t.get("precision")}, {t.get("processes")} process(es)
- **Steps**: {t.get("steps_done")} of {t.get("global_batch")} slices ({t.get("train_seconds")} s)
- **Effective rank of the embeddings at the end**: {t.get("effective_rank")} (encoder),
  {t.get("effective_rank_projection", "n/a")} (projection)
- **Throughput**: {t.get("slices_per_s")} slices/s
- **Seed**: {t.get("seed")}

## Architecture

```json
{json.dumps(arch, indent=2)}
```

## Data

Real public scans (../shared/DATA.md); none of them is a volume that a
benchmark evaluates on (the MNI152 template, the ITK head T1, the InVesalius
head CT and pyradiomics lung1 are left out on purpose).
{t.get("data", {}).get("usable_slices", "?")} usable slices, fitted to
{t.get("data", {}).get("slice_size", "?")} px; normalisation: {t.get("data", {}).get("normalization", "?")}.

| scan | modality | shape (z, y, x) | spacing (mm) | slice axes sampled |
|---|---|---|---|---|
{rows}

## Where it departs from the paper

{differences}

## Intended use and limits

A starting point for few-slice fine-tuning of MRI and CT segmentation in
napari-fewlabel. It was pretrained for minutes on a few small public scans on
a CPU: a demonstration of the pipeline and a modest head start, not a
foundation model. `benchmarks/pretraining.py` measures what it adds
(docs/benchmarks.md); pretrain your own on your archive with
`fewlabel pretrain` (docs/pretraining.md). Not for clinical use.
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for path in sorted(SHIPPED_MODEL_DIR.glob("*-encoder.safetensors")):
        target = OUT / f"{path.stem}.md"
        target.write_text(render(path))
        print("wrote", target)


if __name__ == "__main__":
    main()
