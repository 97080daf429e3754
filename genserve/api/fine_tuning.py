"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints.

The routes check what a request names (the base model, the files) and hand the job to the
JobManager (genserve.training.manager), which trains it in a worker process and serves the
result as `ft:<base>:<suffix or "genserve">:<job-id>`; genserve.runtime.lifecycle starts and
stops it once the base model is loaded. A job belongs to the project of the key that created it
(so do its result file and its model): other projects get 404 for it, as for a missing id, and
a project may have ServerConfig.quotas.max_active_jobs unfinished jobs at once.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import ConfigDict, Field, field_validator

from genserve.api.auth import Principal, principal
from genserve.api.errors import APIError, bad_request, model_not_found
from genserve.api.files import get_record, quota_exceeded
from genserve.api.models import runtime_of
from genserve.api.pages import listing
from genserve.api.schemas import Metadata, WireModel
from genserve.config import ServerConfig
from genserve.storage.files import FileStore
from genserve.storage.jobs import CheckpointRecord, EventRecord, JobRecord
from genserve.training.manager import (
    JobFinishedError,
    JobManager,
    JobRequest,
    JobStateError,
    checkpoint_model_id,
    fine_tuned_model_id,
)

log = logging.getLogger(__name__)
router = APIRouter()

CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    # A DPO job's accuracies: the share of pairs whose preferred output has the higher reward.
    "train_mean_reward_accuracy",
    "valid_mean_reward_accuracy",
    "full_valid_mean_reward_accuracy",
)
SHARED_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _auto_or(kind: type, low: float, high: float, value: Any) -> Any:
    """The string "auto", or a number in [low, high] (ints) or (low, high] (floats).

    One validator rather than a union, so that an error names the field and nothing else.
    An integer is a JSON integer: 3.0 is refused, as on every other integer field (WireModel).
    """
    if value == "auto":
        return value
    number_ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f'must be "auto" or an integer from {low} to {high}')
    if number_ok and low < value <= high:
        return float(value)
    raise ValueError(f'must be "auto" or a number above {low} and at most {high}')


class Hyperparameters(WireModel):
    # A misspelt hyperparameter is refused (400 naming it) rather than silently not applied.
    model_config = ConfigDict(extra="forbid")

    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        return _auto_or(int, 1, 50, v)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _auto_or(int, 1, 256, v)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        return _auto_or(float, 0, 100, v)


class DPOHyperparameters(Hyperparameters):
    beta: Any = "auto"

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        return _auto_or(float, 0, 2, v)


class SupervisedMethod(WireModel):
    hyperparameters: Hyperparameters | None = None


class DPOMethod(WireModel):
    hyperparameters: DPOHyperparameters | None = None


class Method(WireModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DPOMethod | None = None


class CreateJobRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None
    ) = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: Metadata | None = None


# --- wire shapes -----------------------------------------------------------------------------


def method_card(job: JobRecord) -> dict:
    """OpenAI's `method`: its type, and under it the hyperparameters it trains with."""
    return {"type": job.method, job.method: {"hyperparameters": job.hyperparameters}}


def job_card(job: JobRecord, worker_pid: int | None = None) -> dict:
    error = None
    if job.error is not None:
        error = {"code": job.error.code, "message": job.error.message, "param": job.error.param}
    # The top-level (deprecated) field holds the hyperparameters every method shares.
    hyper = {k: v for k, v in job.hyperparameters.items() if k in SHARED_HYPERPARAMETERS}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": "genserve",
        "result_files": list(job.result_files),
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "integrations": None,
        "seed": job.seed,
        "estimated_finish": None,
        "method": method_card(job),
        "metadata": job.metadata,
        # Extension: the training worker's process id while one runs (for operators).
        "x_genserve_worker_pid": worker_pid,
    }


def event_card(event: EventRecord) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": event.id,
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "data": event.data or {},
        "type": event.type,
    }


def checkpoint_card(ckpt: CheckpointRecord, job: JobRecord) -> dict:
    metrics = {k: ckpt.metrics[k] for k in CHECKPOINT_METRICS if k in ckpt.metrics}
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": ckpt.id,
        "created_at": ckpt.created_at,
        "fine_tuned_model_checkpoint": checkpoint_model_id(fine_tuned_model_id(job), ckpt.step),
        "fine_tuning_job_id": job.id,
        "metrics": metrics,
        "step_number": ckpt.step,
    }


# --- routes ----------------------------------------------------------------------------------


def job_manager(request: Request) -> JobManager:
    return runtime_of(request).job_manager()


def get_job(manager: JobManager, job_id: str, who: Principal) -> JobRecord:
    """The job, if `who`'s project owns it; 404 alike for a missing and a foreign one."""
    job = manager.jobs.get(job_id)
    if job is None or job.project != who.project:
        raise APIError(
            404, f"No fine-tuning job found with id {job_id}", "fine_tuning_job_id", "job_not_found"
        )
    return job


