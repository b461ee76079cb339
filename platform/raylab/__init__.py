"""raylab: train, sweep and checkpoint real models on Ray.

The package is laid out as: `config` (typed run configs and experiment files),
`task` (the model interface and registry), `torch_loop` (the one training loop
for PyTorch tasks), `checkpoint` (the checkpoint folder format), `run_storage`
(metrics log and TensorBoard files next to the checkpoints), `session` (where a
loop reports to), `ray_backend` (the only module that touches `ray.train`),
`launch` (the Python API behind the CLI) and `cli` (`raylab ...`).
"""

__version__ = "0.1.0"
