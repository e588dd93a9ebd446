"""The data stage: a tenant's JSONL/Parquet file → validated chat rows → masked token ids → train/eval.

``rows`` holds the pure per-row functions (no Ray, unit-testable); ``data`` wires them into Ray Data.
"""
