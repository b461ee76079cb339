"""GMAN traffic forecasting (seed 001) in TensorFlow / Keras 3: ST-attention, METR-LA / PeMS-Bay HDF5 data."""

import os

# TensorFlow reads these once, when it is first imported (by any module of this
# package): oneDNN off gives a silent import and one fixed set of floating-point
# bits (on/off changes results); level 2 hides TF's C++ INFO/WARNING lines.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
