"""Findings <-> DICOM SR (TID 1500 Measurement Report, Comprehensive 3D SR) with highdicom.

One SR per CT series. Each finding is one TID 1411 volumetric ROI group:
- tracking identifier: UID + "Lesion N";
- region: a SCOORD3D ELLIPSOID (a sphere of the lesion diameter around its centre, patient LPS mm,
  in the series' frame of reference) whose source images are the lesion's key slices, so a viewer
  can jump to them; the centre is the midpoint of the ellipsoid axes, so it reads back exactly;
- measurements: diameter (SCT 81827009, UCUM mm) and detection confidence (private code, unitless);
- qualitative evaluation: attenuation (solid / part-solid / ground-glass);
- finding site: lobe (SNOMED) with laterality (SCT Right / Left);
- algorithm identification (name, version) on the group and the measurements.

``parse_sr`` reads the same structure back into ``Finding`` objects; ``validate_sr`` runs
``dciodvfy`` (dicom3tools) when installed, else ``dcmdump`` plus a required-module check.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

# Private coding scheme for concepts without an exact standard code (a detector score is not a
# calibrated probability, so DCM "Probability of cancer" would overstate it).
PRIVATE_SCHEME = "99CTLESION"
CONFIDENCE = CodedConcept("SCORE", PRIVATE_SCHEME, "Detection confidence")
ATTENUATION = CodedConcept("ATTEN", PRIVATE_SCHEME, "Attenuation characteristic")
CHARACTERISTIC_CODES: dict[str, CodedConcept] = {
    "solid": CodedConcept("SOLID", PRIVATE_SCHEME, "Solid"),
    "part-solid": CodedConcept("PARTSOLID", PRIVATE_SCHEME, "Part-solid"),
    "ground-glass": CodedConcept("112120", "DCM", "Ground glass opacity"),
}
LOBE_CODES: dict[str, CodedConcept] = {
    "upper": CodedConcept("45653009", "SCT", "Upper lobe of lung"),
    "middle": CodedConcept("72481006", "SCT", "Middle lobe of right lung"),
    "lower": CodedConcept("90572001", "SCT", "Lower lobe of lung"),
    "lung": CodedConcept("39607008", "SCT", "Lung"),
}
SIDE_CODES: dict[str, CodedConcept] = {
    "right": CodedConcept(codes.SCT.Right.value, "SCT", codes.SCT.Right.meaning),
    "left": CodedConcept(codes.SCT.Left.value, "SCT", codes.SCT.Left.meaning),
}
SR_SERIES_DESCRIPTION = "ctlesion AI lesion findings"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str = "ctlesion-damoyolo"
    version: str = "0.1.0"
    manufacturer: str = "ctlesion"


DEFAULT_ALGORITHM = AlgorithmInfo()


@dataclass
class Finding:
    """One lesion as reported: what the SR stores and what ``parse_sr`` returns."""

    index: int  # 1-based, gives the human-readable "Lesion N"
    centre_mm: tuple[float, float, float]  # patient LPS
    diameter_mm: float
    score: float
    characteristic: str | None = None  # solid | part-solid | ground-glass
    side: str | None = None  # right | left
    lobe: str | None = None  # upper | middle | lower (None: lung, unspecified)
    key_sop_uids: list[str] = field(default_factory=list)
    tracking_uid: str = field(default_factory=lambda: str(generate_uid()))

    @property
    def label(self) -> str:
        return f"Lesion {self.index}"

    def close_to(self, other: Finding, tol: float = 1e-3) -> bool:
        """Equality up to the float precision of DS values (16 characters)."""
        return (
            self.index == other.index
            and self.tracking_uid == other.tracking_uid
            and np.allclose(self.centre_mm, other.centre_mm, atol=tol)
            and abs(self.diameter_mm - other.diameter_mm) <= tol
            and abs(self.score - other.score) <= tol
            and (self.characteristic, self.side, self.lobe) == (other.characteristic, other.side, other.lobe)
            and sorted(self.key_sop_uids) == sorted(other.key_sop_uids)
        )


def _first(obj: object, names: Sequence[str], default: object = None) -> object:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _norm_characteristic(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).lower().replace("_", "-").replace(" ", "-")
    if "part" in text or "sub" in text:
        return "part-solid"
    if "ground" in text or "ggo" in text or "glass" in text:
        return "ground-glass"
    return "solid" if "solid" in text else None


def _norm_lobe(value: object) -> str | None:
    text = str(value or "").lower()
    for lobe in ("upper", "middle", "lower"):
        if lobe in text:
            return lobe
    return None


def finding_from_lesion(lesion: object, index: int, ordered_sop_uids: Sequence[str] = ()) -> Finding:
    """Adapt a ``preprocess_backend.types.Lesion`` (or its ``to_dict()``) to a ``Finding``.

    Duck-typed on purpose: the Lesion dataclass is written concurrently; accepted names are listed
    here so the adapter is the one place to touch if a field is renamed. ``slices`` may hold slice
    indices (mapped through ``ordered_sop_uids``, the series sorted by position) or SOP UIDs.
    """
    centre = _first(lesion, ("centre_mm", "center_mm", "centre_lps_mm", "centre", "center"))
    if centre is None:
        raise ValueError(f"lesion {index} has no centre")
    diameter = float(_first(lesion, ("diameter_mm", "diameter")))  # type: ignore[arg-type]
    score = float(_first(lesion, ("max_score", "score", "mean_score"), 0.0))  # type: ignore[arg-type]
    uids = _first(lesion, ("sop_instance_uids", "key_sop_uids"))
    if not uids:  # None or empty: fall back to slice indices
        slices = list(_first(lesion, ("slices", "slice_indices"), []) or [])  # type: ignore[call-overload]
        uids = [ordered_sop_uids[s] if isinstance(s, int | np.integer) else str(s) for s in slices]
    side = _first(lesion, ("side", "laterality"))
    side = str(side).lower() if side is not None and str(side).lower() in SIDE_CODES else None
    tracking = _first(lesion, ("tracking_uid", "uid"))
    return Finding(
        index=index,
        centre_mm=tuple(float(c) for c in centre),  # type: ignore[union-attr]
        diameter_mm=diameter,
        score=score,
        characteristic=_norm_characteristic(_first(lesion, ("characteristic", "characteristics", "texture"))),
        side=side,
        lobe=_norm_lobe(_first(lesion, ("lobe",))),
        key_sop_uids=[str(u) for u in uids],  # type: ignore[union-attr]
        **({"tracking_uid": str(tracking)} if tracking else {}),
    )


def _sphere_axes(centre: Sequence[float], diameter: float) -> np.ndarray:
    # ELLIPSOID = 3 axes, each as 2 end points (6 x 3); a sphere of the lesion diameter.
    c, r = np.asarray(centre, dtype=float), diameter / 2.0
    pts = [c + s * r * e for e in np.eye(3) for s in (-1.0, 1.0)]
    return np.asarray(pts, dtype=float)


def _group(finding: Finding, frame_of_reference_uid: str, sop_classes: Mapping[str, str],
           algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    if not finding.key_sop_uids:
        raise ValueError(f"{finding.label}: no key slices to reference")
    sources = [
        hd.sr.SourceImageForSegmentation(sop_classes.get(uid, CT_IMAGE_STORAGE), uid)
        for uid in finding.key_sop_uids
    ]
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
        graphic_data=_sphere_axes(finding.centre_mm, finding.diameter_mm),
        frame_of_reference_uid=frame_of_reference_uid,
        source_images=sources,
    )
    lobe = LOBE_CODES[finding.lobe] if finding.lobe else LOBE_CODES["lung"]
    sites = [hd.sr.FindingSite(lobe, laterality=SIDE_CODES[finding.side] if finding.side else None)]
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Diameter, value=round(finding.diameter_mm, 6),
                          unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
        hd.sr.Measurement(name=CONFIDENCE, value=round(finding.score, 6), unit=codes.UCUM.NoUnits,
                          algorithm_id=algorithm),
    ]
    evaluations = []
    if finding.characteristic:
        evaluations.append(hd.sr.QualitativeEvaluation(ATTENUATION, CHARACTERISTIC_CODES[finding.characteristic]))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.label),
        referenced_volume_surface=surface,
        finding_type=codes.SCT.Nodule,
        algorithm_id=algorithm,
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


NO_FINDINGS = CodedConcept("NONE", PRIVATE_SCHEME, "No lesion detected")


def _no_findings_group(algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying the series was read and nothing was found (an SR needs one group)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="No findings"),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Finding, NO_FINDINGS)],
    )


def build_sr(
    findings: Sequence[Finding],
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo = DEFAULT_ALGORITHM,
    series_number: int = 9901,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build (and thereby validate, highdicom checks on construction) the SR for one CT series.

    ``source_headers``: the series' images (pixel data not needed); all of them go into the
    evidence, the key slices of each finding into its ROI. An empty ``findings`` list still gives
    a report (the study was processed, nothing found), which is what makes re-runs idempotent.
    """
    if not source_headers:
        raise ValueError("no source images")
    first = source_headers[0]
    frames = {str(ds.FrameOfReferenceUID) for ds in source_headers}
    if len(frames) != 1:
        raise ValueError(f"source images span {len(frames)} frames of reference")
    sop_classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in source_headers}
    missing = {u for f in findings for u in f.key_sop_uids} - sop_classes.keys()
    if missing:
        raise ValueError(f"findings reference images outside the series: {sorted(missing)[:3]}")
    algo = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                         manufacturer=algorithm.manufacturer)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[_group(f, str(first.FrameOfReferenceUID), sop_classes, algo) for f in findings]
        or [_no_findings_group(algo)],  # highdicom needs one group; parse_sr reads it back as no findings
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_headers),
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),  # fixed UIDs: the DICOM node's idempotent resend
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="ctlesion private codes")],
    )
    _copy_deidentification(sr, first)
    return sr


