"""RETOUCH cases on disk: finding case folders, telling their device vendor, reading one case.

The challenge distributes one archive per vendor and set, which extracts to
``RETOUCH-TrainingSet-<Vendor>/TRAINnnn/{oct,reference}.{mhd,raw}`` (labelled) and
``RETOUCH-TestSet-<Vendor>/TESTnnn/oct.{mhd,raw}`` (prediction only), sometimes inside one more folder
per archive (``TrainingCirrus/RETOUCH-TrainingSet-Cirrus/TRAIN001``). A case is any folder holding
``oct.mhd``, at any depth below ``root``; ``reference.mhd`` beside it makes it labelled.

The vendor of a case is the one its path names: the case folder, the folders between ``root`` and it,
or else ``root``'s own name (``Cirrus``, ``Spectralis`` or ``Topcon``, any letter case, e.g.
``RETOUCH-TrainingSet-Topcon`` or ``TRAIN_Cirrus_001``). A folder of one vendor whose path names none
(the shared ``retouch_like`` sample) takes the ``vendor`` option. A path naming two vendors, or one
other than ``vendor``, is an error: nothing is guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octlightning.data.formats.metaimage import Geometry, read_metaimage
from octlightning.data.io import require_utf8_name
from octlightning.errors import DataError

VENDORS = ("Cirrus", "Spectralis", "Topcon")
FLUIDS = ("IRF", "SRF", "PED")  # label values 1, 2, 3; 0 is background
_VENDOR_RE = re.compile("|".join(VENDORS), re.IGNORECASE)


@dataclass(frozen=True)
class RetouchCase:
    """One case folder on disk."""

    name: str
    folder: Path
    vendor: str
    oct_path: Path
    reference_path: Path | None

    @property
    def labelled(self) -> bool:
        return self.reference_path is not None


def canonical_vendor(value: str, what: str) -> str:
    """``value`` spelt as in :data:`VENDORS` (any letter case); :class:`DataError` naming ``what`` otherwise."""
    by_name = {v.lower(): v for v in VENDORS}
    vendor = by_name.get(str(value).lower())
    if vendor is None:
        raise DataError(f"{what}: unknown vendor {value!r}; choose one of {', '.join(VENDORS)}")
    return vendor


def named_vendors(text: str) -> set[str]:
    """The vendors named in ``text`` (any letter case)."""
    return {canonical_vendor(m.group(0), text) for m in _VENDOR_RE.finditer(text)}


def resolve_vendor(case: str, relpath: str, root_name: str, vendor: str | None) -> str:
    """The device vendor of a case from its path below ``root`` (else ``root_name``), or ``vendor``.

    Raises :class:`DataError` naming the case when the path names two vendors, names one other than
    ``vendor``, or names none and ``vendor`` is not given.
    """
    given = canonical_vendor(vendor, f"{case}: vendor option") if vendor else None
    found = named_vendors(relpath) or named_vendors(root_name)
    where = relpath if named_vendors(relpath) else f"{root_name}/{relpath}"
    if len(found) > 1:
        raise DataError(
            f"{case}: the path {where!r} names several vendors ({', '.join(sorted(found))}); "
            f"put each vendor's cases in a folder naming only it"
        )
    if found:
        (named,) = found
        if given and named != given:
            raise DataError(f"{case}: the path {where!r} names {named} but the vendor option says {given}")
        return named
    if given:
        return given
    raise DataError(
        f"{case}: cannot tell the OCT device of {relpath!r}: no Cirrus, Spectralis or Topcon in its path; "
        f"set the vendor option (--data.init_args.vendor Spectralis) for a folder of one vendor, or put the "
        f"cases in vendor folders as the challenge does (RETOUCH-TrainingSet-<Vendor>/<case>/oct.mhd)"
    )


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_cases(root: Path, vendor: str | None = None) -> list[RetouchCase]:
    """Case folders (holding ``oct.mhd``) at any depth below ``root``, sorted by name.

    Hidden folders (``.name``) are skipped. Raises :class:`DataError` when ``root`` is missing or holds
    no case, when a ``reference.mhd`` has no ``oct.mhd`` beside it, when two cases share a folder name
    (names become ids and table rows) or when a vendor cannot be told (see :func:`resolve_vendor`).
    """
    if not root.is_dir():
        raise DataError(f"{root}: RETOUCH dataset folder not found")
    folders = sorted(p.parent for p in root.rglob("oct.mhd") if _visible(p, root))
    references = sorted(p.parent for p in root.rglob("reference.mhd") if _visible(p, root))
    orphans = [p for p in references if p not in set(folders)]
    if orphans:
        raise DataError(f"{orphans[0] / 'reference.mhd'}: case {orphans[0].name} has a reference but no oct.mhd")
    if not folders:
        raise DataError(
            f"{root}: no RETOUCH cases found "
            f"(expected <case>/oct.mhd at any depth, e.g. RETOUCH-TrainingSet-Cirrus/TRAIN001/oct.mhd)"
        )
    cases: dict[str, RetouchCase] = {}
    for folder in folders:
        # Case names become ids, cache folders and table rows; SimpleITK aborts on undecodable paths.
        rel = folder.relative_to(root)
        for k in range(len(rel.parts)):
            require_utf8_name(root.joinpath(*rel.parts[: k + 1]))
        name = folder.name
        if name in cases:
            raise DataError(f"{folder}: case name {name} also used by {cases[name].folder}; case names must be unique")
        case_vendor = resolve_vendor(name, rel.as_posix(), root.resolve().name, vendor)
        ref = folder / "reference.mhd"
        cases[name] = RetouchCase(name, folder, case_vendor, folder / "oct.mhd", ref if ref.is_file() else None)
    return [cases[k] for k in sorted(cases)]


def read_case(case: RetouchCase) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Volume ``(slices, rows, columns)``, reference labels (uint8, checked to lie in 0..3) and the
    volume's geometry (spacing, origin, direction of ``oct.mhd``) of one case."""
    volume, geometry = read_metaimage(case.oct_path, case.name)
    if case.reference_path is None:
        return volume, None, geometry
    labels, ref_geometry = read_metaimage(case.reference_path, case.name)
    if labels.shape != volume.shape:
        raise DataError(
            f"{case.name}: reference.mhd is {'x'.join(map(str, labels.shape))} but oct.mhd is "
            f"{'x'.join(map(str, volume.shape))} (slices x rows x columns); they must match"
        )
    if not np.allclose(ref_geometry.spacing, geometry.spacing, rtol=1e-4, atol=1e-7):
        raise DataError(
            f"{case.name}: reference.mhd spacing {ref_geometry.spacing} differs from oct.mhd spacing {geometry.spacing}"
        )
    values = np.unique(labels)
    bad = [v for v in values.tolist() if v not in (0, 1, 2, 3)]
    if bad:
        raise DataError(
            f"{case.name}: reference.mhd has labels {bad[:8]} outside 0..3 (0 background, 1 IRF, 2 SRF, 3 PED)"
        )
    return volume, labels.astype(np.uint8), geometry
