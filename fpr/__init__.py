"""3D false-positive reduction: a small 3D CNN that re-scores linked lesions from candidate cubes.

The classic LUNA16 recipe (2D candidates on adjacent slices, a 3D CNN on candidate cubes; Ding et
al., MICCAI 2017): the detector proposes, this model decides with 3D context whether a candidate is
a blob (nodule) or a tube (vessel), a bump of the chest wall or a fissure.

  model.py    the network (torch) and its ONNX export
  mining.py   candidates of the serving pipeline on phantom series -> labelled cubes on disk
  train.py    training on mined cubes, validation FROC through the rescoring rule, release
  predict.py  onnxruntime predictor used by evaluation and the Triton model
"""