def _copy_deidentification(sr: Dataset, source: Dataset) -> None:
    """highdicom copies PatientIdentityRemoved; DeidentificationMethod (Type 1C when it is YES) must follow."""
    if str(sr.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in source and keyword not in sr:
            setattr(sr, keyword, source[keyword].value)
    if "DeidentificationMethod" not in sr and "DeidentificationMethodCodeSequence" not in sr:
        sr.DeidentificationMethod = "identity removed upstream (source images carry no method)"


def _code_key(concept: object) -> tuple[str, str]:
    return (str(concept.value), str(concept.scheme_designator))  # type: ignore[attr-defined]


def _reverse(table: Mapping[str, CodedConcept], concept: object) -> str | None:
    key = _code_key(concept)
    return next((name for name, code in table.items() if _code_key(code) == key), None)


def parse_sr(dataset: Dataset) -> list[Finding]:
    """Read the findings back from an SR written by ``build_sr`` (or any TID 1411 ellipsoid groups)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    report = sr.content
    findings: list[Finding] = []
    for group in report.get_volumetric_roi_measurement_groups():
        label = group.tracking_identifier or ""
        index = int(label.split()[-1]) if label.split() and label.split()[-1].isdigit() else len(findings) + 1
        surface = group.roi
        if not isinstance(surface, hd.sr.VolumeSurface):
            continue
        axes = np.asarray(surface.graphic_data, dtype=float).reshape(-1, 3)
        centre = axes.mean(axis=0)
        measured = {_code_key(m.name): float(m.value) for m in group.get_measurements()}
        diameter = measured.get(_code_key(codes.SCT.Diameter), float(np.linalg.norm(axes[1] - axes[0])))
        characteristic = None
        for ev in group.get_qualitative_evaluations():
            if _code_key(ev.name) == _code_key(ATTENUATION):
                characteristic = _reverse(CHARACTERISTIC_CODES, ev.value)
        side = lobe = None
        for site in group.finding_sites:
            lobe_name = _reverse(LOBE_CODES, site.value)
            lobe = None if lobe_name in (None, "lung") else lobe_name
            if site.laterality is not None:
                side = _reverse(SIDE_CODES, site.laterality)
        findings.append(Finding(
            index=index,
            centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
            diameter_mm=diameter,
            score=measured.get(_code_key(CONFIDENCE), 0.0),
            characteristic=characteristic,
            side=side,
            lobe=lobe,
            key_sop_uids=[str(img.referenced_sop_instance_uid) for img in surface.source_images_for_segmentation],
            tracking_uid=str(group.tracking_uid),
        ))
    return findings


def referenced_series_uids(dataset: Dataset) -> set[str]:
    """Series the SR's evidence points at (used by the idempotency check)."""
    out: set[str] = set()
    for seq_name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in dataset.get(seq_name, []):
            for series in study.get("ReferencedSeriesSequence", []):
                out.add(str(series.SeriesInstanceUID))
    return out


@dataclass
class ValidationResult:
    ok: bool
    tool: str
    messages: list[str]


REQUIRED_SR_ATTRIBUTES = (
    # Patient, General Study, SR Document Series, General Equipment, SR Document General,
    # SR Document Content and SOP Common modules: one key attribute each.
    "PatientID", "StudyInstanceUID", "Modality", "SeriesInstanceUID", "Manufacturer",
    "InstanceNumber", "CompletionFlag", "VerificationFlag", "ContentDate", "ValueType",
    "ConceptNameCodeSequence", "ContentTemplateSequence", "ContentSequence", "SOPClassUID",
    "SOPInstanceUID", "CurrentRequestedProcedureEvidenceSequence",
)


def validate_sr(dataset: Dataset) -> ValidationResult:
    """dciodvfy (dicom3tools) when installed: errors fail, warnings are reported; else dcmdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sr.dcm"
        dataset.save_as(path, enforce_file_format=True)
        if shutil.which("dciodvfy"):
            proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("Error")]
            return ValidationResult(ok=not errors, tool="dciodvfy", messages=lines)
        if shutil.which("dcmdump"):
            proc = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, timeout=120)
            messages = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            missing = [f"missing {kw}" for kw in REQUIRED_SR_ATTRIBUTES if kw not in dataset]
            return ValidationResult(ok=proc.returncode == 0 and not missing, tool="dcmdump",
                                    messages=messages + missing)
    missing = [f"missing {kw}" for kw in REQUIRED_SR_ATTRIBUTES if kw not in dataset]
    return ValidationResult(ok=not missing, tool="attribute-check", messages=missing)


__all__ = [
    "AlgorithmInfo", "DEFAULT_ALGORITHM", "Finding", "ValidationResult", "SR_SERIES_DESCRIPTION",
    "build_sr", "parse_sr", "finding_from_lesion", "referenced_series_uids", "validate_sr",
]
