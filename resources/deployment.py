"""Where the steps run: the step executor (Celery workers, Kubernetes Jobs) and the training
steps' Kubernetes op tags.

Bound to the environment here, like every other resource (only ``resources/`` reads variables).
Everything is off unless asked for, so a local clone, ``cvops run`` and the tests see no
difference; ``deploy/k8s/values.yaml`` turns Kubernetes on in the cluster, ``CVOPS_EXECUTOR=celery``
the Celery workers (``cvops worker``). Read when the code location loads (the code server, every
run worker, and every step's process: a Kubernetes pod, a Celery worker), which load the same
code with the same environment.

| variable | meaning | default |
|---|---|---|
| ``CVOPS_EXECUTOR`` | where the steps of a run execute: ``celery`` (each step a task for the Celery workers, dagster-celery's ``celery_executor``, the ``celery`` extra; start them with ``cvops worker``) or ``k8s`` (the same as ``CVOPS_K8S_EXECUTOR=1``) | empty: Dagster's default, processes of the run worker |
| ``CVOPS_CELERY_BROKER`` | the Celery broker URL the run workers send steps to and ``cvops worker`` takes them from, e.g. ``redis://redis.internal:6379/0``; required with ``CVOPS_EXECUTOR=celery`` | none |
| ``CVOPS_CELERY_BACKEND`` | the Celery result backend URL (the steps' events come back through it) | the broker's URL |
| ``CVOPS_K8S_EXECUTOR`` | ``1``: each step of a run is its own Kubernetes Job (dagster-k8s's ``k8s_job_executor``, the ``k8s`` extra); needs the ``K8sRunLauncher`` | off: the steps are processes of the run worker |
| ``CVOPS_K8S_GPU_TRAINING`` | ``1``: the ``hpo_study`` and ``trained_model`` steps ask for one NVIDIA GPU and are placed on GPU nodes (takes effect with the executor above) | off |
| ``CVOPS_K8S_GPU_NODE_SELECTOR`` | labels of the GPU nodes, ``key=value[,key=value...]``; empty: no selector | ``nvidia.com/gpu.present=true`` (set by NVIDIA's GPU operator / GPU feature discovery) |
| ``CVOPS_K8S_GPU_TOLERATIONS`` | taints of the GPU nodes the training pods tolerate, kubectl's taint syntax ``key[=value][:effect][,...]``; empty: none | ``nvidia.com/gpu:NoSchedule`` |

One GPU, because training uses one device (``devices=1`` in ``cvops_dagster.training``).
Nothing here imports ``dagster_k8s`` or ``dagster_celery`` unless its executor is asked for: the
code location loads without the ``k8s`` and ``celery`` extras everywhere else. Asking for two
executors at once (``CVOPS_EXECUTOR=celery`` with ``CVOPS_K8S_EXECUTOR=1``) fails the load.

The Celery workers run one step at a time each, in their main process (Celery's ``solo``
pool, see :data:`CELERY_WORKER_POOL`): a step that starts processes of its own (``hpo_study``
with ``hpo_workers`` > 1) cannot do so from a child of Celery's default ``prefork`` pool, which
is a daemonic process ("daemonic processes are not allowed to have children"). More steps at
once means more workers (``cvops worker`` once per step slot, on as many machines as wanted).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster import ExecutorDefinition

EXECUTOR_ENV = "CVOPS_EXECUTOR"
CELERY_BROKER_ENV = "CVOPS_CELERY_BROKER"
CELERY_BACKEND_ENV = "CVOPS_CELERY_BACKEND"
K8S_EXECUTOR_ENV = "CVOPS_K8S_EXECUTOR"
GPU_TRAINING_ENV = "CVOPS_K8S_GPU_TRAINING"
GPU_NODE_SELECTOR_ENV = "CVOPS_K8S_GPU_NODE_SELECTOR"
GPU_TOLERATIONS_ENV = "CVOPS_K8S_GPU_TOLERATIONS"

DEFAULT_GPU_NODE_SELECTOR = "nvidia.com/gpu.present=true"
DEFAULT_GPU_TOLERATIONS = "nvidia.com/gpu:NoSchedule"
#: The extended resource NVIDIA's device plugin advertises.
GPU_RESOURCE = "nvidia.com/gpu"
#: Dagster's op tag for the Kubernetes Job of a step (dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY).
K8S_CONFIG_TAG = "dagster-k8s/config"

#: The k8s_job_executor's config: step Jobs are owned by their run's pod, so Kubernetes removes
#: them with it instead of leaving one finished Job per step behind.
STEP_EXECUTOR_CONFIG: dict[str, Any] = {"enable_owner_references": True}

#: The values of ``CVOPS_EXECUTOR`` ("" is Dagster's default executor).
EXECUTORS = ("celery", "k8s")
#: dagster-celery's queue: the one its executor sends steps to unless a step's
#: ``dagster-celery/queue`` tag names another, and the one ``cvops worker`` listens on by default.
CELERY_QUEUE = "dagster"
#: Celery's pool for ``cvops worker``: the task (one Dagster step) runs in the worker's main
#: process, which may start processes of its own (the parallel HPO workers); a child of the
#: default ``prefork`` pool is daemonic and may not. One step per worker at a time.
CELERY_WORKER_POOL = "solo"
#: Settings of the Celery app, the same for the run workers (which send) and ``cvops worker``
#: (which receives), on top of dagster-celery's own defaults:
#: - one step reserved per worker at a time (a long training step must not hold a second
#:   step back that an idle worker could run);
#: - a task is acknowledged when a worker takes it (Celery's default, stated): redelivering an
#:   unacknowledged one after the Redis transport's visibility timeout would run a long training
#:   step twice at once;
#: - the worker leaves stdout/stderr alone, so Dagster captures each step's output into the
#:   compute log manager (S3 with deploy/dagster.yaml) instead of Celery's log;
#: - the broker connection is retried at start, so workers may start before Redis does.
CELERY_APP_CONFIG: dict[str, Any] = {
    "worker_prefetch_multiplier": 1,
    "task_acks_late": False,
    "worker_redirect_stdouts": False,
    "broker_connection_retry_on_startup": True,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _flag(name: str, environ: Mapping[str, str]) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={environ[name]!r}: expected 1 or 0 (true/false)")


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_node_selector(value: str, name: str = GPU_NODE_SELECTOR_ENV) -> dict[str, str]:
    """``key=value[,key=value...]`` as a node selector; an empty string is no selector.

    Raises:
        ValueError: an item is not ``key=value`` (the variable is named).
    """
    selector: dict[str, str] = {}
    for item in _items(value):
        key, sep, label = item.partition("=")
        key, label = key.strip(), label.strip()
        if not sep or not key or any(c.isspace() for c in key + label):
            raise ValueError(f"{name}: {item!r} is not key=value")
        selector[key] = label
    return selector


def parse_tolerations(value: str, name: str = GPU_TOLERATIONS_ENV) -> list[dict[str, str]]:
    """kubectl's taint syntax ``key[=value][:effect]`` (comma-separated) as pod tolerations.

    A value makes the toleration ``Equal`` to it, none ``Exists``; no effect tolerates every
    effect of that taint. An empty string is no toleration.

    Raises:
        ValueError: an item has no key, or an effect Kubernetes does not know (the variable is named).
    """
    tolerations: list[dict[str, str]] = []
    for item in _items(value):
        taint, _, effect = item.partition(":")
        key, sep, taint_value = taint.partition("=")
        key, taint_value, effect = key.strip(), taint_value.strip(), effect.strip()
        if not key or any(c.isspace() for c in key + taint_value):
            raise ValueError(f"{name}: {item!r} is not key[=value][:effect]")
        if effect and effect not in _TAINT_EFFECTS:
            raise ValueError(f"{name}: {item!r}: effect must be one of {sorted(_TAINT_EFFECTS)}")
        toleration = {"key": key, "operator": "Equal" if sep else "Exists"}
        if sep:
            toleration["value"] = taint_value
        if effect:
            toleration["effect"] = effect
        tolerations.append(toleration)
    return tolerations


def training_op_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Op tags of the training steps (``hpo_study``, ``trained_model``).

    ``{"dagster-k8s/config": {...}}`` when ``CVOPS_K8S_GPU_TRAINING=1``: one NVIDIA GPU as a
    container limit, the GPU nodes' selector and tolerations (see the module docstring for the
    variables and their defaults); ``{}`` otherwise. The k8s_job_executor applies it to the
    step's pod; any other executor ignores it.

    Raises:
        ValueError: a variable holds something unusable (it is named), so the code location
            fails to load instead of scheduling training where it cannot run.
    """
    env = _environ(environ)
    if not _flag(GPU_TRAINING_ENV, env):
        return {}
    pod_spec: dict[str, Any] = {}
    selector = parse_node_selector(env.get(GPU_NODE_SELECTOR_ENV, DEFAULT_GPU_NODE_SELECTOR))
    if selector:
        pod_spec["node_selector"] = selector
    tolerations = parse_tolerations(env.get(GPU_TOLERATIONS_ENV, DEFAULT_GPU_TOLERATIONS))
    if tolerations:
        pod_spec["tolerations"] = tolerations
    config: dict[str, Any] = {"container_config": {"resources": {"limits": {GPU_RESOURCE: "1"}}}}
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return {K8S_CONFIG_TAG: config}


