"""The Kubernetes work-pool base job template, validated without a cluster (Prefect's templating and schema tools)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from prefect.utilities.schema_tools.validation import validate
from prefect.utilities.templating import find_placeholders

from flows.k8s_template import (
    TEMPLATE_PATH,
    K8sTemplateError,
    deploy,
    gpu_ids,
    gpu_job_variables,
    load_template,
    manifest,
    render,
)
from spo_core.errors import InputError

SAMPLE = {"image": "registry.example.com/spo:1", "namespace": "research"}
# Prefect's variables of every Kubernetes work pool (prefect-kubernetes' KubernetesWorkerJobConfiguration).
PREFECT_VARIABLES = {"env", "labels", "name", "command", "namespace", "image_pull_policy", "finished_job_ttl",
                     "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output", "cluster_config"}


@pytest.fixture(scope="module")
def template():
    return load_template()


def _container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def test_every_placeholder_is_a_declared_variable(template):
    assert set(template) == {"job_configuration", "variables"}
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert PREFECT_VARIABLES <= used  # each one reaches the configuration or the manifest
    assert {"gpus", "image", "cpu", "memory", "secret_name", "shm_size"} <= used


def test_rendered_job_requests_the_gpus_and_mounts_shm(template):
    job = manifest(template, gpu_job_variables(4, **SAMPLE))
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["namespace"] == "research"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and "serviceAccountName" not in pod  # null default: key left out
    c = _container(job)
    assert c["image"] == SAMPLE["image"] and c["args"] == ["prefect", "flow-run", "execute"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert {"name": "SPO_GPUS", "value": "0,1,2,3"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "spo-credentials"}}]
    (mount,) = c["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/dev/shm" and vol["emptyDir"]["medium"] == "Memory"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert not find_placeholders(json.dumps(job))


def test_command_and_env_reach_the_job_configuration(template):
    config = render(template, {**SAMPLE, "command": "prefect flow-run execute abc", "env": {"EXTRA": "1"}})
    assert config["command"] == "prefect flow-run execute abc"
    assert _container(config["job_manifest"])["args"] == "prefect flow-run execute abc"
    assert config["env"] == {"SPO_GPUS": "0", "EXTRA": "1"}  # merged over the default, as a worker does


def test_default_spo_gpus_matches_default_gpus(template):
    props = template["variables"]["properties"]
    assert props["env"]["default"]["SPO_GPUS"] == gpu_ids(props["gpus"]["default"]) == "0"
    assert gpu_ids(0) == "" and gpu_ids(2) == "0,1"


def test_mismatched_gpus_and_spo_gpus_are_refused(template):
    with pytest.raises(K8sTemplateError, match=r"SPO_GPUS='0,1,2,3'") as exc:
        render(template, {**SAMPLE, "gpus": 4})  # SPO_GPUS left at the default "0"
    assert isinstance(exc.value, InputError)
    with pytest.raises(InputError, match="whole number"):
        gpu_ids(-1)


def test_variables_are_a_json_schema_that_checks_job_variables(template):
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert validate(gpu_job_variables(4, **SAMPLE), schema) == []
    bad = validate({**SAMPLE, "gpus": "four"}, schema)
    assert [e.path[0] for e in bad] == ["gpus"]
    assert [e.path[0] for e in validate({**SAMPLE, "memory": "lots"}, schema)] == ["memory"]
    assert validate({"gpus": 1}, schema)  # image is required: no default image has this repository


def test_bad_template_file_is_one_clear_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"variables": {}}')
    with pytest.raises(InputError, match="job_configuration"):
        load_template(path)
    path.write_text("{")
    with pytest.raises(InputError, match="cannot read"):
        load_template(path)
    assert TEMPLATE_PATH.is_file()


def test_server_accepts_the_pool_and_rejects_bad_job_variables(prefect_api, template):
    """A temporary Prefect server (no prefect-kubernetes installed) stores the template and checks deployments."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(name="spo-k8s-test", type="kubernetes",
                                                      base_job_template=template), overwrite=True)
        assert pool.base_job_template == template
        flow_id = client.create_flow_from_name("k8s-template-check")
        ok = client.create_deployment(flow_id, "ok", work_pool_name=pool.name,
                                      job_variables=gpu_job_variables(2, **SAMPLE))
        assert client.read_deployment(ok).job_variables["gpus"] == 2
        with pytest.raises(PrefectHTTPStatusError, match=r"422.*Validation failed for field 'gpus'"):
            client.create_deployment(flow_id, "bad", work_pool_name=pool.name,
                                     job_variables={**SAMPLE, "gpus": "four"})
        no_image = client.create_deployment(flow_id, "no-image", work_pool_name=pool.name, job_variables={})
        with pytest.raises(PrefectHTTPStatusError, match="'image' is a required property"):
            client.create_flow_run_from_deployment(no_image)
        # The registration helper: module-path entrypoints, the image's code, consistent GPU variables.
        (dep_id,) = deploy("registry.example.com/spo:1", pool=pool.name, gpus=2, names=["single"])
        dep = client.read_deployment(dep_id)
        assert (dep.entrypoint, dep.work_pool_name) == ("flows.spo.stage", pool.name) and not dep.pull_steps
        assert dep.job_variables == {"image": "registry.example.com/spo:1", "gpus": 2, "env": {"SPO_GPUS": "0,1"}}
