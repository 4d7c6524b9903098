"""Evaluation of the detector as the field measures it, one job per module.

- ``froc``: LUNA16 FROC / CPM per lesion with bootstrap bands (matching: ``preprocess_backend.matching``)
- ``slice_map``: COCO mAP per slice (pycocotools)
- ``truth_geometry``: the truth's cross-section boxes on slices (what training learns from)
- ``runner``: the serving pipeline on one case (``run_detector_on_case``) and the predictors
- ``evaluation``: the whole evaluation (metrics.json, froc.png, the text report)
- ``plots``: the FROC figure
- ``cli``: ``ctlesion evaluate``
"""
