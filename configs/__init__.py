"""Training recipes (ml_collections): one file per recipe, its run command in the docstring."""
