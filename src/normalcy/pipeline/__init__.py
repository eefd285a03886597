"""The pipeline's steps, one module each: prepare, validate, clean, train, evaluate, export.

`normalcy stage NAME` (dvc repro) and the Prefect train flow call the same step functions, so
both write the same artifacts; `artifacts.py` names every file they write. This package's
`__init__` imports nothing, so torch-free callers (monitor, recalibrate) can read the paths."""
