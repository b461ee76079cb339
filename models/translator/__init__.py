"""Pose-to-text translator (seed 002): body-part GCN front end feeding a (m)T5 encoder-decoder."""