def selected_executor(environ: Mapping[str, str] | None = None) -> str | None:
    """The executor the environment asks for: ``"celery"``, ``"k8s"`` or None (Dagster's default).

    Raises:
        ValueError: an unknown ``CVOPS_EXECUTOR``, a bad ``CVOPS_K8S_EXECUTOR`` flag, or the two
            asking for different executors (both are named).
    """
    env = _environ(environ)
    raw = env.get(EXECUTOR_ENV, "")
    chosen = raw.strip().lower() or None
    if chosen is not None and chosen not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={raw!r}: expected one of {list(EXECUTORS)} or empty (Dagster's default)")
    if _flag(K8S_EXECUTOR_ENV, env):
        if chosen not in (None, "k8s"):
            raise ValueError(
                f"{EXECUTOR_ENV}={raw!r} and {K8S_EXECUTOR_ENV}={env[K8S_EXECUTOR_ENV]!r} ask for two executors: keep one"
            )
        chosen = "k8s"
    return chosen


def celery_executor_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``celery_executor``'s config from the environment: broker, result backend (the
    broker's URL unless ``CVOPS_CELERY_BACKEND`` names another) and :data:`CELERY_APP_CONFIG`.

    Raises:
        ValueError: ``CVOPS_CELERY_BROKER`` is not set (it is named).
    """
    env = _environ(environ)
    broker = env.get(CELERY_BROKER_ENV, "").strip()
    if not broker:
        raise ValueError(f"{EXECUTOR_ENV}=celery needs {CELERY_BROKER_ENV}, the broker's URL (e.g. redis://host:6379/0)")
    backend = env.get(CELERY_BACKEND_ENV, "").strip() or broker
    return {"broker": broker, "backend": backend, "config_source": dict(CELERY_APP_CONFIG)}


def step_executor(environ: Mapping[str, str] | None = None) -> ExecutorDefinition | None:
    """The step executor the environment asks for (:func:`selected_executor`), else None
    (Dagster's default: the steps are processes of the run worker).

    For ``Definitions(executor=...)``: every job, and assets materialized from the UI, then run
    each step as a Celery task on ``cvops worker`` processes (``celery``), or as a Kubernetes Job
    in the run's image and environment, where the training tags above place it (``k8s``).
    The executor's config is complete here, so a run's config never names one.

    Raises:
        ValueError: a variable holds something unusable (it is named).
        ImportError: asked for without its extra (``pip install '.[celery]'`` / ``'.[k8s]'``).
    """
    chosen = selected_executor(environ)
    if chosen == "celery":
        config = celery_executor_config(environ)
        from celery.exceptions import DuplicateTaskNameWarning
        from dagster_celery import celery_executor  # the `celery` extra: only where it is asked for

        # dagster-celery 0.29 registers its one step task on the run worker's app again for every
        # step it sends (executor._submit_task); Celery 5.7 warns that the name is taken, for
        # the same task. Only that warning, only for that task, is silenced.
        warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered", category=DuplicateTaskNameWarning)
        return celery_executor.configured(config)
    if chosen == "k8s":
        from dagster_k8s import k8s_job_executor  # the `k8s` extra: only where it is asked for

        return k8s_job_executor.configured(STEP_EXECUTOR_CONFIG)
    return None


def celery_worker_app(environ: Mapping[str, str] | None = None):  # noqa: ANN201 - a celery.Celery, imported lazily
    """The Celery app of ``cvops worker``: the executor's broker, backend and settings
    (:func:`celery_executor_config`), with dagster-celery's step task registered, so a worker
    takes exactly the tasks the run workers send.

    Raises:
        ValueError: ``CVOPS_EXECUTOR`` is not ``celery`` or the broker is missing (named), so a
            worker never waits on a broker the runs do not use.
    """
    env = _environ(environ)
    if selected_executor(env) != "celery":
        raise ValueError(
            f"a Celery worker serves the Celery executor: set {EXECUTOR_ENV}=celery and {CELERY_BROKER_ENV} "
            "here as for the runs (the code location its steps load must pick the same executor)"
        )
    config = celery_executor_config(env)
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    app = make_app(CeleryExecutor.for_cli(**config).app_args())
    create_task(app)  # dagster-celery's `execute_plan`: one step of a run
    return app
