"""Evaluation on the embedded domain: the evaluator (a classifier of the domain's labels), metrics (prompt
alignment, domain FID, CMMD) and typed reports."""
