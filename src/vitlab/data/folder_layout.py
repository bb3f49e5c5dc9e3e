"""Facts of ImageNet's folder layout shared by its reader (``vitlab.data.imagenet``) and the packer
(``vitlab.data.pack``), which must not import each other."""
from __future__ import annotations

from pathlib import Path

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def has_image_suffix(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def read_synset_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable class names from ImageNet's ``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca")
    next to train/ (or one level up); the wnids themselves where there is none."""
    for path in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if path.is_file():
            mapping = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
            return [mapping.get(w, w).split(",")[0].strip() for w in wnids]
    return list(wnids)
