"""`raylab` command line: a thin shell over `raylab.launch`.

    raylab models
    raylab train tinyimagenet --stage quick
    raylab train tinyimagenet --stage quick --set family=se --workers 2 --storage ./results --name se-quick

Exit codes: 0 success, 1 the run failed, 2 a configuration error (reported
before Ray starts).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from raylab.config import STAGES, ConfigError, make_launch_config, metric_mode, parse_overrides, read_experiment, stage_values, validate_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, sweep and checkpoint real models on Ray.")
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def models() -> None:
    """List registered models, their stages and parameter counts."""
    from raylab.launch import find_experiment
    from raylab.task import TASKS, get_task

    table = Table(title="raylab models")
    for col in ("model", "stage", "parameters", "what"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in sorted(TASKS):
        task = get_task(name)
        main = find_experiment(name)
        # experiments/<model>.yaml, then variants such as dit_tokens.yaml (`--experiment` to train them)
        for path in [main, *sorted(main.parent.glob(f"{name}_*.yaml"))]:
            experiment = read_experiment(path)
            label = name if path == main else f"{name} ({path.name})"
            for stage in STAGES:
                if stage not in experiment["stages"]:
                    continue
                cfg = validate_config(task.config_cls, stage_values(experiment, stage, path), f"{path} stage '{stage}'")
                table.add_row(label, stage, f"{task.num_parameters(cfg):,}", task.describe(cfg))
    out.print(table)


@app.command()
def train(
    model: str = typer.Argument(..., help="Registered model name (see `raylab models`)."),
    stage: str = typer.Option("quick", help="Stage of the experiment file: quick, medium or full."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set key=value (repeatable)."),
    workers: int = typer.Option(1, help="Training workers (0: run in this process without Ray)."),
    gpus: bool = typer.Option(False, "--gpus", help="Give each worker one GPU."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per worker."),
    storage: str = typer.Option("raylab_results", help="Local folder or s3:// URI holding every run."),
    name: Optional[str] = typer.Option(None, help="Run name; an existing name resumes from its latest checkpoint."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
    max_failures: int = typer.Option(0, help="Restarts from the latest checkpoint after a worker failure (-1: forever)."),
    experiment: Optional[str] = typer.Option(None, help="Experiment YAML (default: experiments/<model>.yaml)."),
    init_from: Optional[str] = typer.Option(None, help="Warm start a fresh run from this checkpoint or run folder (local or s3://): tensors whose name and shape match are loaded."),
    debug: bool = typer.Option(False, help="Print full tracebacks on failure."),
) -> None:
    """Train one stage of a model through Ray Train."""
    from raylab.launch import prepare, train as run_train
    from raylab.progress import LiveProgress, summary_table

    try:
        overrides = parse_overrides(set_)
        if init_from:
            # Workers may run elsewhere (or in another directory): hand them an absolute path.
            overrides["init_from"] = init_from if "://" in init_from else str(Path(init_from).expanduser().resolve())
        prepare(model, stage, overrides, experiment)  # validate before anything starts
        launch = make_launch_config(
            num_workers=workers, use_gpu=gpus, cpus_per_worker=cpus_per_worker, storage_path=storage,
            name=name, address=address, max_failures=max_failures,
        )
    except ConfigError as exc:
        _fail(str(exc), 2)

    try:
        with LiveProgress(f"{model} {stage}") as live:
            summary = run_train(model, stage, overrides, launch, experiment, on_progress=live)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted; rerun with the same --name to resume from the latest checkpoint.", 130)
    except Exception as exc:  # the run failed: show the cause, not Ray's wrapping
        if debug:
            err.print(traceback.format_exc())
        if isinstance(exc, OSError) and "://" in storage:
            _fail(f"run failed: storage {storage} could not be read or written ({' '.join(str(exc).split())}); "
                  "checkpoints already in storage are intact: rerun the same command (same --name) to resume from the newest one.", 1)
        _fail(f"run failed: {type(exc).__name__}: {exc}".rstrip(), 1)

    final = summary.final
    rows = [("run", summary.name), ("path", summary.run_path), ("wall time", f"{summary.wall_s:.1f} s"),
            ("steps", str(int(final.get("step", 0)))), ("epochs", f"{final.get('epoch', 0):.2f}")]
    for key in sorted(k for k in final if k.startswith(("val_", "train_", "sample_"))):
        rows.append((f"final {key}", f"{final[key]:.4g}"))
    for key in sorted(k for k in summary.metrics.columns if k.startswith(("val_", "sample_"))):
        best = summary.best(key, metric_mode(key))
        if best is not None:
            rows.append((f"best {key}", f"{best:.4g}"))
    rows.append(("latest checkpoint", summary.latest_checkpoint or "none"))
    rows.append(("curves", summary.curves or "none"))
    out.print(summary_table(f"{model} {stage}: done", rows))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    command: List[str] = typer.Argument(..., help="The raylab command the job runs, after `--`: train|ladder|sweep ..."),
    address: Optional[str] = typer.Option(None, help="The head's job API (default: RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)."),
    working_dir: Optional[str] = typer.Option(None, help="Upload this raylab checkout as the job's working directory (default: use raylab as installed on the cluster)."),
    env: List[str] = typer.Option([], "--env", help="Environment variable for the job: --env KEY=VALUE (repeatable)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log and exit with its outcome (--no-wait: print the job id and return)."),
    agent_timeout_s: float = typer.Option(60.0, help="Seconds to keep retrying while the head's job agent is starting."),
) -> None:
    """Run a raylab command as a Ray job on a cluster; exits 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED."""
    from pathlib import Path

    from raylab.submit import SubmitError, submit as submit_job

    known = set(typer.main.get_command(app).commands) - {"submit"}
    if command[0] not in known:
        _fail(f"'{command[0]}' is not a raylab command; give one of {', '.join(sorted(known))} after `--`.", 2)
    pairs = [item.partition("=") for item in env]
    bad = [item for item, (key, sep, _) in zip(env, pairs) if not key or not sep]
    if bad:
        _fail(f"--env '{bad[0]}' is not of the form KEY=VALUE.", 2)
    if working_dir is not None and not Path(working_dir).is_dir():
        _fail(f"--working-dir {working_dir} is not a folder.", 2)
    try:
        code = submit_job(command, address, working_dir, {k: v for k, _, v in pairs}, follow=wait, agent_timeout_s=agent_timeout_s)
    except SubmitError as exc:
        _fail(str(exc), 1)
    raise typer.Exit(code)


@app.command()
def sample(
    checkpoint: str = typer.Argument(..., help="A checkpoint folder, or a run folder (its newest checkpoint): a local path or a URI such as s3://bucket/run/checkpoint_..."),
    n: int = typer.Option(16, "--n", help="How many samples to generate."),
    label: Optional[str] = typer.Option(None, help="Condition every sample on this class (index or name; default: cycle through classes)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the run's config; 1: none)."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps, e.g. DDIM steps (default: the run's config)."),
    seed: Optional[int] = typer.Option(None, help="Noise seed (default: the run's sample_seed)."),
    out_file: str = typer.Option("samples.json", "--out", help="JSON file to write; a PNG grid goes beside it when the model draws one."),
    device: str = typer.Option("cpu", help="Torch device to sample on, e.g. cpu or cuda."),
    debug: bool = typer.Option(False, help="Print full tracebacks on failure."),
) -> None:
    """Generate samples from a trained checkpoint (EMA weights when the run kept them)."""
    from raylab.checkpoint import CheckpointError
    from raylab.sampling import sample_checkpoint

    try:
        result = sample_checkpoint(checkpoint, n, label, guidance, steps, seed, out_file, device)
    except (ConfigError, CheckpointError) as exc:
        _fail(str(exc), 2)
    except Exception as exc:  # sampling itself failed: show the cause in one line
        if debug:
            err.print(traceback.format_exc())
        _fail(f"sampling failed: {type(exc).__name__}: {exc}".rstrip(), 1)
    rows = [("checkpoint", checkpoint), ("weights", result.payload["weights"]), ("samples", str(len(result.payload["samples"]))),
            ("json", str(result.json_path))]
    if result.png_path is not None:
        rows.append(("png", str(result.png_path)))
    rows += [(key, f"{value:.4g}") for key, value in sorted(result.metrics.items())]
    table = Table(title=f"raylab sample: {result.payload['model']} step {result.payload['step']}", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


from raylab.ckpt_cli import ckpt_app  # noqa: E402  (the `raylab ckpt ...` commands)

app.add_typer(ckpt_app, name="ckpt")


@app.command("eval-translations")
def eval_translations(
    predictions: str = typer.Argument(..., help="File of 'sample: <id>, prediction: <text>' lines."),
    references: str = typer.Argument(..., help="File of 'sample: <id>, ground-truth: <text>' lines."),
    tokenize: str = typer.Option("13a", help="sacreBLEU tokenizer: 13a (English) or zh (Chinese characters)."),
) -> None:
    """Score translations against references by sample id: sacreBLEU BLEU-4 and ROUGE-L."""
    from models.translator.metrics import TOKENIZERS, TranslationFileError, score_files

    if tokenize not in TOKENIZERS:
        _fail(f"option --tokenize must be one of {', '.join(TOKENIZERS)} (got {tokenize!r}).", 2)
    try:
        scores = score_files(predictions, references, tokenize)
    except TranslationFileError as exc:
        _fail(str(exc), 2)
    except Exception as exc:  # scoring itself failed: show the cause in one line
        _fail(f"scoring failed: {type(exc).__name__}: {exc}".rstrip(), 1)
    out.print(f"BLEU-4  {scores.bleu:.2f}\nROUGE-L {scores.rouge_l:.2f}\n"
              f"({scores.sentences} sentences, tokenize {scores.tokenize})", highlight=False)


from raylab.tune_cli import ladder, report, sweep  # noqa: E402  (the Ray Tune commands)

app.command()(ladder)
app.command()(sweep)
app.command()(report)


@app.command()
def doctor(
    model: str = typer.Argument(..., help="Registered model name (see `raylab models`)."),
    stage: str = typer.Option("quick", help="Stage of the experiment file: quick, medium or full."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set key=value, --set health.<check>=off (repeatable)."),
    steps: int = typer.Option(300, help="Optimizer steps of the training phase (the stage's schedule is compressed into them)."),
    experiment: Optional[str] = typer.Option(None, help="Experiment YAML (default: experiments/<model>.yaml)."),
) -> None:
    """Pre-flight a model in this process: one batch, forward/backward, sampling with 1 and 3, then --steps of training
    with every health check; exits 0 healthy, 1 on a finding, 2 on a config error."""
    from raylab.doctor import run_doctor, verdict_table
    from raylab.progress import LiveProgress

    try:
        with LiveProgress(f"doctor {model} {stage}") as live:
            result = run_doctor(model, stage, parse_overrides(set_), steps, experiment, on_progress=live)
    except ConfigError as exc:
        _fail(str(exc), 2)
    out.print(verdict_table(result))
    raise typer.Exit(result.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
