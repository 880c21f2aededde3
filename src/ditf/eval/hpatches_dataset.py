"""HPatches sequences: the loader and the list of the 108 sequences DIFT and D2-Net evaluate.

Layout of the official release (hpatches-sequences-release.tar.gz):

    hpatches-sequences-release/
      i_<name>/   illumination changes (near-identity homographies)
      v_<name>/   viewpoint changes
        1.ppm .. 6.ppm   images; image 1 is the reference
        H_1_2 .. H_1_6   3x3 text matrices mapping image-1 pixels (x, y) to image-k pixels

The benchmark pairs image 1 with each image k = 2..6 of every sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.keypoints import image_size

HPATCHES_URL = "http://icvl.ee.ic.ac.uk/vbalnt/hpatches/hpatches-sequences-release.tar.gz"
HOW_TO_GET_HPATCHES = (
    f"Get HPatches from the official release {HPATCHES_URL} (see https://github.com/hpatches/hpatches-dataset), "
    "extract it and pass the hpatches-sequences-release folder; D2-Net's hpatches_sequences/download.sh "
    "(github.com/mihaidusmanu/d2-net) does both and drops the 8 high-resolution sequences"
)
RELEASE_FOLDER = "hpatches-sequences-release"
IMAGE_INDICES = (1, 2, 3, 4, 5, 6)
TARGET_INDICES = (2, 3, 4, 5, 6)

# The 116-sequence release minus the 8 with images larger than 1600x1200, which D2-Net's
# hpatches_sequences/download.sh deletes (github.com/mihaidusmanu/d2-net @0a3356c). DIFT's README
# downloads HPatches with that script and evaluates every folder left, so these are DIFT's too.
HIGH_RESOLUTION_SEQUENCES = tuple(
    "i_contruction i_crownnight i_dc i_pencils i_whitebuilding v_artisans v_astronautis v_talent".split()
)
# The 108 that remain, as listed in d2-net's image_list_hpatches_sequences.txt (same commit): 52 i_, 56 v_.
STANDARD_SEQUENCES = tuple(
    """
    i_ajuntament i_autannes i_bologna i_books i_boutique i_bridger i_brooklyn i_castle i_chestnuts
    i_crownday i_dome i_duda i_fenis i_fog i_fruits i_gonnenberg i_greenhouse i_greentea i_indiana
    i_kions i_ktirio i_kurhaus i_leuven i_lionday i_lionnight i_londonbridge i_melon i_miniature
    i_nescafe i_nijmegen i_nuts i_objects i_parking i_partyfood i_pinard i_pool i_porta i_resort
    i_salon i_santuario i_school i_ski i_smurf i_steps i_table i_tools i_toy i_troulos i_veggies
    i_village i_yellowtent i_zion
    v_abstract v_adam v_apprentices v_azzola v_bark v_bees v_beyus v_bip v_bird v_birdwoman
    v_blueprint v_boat v_bricks v_busstop v_calder v_cartooncity v_charing v_churchill v_circus
    v_coffeehouse v_colors v_courses v_dirtywall v_dogman v_eastsouth v_feast v_fest v_gardens
    v_grace v_graffiti v_home v_laptop v_london v_machines v_man v_maskedman v_pomegranate v_posters
    v_samples v_soldiers v_strand v_sunseason v_tabletop v_tempera v_there v_underground v_vitro
    v_wall v_wapping v_war v_weapons v_woman v_wormhole v_wounded v_yard v_yuri
    """.split()
)


class HPatchesSubsetWarning(UserWarning):
    """The evaluated sequences are not the 108 of the standard protocol: scores are not comparable
    to published numbers."""


@dataclass(frozen=True)
class HPatchesImage:
    """Image `index` (1..6) of `sequence`; `size` is (H, W) pixels, read from the file header."""

    sequence: str
    index: int
    path: Path
    size: tuple[int, int]


@dataclass(frozen=True)
class HPatchesPair:
    """Reference image 1 and image k of a sequence; `homography` (3, 3) float64 maps reference pixels
    (x, y) to target pixels (the release's H_1_k)."""

    reference: HPatchesImage
    target: HPatchesImage
    homography: np.ndarray
    homography_path: Path

    @property
    def name(self) -> str:
        """`<sequence>/<k>`, e.g. `v_bird/4`."""
        return f"{self.target.sequence}/{self.target.index}"


@dataclass(frozen=True)
class HPatchesSequence:
    """One sequence: its six images (index 1..6) and its five pairs (1, k), k = 2..6."""

    name: str
    images: tuple[HPatchesImage, ...]
    pairs: tuple[HPatchesPair, ...]

    @property
    def kind(self) -> str:
        """The sequence type: "i" (illumination) or "v" (viewpoint)."""
        return self.name[0]


@dataclass
class HPatchesDataset:
    """The sequences to evaluate, under `root` (the hpatches-sequences-release folder).

    `standard` is True when they are exactly the 108 sequences of DIFT's and D2-Net's protocol.
    """

    root: Path
    sequences: list[HPatchesSequence]

    @property
    def pairs(self) -> list[HPatchesPair]:
        """Every (1, k) pair, sequence by sequence."""
        return [pair for sequence in self.sequences for pair in sequence.pairs]

    @property
    def standard(self) -> bool:
        """True if the sequences are exactly STANDARD_SEQUENCES."""
        return sorted(sequence.name for sequence in self.sequences) == sorted(STANDARD_SEQUENCES)

    def describe(self) -> dict:
        """Name, root, counts and whether the set is the standard one, for the results JSON."""
        return {
            "name": "HPatches",
            "root": str(self.root),
            "sequences": len(self.sequences),
            "i_sequences": sum(sequence.kind == "i" for sequence in self.sequences),
            "v_sequences": sum(sequence.kind == "v" for sequence in self.sequences),
            "pairs": len(self.pairs),
            "standard": self.standard,
        }


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_sequence_name(name: str) -> bool:
    return name[:2] in ("i_", "v_")


def _release_folder(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"HPatches root {root} is not a directory. {HOW_TO_GET_HPATCHES}")
    nested = root / RELEASE_FOLDER
    has_sequences = any(_is_sequence_name(entry.name) for entry in root.iterdir() if entry.is_dir())
    return nested if not has_sequences and nested.is_dir() else root


def read_homography(path: Path) -> np.ndarray:
    """The (3, 3) float64 matrix of an H_1_k text file; DatasetError naming the file if it is not one."""
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DatasetError(
            f"homography file {path} is not a 3x3 matrix of numbers ({err}); re-extract the release"
        ) from err
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise DatasetError(
            f"homography file {path} holds a {'x'.join(map(str, matrix.shape))} matrix with "
            f"{'finite' if np.isfinite(matrix).all() else 'non-finite'} values; expected 3x3 finite numbers. "
            "Re-extract the release"
        )
    return matrix


def _choose(present: list[str], sequences: Iterable[str] | None, root: Path, require_all: bool) -> list[str]:
    if require_all:
        missing = [name for name in STANDARD_SEQUENCES if name not in present]
        if missing:
            raise DatasetError(
                f"HPatches root {root} lacks {len(missing)} of the 108 standard sequences: {_listing(missing)}. "
                f"{HOW_TO_GET_HPATCHES}"
            )
    if sequences is not None:
        chosen = list(dict.fromkeys(sequences))
        invalid = [name for name in chosen if not _is_sequence_name(name)]
        if invalid:
            raise InvalidArgumentError(f"HPatches sequence names start with i_ or v_, got {_listing(invalid)}")
        absent = [name for name in chosen if name not in present]
        if absent:
            raise DatasetError(
                f"HPatches root {root} has no sequence folder {_listing(absent)}; drop them from the requested "
                f"sequences or complete the dataset. {HOW_TO_GET_HPATCHES}"
            )
        return chosen
    if require_all:
        return list(STANDARD_SEQUENCES)
    excluded = [name for name in present if name in HIGH_RESOLUTION_SEQUENCES]
    if excluded:
        warnings.warn(
            f"HPatches root {root} holds the high-resolution sequences {_listing(excluded)}, which the protocol "
            "of D2-Net and DIFT leaves out; they are skipped (pass them as `sequences` to evaluate them)",
            HPatchesSubsetWarning,
            stacklevel=3,
        )
    return [name for name in present if name not in HIGH_RESOLUTION_SEQUENCES]


def _load_sequence(folder: Path) -> HPatchesSequence:
    images = tuple(
        HPatchesImage(folder.name, index, folder / f"{index}.ppm", image_size(folder / f"{index}.ppm"))
        for index in IMAGE_INDICES
    )
    pairs = tuple(
        HPatchesPair(images[0], images[k - 1], read_homography(folder / f"H_1_{k}"), folder / f"H_1_{k}")
        for k in TARGET_INDICES
    )
    return HPatchesSequence(folder.name, images, pairs)


def load_hpatches(
    root: str | Path, sequences: Iterable[str] | None = None, *, require_all: bool = False
) -> HPatchesDataset:
    """The HPatches sequences under `root` (the hpatches-sequences-release folder or its parent).

    By default every `i_*`/`v_*` sequence present is used except the 8 high-resolution ones the
    standard protocol drops; when the result is not the 108 standard sequences an
    `HPatchesSubsetWarning` says so (a subset still works). `sequences` picks sequences by name.
    `require_all=True` insists on the 108 standard sequences (and uses exactly them unless
    `sequences` is given). DatasetError names every missing image or H_1_k file and how to get HPatches.
    """
    root = _release_folder(Path(root))
    present = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and _is_sequence_name(entry.name))
    if not present:
        raise DatasetError(f"HPatches root {root} holds no i_*/v_* sequence folders. {HOW_TO_GET_HPATCHES}")
    chosen = _choose(present, sequences, root, require_all)
    expected = [f"{index}.ppm" for index in IMAGE_INDICES] + [f"H_1_{k}" for k in TARGET_INDICES]
    missing = [f"{name}/{entry}" for name in chosen for entry in expected if not (root / name / entry).is_file()]
    if missing:
        raise DatasetError(
            f"HPatches root {root} lacks {_listing(missing)} (each sequence needs 1.ppm..6.ppm and H_1_2..H_1_6); "
            f"the download is incomplete. {HOW_TO_GET_HPATCHES}"
        )
    dataset = HPatchesDataset(root, [_load_sequence(root / name) for name in chosen])
    if not dataset.standard:
        warnings.warn(
            f"evaluating {len(chosen)} HPatches sequences, not the 108 of the standard protocol (DIFT, D2-Net): "
            "accuracies are not comparable to published numbers; pass require_all=True to insist on the full set",
            HPatchesSubsetWarning,
            stacklevel=2,
        )
    return dataset
