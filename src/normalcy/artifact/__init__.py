"""The exported model file as an artifact, without torch: output names, the 'normalcy' metadata,
the calibration head (is_anomaly and p_value as plain ONNX nodes) and recalibration.

Scoring, serving, the registry, monitor and recalibrate read and rewrite model files through
this package, so none of them needs torch. `normalcy.export` (torch) writes the files.
"""
