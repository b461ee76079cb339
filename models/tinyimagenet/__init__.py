"""TinyImageNet-200 classifiers and data loading (see model.py and data.py)."""
