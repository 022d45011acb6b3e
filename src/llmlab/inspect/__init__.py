"""Looking inside a model: attention maps and lenses (lens.py), pictures (viz.py)."""
