"""GMAN traffic forecasting (seed 001) in TensorFlow / Keras 3: ST-attention, METR-LA / PeMS-Bay HDF5 data."""
