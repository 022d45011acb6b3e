"""Security experiments: each sees a model through one of two narrow interfaces (targets.py) and writes
its results with report.py."""
