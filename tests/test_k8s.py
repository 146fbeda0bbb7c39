"""The Kubernetes manifests in deploy/k8s/ against the Kubernetes API schema.

`kubernetes-validate` checks each document against the OpenAPI-derived JSON schema of its
kind for a given Kubernetes release, strictly: an unknown field (a typo), a missing required
field or a value of the wrong type fails. The second half shows it catches each of those, so
the first half cannot pass by checking nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
# The oldest release still maintained by the big clouds' managed Kubernetes, and the newest
# the validator knows.
RELEASES = ["1.30.0", kubernetes_validate.latest_version()]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _worker_job() -> dict[str, Any]:
    (job,) = [d for d in _documents(REPO / "deploy/k8s/search-workers.yaml") if d["kind"] == "Job"]
    return job


def test_the_manifests_are_there() -> None:
    assert [p.name for p in MANIFESTS] == ["search-create.yaml", "search-workers.yaml"]
    kinds = sorted(d["kind"] for p in MANIFESTS for d in _documents(p))
    assert kinds == ["Job", "Job", "PersistentVolumeClaim"]


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_is_valid_for_the_kubernetes_api(path: Path, release: str) -> None:
    for document in _documents(path):
        kubernetes_validate.validate(document, release, strict=True)


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def _misspell_command(job: dict[str, Any]) -> None:
    _container(job)["comand"] = _container(job).pop("command")


def _drop_container_name(job: dict[str, Any]) -> None:
    del _container(job)["name"]


def _parallelism_as_words(job: dict[str, Any]) -> None:
    job["spec"]["parallelism"] = "four"


def _env_at_pod_level(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["env"] = _container(job)["env"]


def _restart_policy_as_a_list(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["restartPolicy"] = ["OnFailure"]


@pytest.mark.parametrize(("break_it", "message"), [
    (_misspell_command, "'comand' was unexpected"),
    (_drop_container_name, "'name' is a required property"),
    (_parallelism_as_words, "'four' is not of type 'integer'"),
    (_env_at_pod_level, "'env' was unexpected"),
    (_restart_policy_as_a_list, "is not of type 'string'"),
])
def test_the_validator_rejects_a_broken_job(break_it: Any, message: str) -> None:
    job = copy.deepcopy(_worker_job())
    break_it(job)
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