def check_training_file(files: FileStore, file_id: str | None, param: str, who: Principal) -> None:
    if file_id is None:
        return
    record = get_record(files, file_id, who, param)
    if record.purpose != "fine-tune":
        raise bad_request(
            f"{file_id} was uploaded with purpose `{record.purpose}`; fine-tuning needs "
            "purpose `fine-tune`",
            param,
        )


def requested_method(body: CreateJobRequest) -> tuple[str, dict[str, Any]]:
    """(method type, its hyperparameters as asked, "auto" where not given)."""
    method = body.method or Method(type="supervised")
    if method.type == "reinforcement":
        raise bad_request(
            "method `reinforcement` is not supported; use `supervised` or `dpo`", "method.type"
        )
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise bad_request(
            f"`method.{other}` was given for a `{method.type}` job; put its settings in "
            f"`method.{method.type}`",
            f"method.{other}",
        )
    settings = getattr(method, method.type)
    nested = settings.hyperparameters if settings is not None else None
    if nested is not None and body.hyperparameters is not None:
        raise bad_request(
            f"give hyperparameters either in `method.{method.type}` or at the top level, not both",
            "hyperparameters",
        )
    default = DPOHyperparameters() if method.type == "dpo" else Hyperparameters()
    chosen = (nested or body.hyperparameters or default).model_dump()
    if method.type == "dpo":
        chosen.setdefault("beta", "auto")  # the top-level field has no beta
    return method.type, chosen


def check_job_quota(manager: JobManager, who: Principal, config: ServerConfig) -> None:
    limit = config.quotas.max_active_jobs
    active = manager.jobs.count_active(who.project)
    if active >= limit:
        raise quota_exceeded(
            f"this project has {active} unfinished fine-tuning jobs (validating, queued, "
            f"running or paused), its quota of {limit}; wait for one to finish or cancel one",
            config.quotas,
        )


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: CreateJobRequest, request: Request) -> dict:
    manager = job_manager(request)
    rt = runtime_of(request)
    who = principal(request)
    config: ServerConfig = request.app.state.config
    if not config.training.enabled:
        raise APIError(503, "fine-tuning is disabled on this server")
    if rt.adapter(body.model, who.project) is not None:
        raise bad_request("fine-tuning a fine-tuned model is not supported; use its base", "model")
    if body.model not in rt.models:
        raise model_not_found(body.model)
    if body.integrations:
        raise bad_request("integrations are not supported by this server", "integrations")
    check_training_file(manager.files, body.training_file, "training_file", who)
    check_training_file(manager.files, body.validation_file, "validation_file", who)
    method, hyperparameters = requested_method(body)
    # No await from the count to the insert: two requests cannot both take the last place.
    check_job_quota(manager, who, config)
    job = manager.create(
        JobRequest(
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed,
            hyperparameters=hyperparameters,
            metadata=body.metadata,
            project=who.project,
            method=method,
        )
    )
    return job_card(job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    manager = job_manager(request)
    page = manager.jobs.list(after, limit, principal(request).project)
    data = [job_card(j, manager.worker_pid(j.id)) for j in page.data]
    return {"object": "list", "data": data, "has_more": page.has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    manager = job_manager(request)
    return job_card(get_job(manager, job_id, principal(request)), manager.worker_pid(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    return await _change(request, job_id, "cancel")


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, request: Request) -> dict:
    """A running job saves its state before its next step and stops (`pausing`, then
    `paused`); a queued one is paused at once. Its worker's CPU goes to other work meanwhile."""
    return await _change(request, job_id, "pause")


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request) -> dict:
    """A paused job is queued again and continues from where it paused."""
    return await _change(request, job_id, "resume")


async def _change(request: Request, job_id: str, action: str) -> dict:
    """One of the manager's cancel / pause / resume on a job of the caller's project; what
    the job's state does not allow is a 400 naming the job."""
    manager = job_manager(request)
    get_job(manager, job_id, principal(request))
    try:
        job = await getattr(manager, action)(job_id)
    except JobFinishedError as e:
        raise bad_request(str(e), "fine_tuning_job_id", "job_already_finished") from None
    except JobStateError as e:
        raise bad_request(str(e), "fine_tuning_job_id", "invalid_job_state") from None
    return job_card(job, manager.worker_pid(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    manager = job_manager(request)
    get_job(manager, job_id, principal(request))
    page = manager.jobs.events(job_id, after, limit)
    return {"object": "list", "data": [event_card(e) for e in page.data], "has_more": page.has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict:
    manager = job_manager(request)
    job = get_job(manager, job_id, principal(request))
    page = manager.jobs.checkpoints(job_id, after, limit)
    data = [checkpoint_card(c, job) for c in page.data]
    return listing(data, page.has_more, empty=None)
