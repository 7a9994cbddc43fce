"""Where the steps run on Kubernetes: the training steps' op tags and the step executor.

Bound to the environment here, like every other resource (only ``resources/`` reads variables).
Everything is off unless asked for, so a local clone, ``cvops run`` and the tests see no
difference; ``deploy/k8s/values.yaml`` turns it on in the cluster. Read when the code location
loads (the code server, and every run and step pod, which load the same code with the same
environment).

| variable | meaning | default |
|---|---|---|
| ``CVOPS_K8S_EXECUTOR`` | ``1``: each step of a run is its own Kubernetes Job (dagster-k8s's ``k8s_job_executor``, the ``k8s`` extra); needs the ``K8sRunLauncher`` | off: the steps are processes of the run worker |
| ``CVOPS_K8S_GPU_TRAINING`` | ``1``: the ``hpo_study`` and ``trained_model`` steps ask for one NVIDIA GPU and are placed on GPU nodes (takes effect with the executor above) | off |
| ``CVOPS_K8S_GPU_NODE_SELECTOR`` | labels of the GPU nodes, ``key=value[,key=value...]``; empty: no selector | ``nvidia.com/gpu.present=true`` (set by NVIDIA's GPU operator / GPU feature discovery) |
| ``CVOPS_K8S_GPU_TOLERATIONS`` | taints of the GPU nodes the training pods tolerate, kubectl's taint syntax ``key[=value][:effect][,...]``; empty: none | ``nvidia.com/gpu:NoSchedule`` |

One GPU, because training uses one device (``devices=1`` in ``cvops_dagster.training``).
Nothing here imports ``dagster_k8s`` unless the executor is asked for: the code location loads
without the ``k8s`` extra everywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster import ExecutorDefinition

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


def step_executor(environ: Mapping[str, str] | None = None) -> ExecutorDefinition | None:
    """The Kubernetes step executor when ``CVOPS_K8S_EXECUTOR=1``, else None (Dagster's default).

    For ``Definitions(executor=...)``: every job, and assets materialized from the UI, then run
    each step as a Kubernetes Job in the run's image and environment, where the training tags
    above place it.

    Raises:
        ValueError: the variable holds something other than a flag.
        ImportError: asked for without the ``k8s`` extra (``pip install '.[k8s]'``).
    """
    if not _flag(K8S_EXECUTOR_ENV, _environ(environ)):
        return None
    from dagster_k8s import k8s_job_executor  # the `k8s` extra: only where it is asked for

    return k8s_job_executor.configured(STEP_EXECUTOR_CONFIG)
