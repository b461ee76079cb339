"""`raylab submit`: run any raylab command as a Ray job on a cluster, and follow it.

    raylab submit --address http://127.0.0.1:8265 -- train tinyimagenet --stage quick --workers 2 \\
        --storage s3://my-bucket/raylab
    raylab submit --working-dir . -- train tinyimagenet --stage quick      # ship this checkout

A thin wrapper over Ray's `JobSubmissionClient`: it waits for the head's job
agent (for ~15 s after `ray start` the API answers but refuses jobs with "No
available agent to submit job"), submits `raylab <command...>` as the job's
entrypoint, prints the job id, streams the job's log (raylab prints one plain
progress line at a time when its output is not a terminal, as in a job), and
returns the job's outcome as an exit code: 0 SUCCEEDED, 1 FAILED or STOPPED.

Where the code comes from (the runtime environment):
- A cluster made by `cluster.yaml` has raylab installed on every node (its
  setup commands); the entrypoint `raylab ...` runs that install. Nothing is
  uploaded unless asked.
- `--working-dir DIR` uploads DIR (a raylab checkout): it becomes the job's
  working directory and first `PYTHONPATH` entry on the driver and every
  worker, so its `models/` and `experiments/` are used; its `platform/raylab`
  is uploaded too (`py_modules`) so the platform code is the checkout's as
  well. Ray honours `.gitignore` and `.rayignore` (the venv, results and
  `.git` stay home). The cluster still needs raylab's dependencies installed.

Token auth: Ray's client sends the token only when `RAY_AUTH_MODE=token` is
set (token from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_NO_AGENT = "No available agent to submit job"


class SubmitError(RuntimeError):
    """A problem the user can fix (address, credentials, arguments); the message says which."""


def job_api_address(address: str | None) -> str:
    """The job API's URL: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else localhost:8265."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
        if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
            address = os.environ["RAY_ADDRESS"]  # a plain RAY_ADDRESS names the GCS, not the job API
    if not address:
        return DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


def entrypoint(command: list[str]) -> str:
    """The job's shell command: the raylab CLI with the user's arguments, quoted."""
    return shlex.join(["raylab", *command])


def runtime_env(working_dir: str | Path | None, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: optional upload of a checkout, extra environment variables."""
    env: dict[str, Any] = {}
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if not root.is_dir():
            raise SubmitError(f"--working-dir {working_dir} is not a folder.")
        env["working_dir"] = str(root)
        package = root / "platform" / "raylab"
        if package.is_dir():
            env["py_modules"] = [str(package)]
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def _client(address: str, connect_timeout_s: float):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            raise SubmitError(_auth_hint(address)) from None
        except ConnectionError as exc:
            if time.monotonic() >= deadline:
                raise SubmitError(
                    f"cannot reach the Ray job API at {address} ({exc}); is the head up and its dashboard port "
                    "reachable (on a cluster.yaml cluster: keep `ray dashboard cluster.yaml` running)?"
                ) from None
            time.sleep(1.0)


def _auth_hint(address: str) -> str:
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return (f"the Ray job API at {address} requires token authentication; set RAY_AUTH_MODE=token and provide "
                "the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token.")
    return f"the Ray job API at {address} rejected the authentication token; use the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)."


def submit_when_ready(client, address: str, entry: str, env: dict[str, Any], agent_timeout_s: float,
                      say: Callable[[str], None]) -> str:
    """Submit the job, retrying while the head's job agent is not up yet; returns the job id."""
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + agent_timeout_s
    waited = False
    while True:
        try:
            return client.submit_job(entrypoint=entry, runtime_env=env or None, metadata={"raylab": "submit"})
        except AuthenticationError:
            raise SubmitError(_auth_hint(address)) from None
        except RuntimeError as exc:
            if _NO_AGENT not in str(exc):
                raise SubmitError(f"the Ray job API at {address} refused the job: {str(exc).strip()}") from None
            if time.monotonic() >= deadline:
                raise SubmitError(f"the head at {address} had no job agent ready within {agent_timeout_s:g} s; try again.") from None
            if not waited:
                say("waiting for the head's job agent...")
                waited = True
            time.sleep(1.0)


def follow_logs(client, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's log until it ends (falls back to status polling if the stream breaks)."""
    # Ray's client logs "WebSocket closed ... close code 1000" at INFO at every normal end.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # a dropped websocket must not lose the job's outcome
        write(f"[raylab submit] log stream ended early ({type(exc).__name__}); waiting for the job to finish.\n")


def wait_for_end(client, job_id: str, poll_s: float = 1.0):
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def submit(
    command: list[str], address: str | None = None, working_dir: str | Path | None = None,
    env_vars: dict[str, str] | None = None, follow: bool = True, agent_timeout_s: float = 60.0,
    write: Callable[[str], None] | None = None,
) -> int:
    """Submit `raylab <command>` as a Ray job; with `follow`, stream its log and return its exit code."""
    from ray.job_submission import JobStatus

    write = write or (lambda text: print(text, end="", flush=True))
    # Ray's client narrates packaging at INFO/WARNING (".git is now ignored by default", ...).
    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    say = lambda line: write(f"[raylab submit] {line}\n")  # noqa: E731
    if not command:
        raise SubmitError("nothing to submit; give a raylab command after `--`, e.g. `raylab submit -- train tinyimagenet`.")
    url = job_api_address(address)
    env = runtime_env(working_dir, env_vars)
    client = _client(url, connect_timeout_s=15.0)
    if working_dir is not None:
        say(f"uploading {env['working_dir']} as the job's working directory (.gitignore/.rayignore honoured)")
    job_id = submit_when_ready(client, url, entrypoint(command), env, agent_timeout_s, say)
    say(f"job {job_id} submitted to {url}: {entrypoint(command)}")
    if not follow:
        say(f"follow it with: ray job logs {job_id} --address {url} --follow")
        return 0
    try:
        follow_logs(client, job_id, write)
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        say(f"stopped following; job {job_id} keeps running (stop it with: ray job stop {job_id} --address {url}).")
        return 130
    info = client.get_job_info(job_id)
    # Ray's message goes on with "last available logs ...", which were streamed above.
    detail = f": {info.message.split(', last available logs')[0].strip()}" if status != JobStatus.SUCCEEDED and info.message else ""
    say(f"job {job_id} {status.value}{detail}")
    return 0 if status == JobStatus.SUCCEEDED else 1
