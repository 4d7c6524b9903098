"""Evaluation of the detector as the field measures it, one job per module.

- ``froc``: LUNA16 FROC / CPM per lesion with bootstrap bands (matching: ``preprocess_backend.matching``)
- ``slice_map``: COCO mAP per slice (pycocotools)
- ``truth_geometry``: the truth's cross-section boxes on slices (what training learns from)
- ``runner``: the serving pipeline on one case (``run_detector_on_case``) and the predictors
- ``fpr_stage``: the served second stage in-process (3D false-positive reduction, 3D lesion rules)
- ``evaluation``: the whole evaluation on phantoms (per-scan scoring shared as ``ScoredCases``;
  metrics.json, froc.png, the text report)
- ``dataset_eval``: the official LUNA16 protocol on a ``damoyolo.data`` source (``--data KIND:DIR --fold K``)
- ``realdata``: false positives of the served pipeline on real CT without nodule truth
- ``plots``: the FROC figure
- ``cli``: ``ctlesion evaluate``
"""
