"""Where everything of a job lives in storage: ``<storage>/<job-id>/...``. The one place these names are
defined; the coordinator, the workers and the CLI all read them from here.

| path | written by | what |
| --- | --- | --- |
| ``job.json`` | the coordinator | the job record (``service.jobs.JobRecord``) |
| ``metrics.jsonl`` | the coordinator | one record per optimizer step, one per stage end |
| ``metrics.png`` | the coordinator / ``stagetrain plot`` | the run's curves |
| ``checkpoints/<tag>/`` | rank 0 | ``model.pt``, ``train_state.pt``, ``manifest.json`` (``checkpoints``) |
| ``lease.json`` | the coordinator | who runs the job now, with a heartbeat (``service.coordination``) |
| ``logs/attempt-<k>.log`` | the coordinator | its log: events, stage summaries, progress, worker errors |
| ``control/stop.json`` | the coordinator | asks the workers to stop after the current step |
| ``control/cancel.json`` | ``stagetrain cancel`` | asks the coordinator to stop the job as ``cancelled`` |
| ``control/requests/scale-*.json`` | ``stagetrain scale`` | worker-count changes for stages not started |
| ``control/hold.json`` | tests, demos | hold the workers at given steps until a stop (``workers.control``) |
| ``control/held/`` | each rank | one marker per rank and held step: pid, host, Ray node |
| ``ray/`` | Ray Train | its own run folders |
| ``export/<tag>.pt`` | ``stagetrain export`` (no ``-o``) | the weights of checkpoint ``<tag>``, rebuildable |
"""

import re

JOB_FILE = "job.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
CHECKPOINTS = "checkpoints"
STOP_FILE = "control/stop.json"
CANCEL_FILE = "control/cancel.json"
REQUESTS_DIR = "control/requests"
HOLD_FILE = "control/hold.json"
HELD_DIR = "control/held"
LEASE_FILE = "lease.json"
LOGS_DIR = "logs"
RAY_DIR = "ray"
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"

JOB_ID_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_job_id(job_id: str) -> str:
    """A job id is one path component under the storage root: no ``/``, no ``..``, no spaces."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise ValueError(f"JOB_ID: {JOB_ID_RULE} (no '/', '..' or spaces), got {job_id!r}")
    return job_id
