"""raylab: train, sweep and checkpoint real models on Ray.

The package, by what each part is about:

- Configs and models: `config` (TrainConfig, LaunchConfig, experiment files,
  one-sentence ConfigErrors), `health_config` (the `health:` section), `task`
  (the task interfaces and the TASKS registry), `datasets` (DataError,
  write-once generated datasets), `cache` (where generated data lives).
- The loop, written once: `loop_core` (position, plan, resume, cadence),
  `loop_reporting` (metrics rows, samples, checkpoint folders), and one thin
  stepper per framework, `torch_loop` and `tf_loop`; features the loop calls:
  `ema`, `warm_start`, `health` / `torch_health` / `health_trends`.
- Checkpoints and storage: `checkpoint` (the folder format), `checkpoint_store`
  (folders on any pyarrow filesystem), `recovery` (where a run resumes),
  `retention` (what is kept), `checkpoints` + `ckpt_cli` (`raylab ckpt`),
  `run_storage` (metrics.parquet, TensorBoard), `plots` (curves.png).
- Ray, touched in few places: `ray_backend` (the only `ray.train` importer),
  `ray_failures` (worker deaths as one line), `session` (where a loop
  reports: in-process or a Ray worker), `tune_backend` (the only `ray.tune`
  importer), `local_cluster` (a Ray head of one's own), `submit` (Ray jobs).
- Commands: `launch` (the `train` Python API), `cli` (`raylab ...`),
  `ladder`, `sweep`, `search_space`, `sweep_display`, `report`, `tune_cli`,
  `sampling` (`raylab sample`), `doctor` (`raylab doctor`), `progress` (the
  live display).
"""

__version__ = "0.1.0"
