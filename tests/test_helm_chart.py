"""The Helm chart (deploy/helm/inference-gateway), offline: lint and render with helm-python-sdk over the values
matrix in its ci/ folder, every render validated strictly against Kubernetes' schemas (kubernetes-validate),
and the rendered objects checked: probes, resources, security contexts, Secret references, the settings the
code reads, the KEDA lists against the Celery queues' Redis keys, and the NetworkPolicies' allowed flows.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache
from pathlib import Path
from unittest import mock

import helm_python
import kubernetes_validate
import pytest
import yaml

from inference.config import Settings
from inference.jobs.celery_backend import celery_config, hard_time_limit
from tests.kube.check_kube import redis_lists

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHART = PROJECT_ROOT / "deploy" / "helm" / "inference-gateway"
MATRIX = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
#: the oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest kubernetes-validate knows
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
RELEASE = "site"

helm_python.disable_logging()


def values_of(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text(encoding="utf-8")) or {}


def render(values: dict | None = None) -> list[dict]:
    """The chart rendered as an install of release RELEASE in namespace "imaging": its objects."""
    rendered = helm_python.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace="imaging",
                                                         is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


@cache
def rendered(name: str) -> tuple:
    return tuple(render(values_of(name)))


def kind(docs, kind_name: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind_name]


def workload(docs, component: str) -> dict:
    """The Deployment or StatefulSet of a component."""
    return next(doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")
                and doc["metadata"]["labels"]["app.kubernetes.io/component"] == component)


def pod_specs(docs) -> list[tuple[str, dict]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"]) for doc in docs
            if doc["kind"] in ("Deployment", "StatefulSet")]


def container(docs, component: str) -> dict:
    return workload(docs, component)["spec"]["template"]["spec"]["containers"][0]


def environment(docs, component: str) -> dict[str, str]:
    """The variables a component's container sees: the settings ConfigMap, then its own env (values only)."""
    spec = container(docs, component)
    maps = {doc["metadata"]["name"]: doc["data"] for doc in kind(docs, "ConfigMap")}
    env = {}
    for source in spec.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in spec.get("env", []):
        env[item["name"]] = item.get("value", "<from a reference>")
    return env


# -- lint, render, validate -----------------------------------------------------------------------------------

def test_the_values_matrix_holds_the_issue_s_cases():
    assert {"default-values.yaml", "external-redis-values.yaml", "gpu-values.yaml", "keda-values.yaml",
            "orthanc-ohif-values.yaml"} <= set(MATRIX)


@pytest.mark.parametrize("values", MATRIX)
def test_lint_strict_finds_no_warning_or_error(values):
    report = helm_python.lint(str(CHART), values_of(values), strict=True)
    findings = [message for message in report["messages"] if message["severity"] >= 2]
    assert not report["errors"] and not findings, report


@pytest.mark.parametrize("values", MATRIX)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_render_validates_strictly_against_kubernetes_schemas(values, version):
    docs = rendered(values)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # KEDA's custom resources: no bundled schema (test_keda_* check them)
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the field


def test_strict_validation_catches_a_misspelt_field():
    """The check above is not vacuous: a field Kubernetes does not know fails it."""
    deployment = dict(workload(rendered("default-values.yaml"), "gateway"))
    deployment["spec"] = {**deployment["spec"], "replicaz": 2}
    with pytest.raises(kubernetes_validate.ValidationError, match="replicaz"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[1], strict=True)


@pytest.mark.parametrize("values, where", [
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"redis": {"image": {"tag": "latest"}}}, "/redis/image/tag"),
    ({"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}, "/autoscaling/keda/minReplicas"),
    ({"redis": {"auth": {"existingSecret": ""}}}, "/redis/auth/existingSecret"),
    ({"redis": {"enabled": False}}, "/externalRedis/urlSecret/name"),
    ({"gatewy": {"replicas": 2}}, "additional properties 'gatewy'"),
    ({"jobs": {"queues": "get-hippocampus-volume gpu"}}, "/jobs/queues"),
    ({"dicomNode": {"destinations": ["PACS at pacs:104"]}}, "/dicomNode/destinations/0"),
    ({"dicomNode": {"aeTitle": "A\\B"}}, "/dicomNode/aeTitle"),
    ({"storage": {"accessMode": "ReadOnlyMany"}}, "/storage/accessMode"),
    ({"extraSettings": {"INFERENCE_API_TOKEN": "inline"}}, "/extraSettings"),
    ({"tls": {"gateway": {"enabled": True}}}, "/tls/gateway"),
    ({"ohif": {"enabled": True}}, "/orthanc/enabled"),
    ({"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}, "/autoscaling"),
    ({"gateway": {"resources": {"limits": None}}}, "/gateway/resources"),
])
def test_the_schema_rejects_bad_values_naming_them(values, where):
    with pytest.raises(helm_python.HelmValuesError) as error:
        render(values)
    assert where in str(error.value)


@pytest.mark.parametrize("values, message", [
    ({"worker": {"terminationGracePeriodSeconds": 60}}, "must be at least jobs.timeLimit"),
    ({"jobs": {"visibilityTimeout": 930}}, "must exceed the job's hard time limit"),
    ({"redis": {"enabled": False}, "externalRedis": {"urlSecret": {"name": "url"}},
      "autoscaling": {"keda": {"enabled": True}}}, "needs externalRedis.address"),
])
def test_the_templates_refuse_inconsistent_values(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


# -- what runs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", MATRIX)
def test_no_image_is_latest_or_untagged(values):
    for name, spec in pod_specs(rendered(values)):
        for one in spec["containers"]:
            repository, _, tag = one["image"].rpartition(":")
            assert repository and tag and tag != "latest" and "/" not in tag, (name, one["image"])


def test_the_gateway_image_defaults_to_the_chart_s_app_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    image = container(rendered("default-values.yaml"), "gateway")["image"]
    assert image == f"hippocampus-inference:{chart['appVersion']}"


@pytest.mark.parametrize("values", MATRIX)
def test_every_container_has_requests_and_limits(values):
    for name, spec in pod_specs(rendered(values)):
        for one in spec["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(one["resources"][bound]), (name, one["name"], bound)


@pytest.mark.parametrize("values", MATRIX)
def test_pods_run_unprivileged_with_a_read_only_root_and_no_capabilities(values):
    for name, spec in pod_specs(rendered(values)):
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        for one in spec["containers"]:
            context = one["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, one["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, one["name"])
            assert context["privileged"] is False and context["capabilities"]["drop"] == ["ALL"], (name, one["name"])
            assert "add" not in context["capabilities"]


def test_the_image_s_user_runs_the_gateway_worker_and_node():
    docs = rendered("default-values.yaml")
    for component in ("gateway", "worker", "dicom-node"):
        assert workload(docs, component)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_writable_places_are_volumes_and_the_spool_is_the_node_s():
    """With a read-only root, /tmp, the model cache and the roots are volumes; only the node writes the spool."""
    docs = rendered("default-values.yaml")
    for component in ("gateway", "worker", "dicom-node"):
        mounts = {mount["mountPath"]: mount for mount in container(docs, component)["volumeMounts"]}
        assert {"/tmp", "/var/lib/inference/jobs", "/var/lib/inference/pacs", "/var/lib/inference/model-cache",
                "/data"} <= set(mounts)
        assert mounts["/data"]["readOnly"] is True
        assert mounts["/var/lib/inference/pacs"]["readOnly"] is (component != "dicom-node"), component


# -- probes ------------------------------------------------------------------------------------------------------

def test_the_gateway_is_probed_on_healthcheck():
    gateway = container(rendered("default-values.yaml"), "gateway")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/healthcheck", "port": "http", "scheme": "HTTP"}, probe
    # the start-up allows the models' warm-up: five minutes
    assert gateway["startupProbe"]["periodSeconds"] * gateway["startupProbe"]["failureThreshold"] >= 300
    with_tls = container(rendered("keda-values.yaml"), "gateway")
    assert with_tls["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_the_worker_node_and_redis_probes():
    docs = rendered("default-values.yaml")
    worker = container(docs, "worker")["livenessProbe"]
    assert "celery -A worker inspect ping" in worker["exec"]["command"][-1]
    assert "celery@$(hostname)" in worker["exec"]["command"][-1]
    node = container(docs, "dicom-node")["livenessProbe"]["exec"]["command"]
    assert node[:4] == ["python", "-m", "pynetdicom", "echoscu"] and node[-2:] == ["127.0.0.1", "11112"]
    redis = container(docs, "redis")
    assert redis["livenessProbe"]["exec"]["command"] == ["redis-cli", "-e", "-p", "6379", "ping"]
    assert {item["name"] for item in redis["env"]} == {"REDIS_PASSWORD", "REDISCLI_AUTH"}


def test_the_podman_profile_uses_probes_podman_can_run():
    """podman runs httpGet with curl (absent from the image) and fails `sh -c` probes: plain commands there."""
    docs = rendered("podman-values.yaml")
    gateway = container(docs, "gateway")
    assert gateway["livenessProbe"]["exec"]["command"] == ["python", "healthcheck.py"]
    assert "startupProbe" not in gateway and "livenessProbe" not in container(docs, "worker")
    assert workload(docs, "redis")["kind"] == "Deployment"
    assert not kind(docs, "StatefulSet")


# -- secrets -----------------------------------------------------------------------------------------------------

SECRET_SETTINGS = {field.metadata["env"] for field in dataclasses.fields(Settings) if field.metadata.get("secret")}


@pytest.mark.parametrize("values", MATRIX)
def test_secrets_are_referenced_never_inlined(values):
    docs = rendered(values)
    assert not kind(docs, "Secret"), "the chart must not create Secrets (it would hold their values)"
    for doc in kind(docs, "ConfigMap"):
        assert not SECRET_SETTINGS & set(doc["data"]), doc["metadata"]["name"]
    for name, spec in pod_specs(docs):
        for one in spec["containers"]:
            for item in one.get("env", []):
                if item["name"] in SECRET_SETTINGS | {"REDIS_PASSWORD", "REDISCLI_AUTH"}:
                    reference = item.get("valueFrom", {}).get("secretKeyRef")
                    # the in-cluster broker URL embeds the password variable, expanded by the kubelet
                    assert reference or item["value"].count("$(REDIS_PASSWORD)") == 1, (name, item)


def test_secret_references_name_the_values_secrets():
    docs = rendered("keda-values.yaml")
    references = {(item["name"], item["valueFrom"]["secretKeyRef"]["name"])
                  for item in container(docs, "gateway")["env"]
                  if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]}
    assert references == {("REDIS_PASSWORD", "inference-gateway-redis"), ("INFERENCE_API_TOKEN", "inference-api-token")}
    for component in ("worker", "dicom-node"):  # only the API checks the token
        assert "INFERENCE_API_TOKEN" not in environment(docs, component)
    external = container(rendered("external-redis-values.yaml"), "worker")["env"]
    url = next(item for item in external if item["name"] == "INFERENCE_BROKER_URL")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "site-redis-url", "key": "url"}


def test_tls_settings_point_into_the_mounted_secrets():
    """Issue 39's settings: each names a file of a mounted Secret volume (off by default)."""
    docs = rendered("keda-values.yaml")
    expected = {"gateway": {"INFERENCE_TLS_CERT", "INFERENCE_TLS_KEY", "INFERENCE_TLS_CLIENT_CA",
                            "INFERENCE_REDIS_TLS_CERT", "INFERENCE_REDIS_TLS_KEY", "INFERENCE_REDIS_TLS_CA"},
                "worker": {"INFERENCE_REDIS_TLS_CERT", "INFERENCE_REDIS_TLS_KEY", "INFERENCE_REDIS_TLS_CA"},
                "dicom-node": {"INFERENCE_PACS_TLS_CERT", "INFERENCE_PACS_TLS_KEY", "INFERENCE_PACS_TLS_CA",
                               "INFERENCE_REDIS_TLS_CERT", "INFERENCE_REDIS_TLS_KEY", "INFERENCE_REDIS_TLS_CA"}}
    for component, names in expected.items():
        spec = workload(docs, component)["spec"]["template"]["spec"]
        secrets = {volume["name"]: volume["secret"]["secretName"] for volume in spec["volumes"] if "secret" in volume}
        mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
        tls = {item["name"]: item["value"] for item in spec["containers"][0]["env"] if "_TLS_" in item["name"]}
        assert set(tls) == names, component
        for path in tls.values():
            volume = mounts[str(Path(path).parent)]
            assert volume in secrets, (component, path)
    assert secrets["tls-dicom-ca"] == "hospital-ca"
    assert not any("_TLS_" in name for name in environment(rendered("default-values.yaml"), "gateway"))
    assert "rediss://" in environment(docs, "worker")["INFERENCE_BROKER_URL"]


# -- the settings the code reads ------------------------------------------------------------------------------

@pytest.mark.parametrize("values", MATRIX)
@pytest.mark.parametrize("component", ["gateway", "worker", "dicom-node"])
def test_the_rendered_settings_are_valid_for_the_code(values, component):
    """inference.config reads each component's environment without error; workers and API agree on the queues."""
    env = {name: value for name, value in environment(rendered(values), component).items()
           if value != "<from a reference>"}
    env.setdefault("INFERENCE_BROKER_URL", "redis://:password@redis:6379/0")
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings.from_env()
    assert settings.job_backend == "celery"
    config = celery_config(settings)  # the visibility timeout exceeds the hard limit, or this raises
    assert config["task_acks_late"] is True and config["worker_prefetch_multiplier"] == 1


@pytest.mark.parametrize("values", MATRIX)
def test_workers_get_at_least_the_job_time_limit_to_stop(values):
    docs = rendered(values)
    limit = int(environment(docs, "worker")["INFERENCE_JOB_TIME_LIMIT"])
    grace = workload(docs, "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= hard_time_limit(limit) >= limit


def test_the_routing_rules_model_manifest_and_orthanc_s_script_are_the_repository_s():
    docs = rendered("orthanc-ohif-values.yaml")
    maps = {doc["metadata"]["name"]: doc["data"] for doc in kind(docs, "ConfigMap")}
    rules = maps[f"{RELEASE}-inference-gateway-routing-rules"]["routing-rules.yaml"]
    assert yaml.safe_load(rules) == yaml.safe_load((PROJECT_ROOT / "deploy" / "routing-rules.yaml").read_text())
    orthanc = maps[f"{RELEASE}-inference-gateway-orthanc-config"]
    script = (PROJECT_ROOT / "deploy" / "orthanc" / "autoroute.lua").read_text()
    assert orthanc["autoroute.lua"].strip() == script.strip()
    modality = yaml.safe_load(orthanc["orthanc.json"])["DicomModalities"]["hippoai"]
    assert modality == ["HIPPOAI", f"{RELEASE}-inference-gateway-dicom-node", 11112]
    # the repository's manifest with its files named under the image's /app/models/ (the code's folder there)
    manifest = maps[f"{RELEASE}-inference-gateway-model-manifest"]["manifest.yaml"]
    assert manifest.replace("/app/models/", "") == (PROJECT_ROOT / "models" / "manifest.yaml").read_text()
    for component in ("gateway", "worker", "dicom-node"):
        mounts = {mount["mountPath"]: mount["name"] for mount in container(docs, component)["volumeMounts"]}
        assert mounts["/etc/hippoai/models"] == "model-manifest", component
        assert environment(docs, component)["INFERENCE_MODEL_MANIFEST"] == "/etc/hippoai/models/manifest.yaml"
    node = environment(docs, "dicom-node")
    assert node["INFERENCE_PACS_DESTINATIONS"] == f"ORTHANC@{RELEASE}-inference-gateway-orthanc:4242"


# -- scaling -----------------------------------------------------------------------------------------------------

def scaled_object(docs) -> dict:
    return next(doc for doc in docs if doc["kind"] == "ScaledObject")


@pytest.mark.parametrize("values", ["keda-values.yaml", "external-redis-values.yaml"])
def test_keda_watches_every_list_of_the_celery_queues(values):
    """The lists KEDA reads are the Redis keys Celery uses for the configured queues, priority lists included."""
    docs = rendered(values)
    queues = environment(docs, "worker")["INFERENCE_JOB_QUEUES"]
    watched = [trigger["metadata"]["listName"] for trigger in scaled_object(docs)["spec"]["triggers"]]
    assert sorted(watched) == sorted(redis_lists(queues))
    assert {"gpu", "cpu", "gpu\x06\x169"} <= set(watched)
    # no key prefix in the code's transport options: a prefix would rename every list
    with mock.patch.dict(os.environ, {"INFERENCE_JOB_QUEUES": queues}, clear=True):
        assert "global_keyprefix" not in celery_config(Settings.from_env())["broker_transport_options"]


def test_keda_follows_other_queue_names():
    keda = {"keda": {"enabled": True}}
    docs = render({"jobs": {"queues": "get-hippocampus-volume=mri, *=batch"}, "autoscaling": keda})
    watched = {trigger["metadata"]["listName"] for trigger in scaled_object(docs)["spec"]["triggers"]}
    assert watched == set(redis_lists("get-hippocampus-volume=mri, *=batch"))
    docs = render({"jobs": {"queues": "get-hippocampus-volume=gpu"}, "autoscaling": keda})
    watched = {trigger["metadata"]["listName"] for trigger in scaled_object(docs)["spec"]["triggers"]}
    assert watched == set(redis_lists("get-hippocampus-volume=gpu")), "a queue map without * still has cpu"


def test_keda_keeps_one_worker_and_owns_the_replicas():
    docs = rendered("keda-values.yaml")
    scaled = scaled_object(docs)
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["scaleTargetRef"]["name"] == workload(docs, "worker")["metadata"]["name"]
    assert "replicas" not in workload(docs, "worker")["spec"]
    auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
    password = {"parameter": "password", "name": "inference-gateway-redis", "key": "password"}
    assert password in auth["spec"]["secretTargetRef"]
    triggers = scaled["spec"]["triggers"]
    assert all(trigger["authenticationRef"]["name"] == auth["metadata"]["name"] for trigger in triggers)
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{RELEASE}-inference-gateway-redis.imaging.svc:6379"


def test_the_hpa_scales_workers_on_the_queue_depth():
    docs = rendered("hpa-values.yaml")
    hpa = next(doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == workload(docs, "worker")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "inference_job_queue_depth"
    assert hpa["spec"]["minReplicas"] >= 1


# -- storage and GPU ----------------------------------------------------------------------------------------------

def test_read_write_once_keeps_every_pod_beside_the_node():
    for values, together in (("gpu-values.yaml", True), ("default-values.yaml", False)):
        docs = rendered(values)
        for component in ("gateway", "worker", "dicom-node"):
            template = workload(docs, component)["spec"]["template"]
            affinity = template["spec"].get("affinity", {}).get("podAffinity")
            if together:
                term = affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]
                assert term["topologyKey"] == "kubernetes.io/hostname"
                assert term["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            else:
                assert affinity is None
        claims = {doc["spec"]["accessModes"][0] for doc in kind(docs, "PersistentVolumeClaim")
                  if doc["metadata"]["name"].endswith(("-jobs", "-spool"))}
        assert claims == {"ReadWriteOnce" if together else "ReadWriteMany"}


def test_the_gpu_values_give_workers_a_gpu_on_gpu_nodes():
    docs = rendered("gpu-values.yaml")
    for component in ("worker", "gateway"):
        spec = workload(docs, component)["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in container(docs, "dicom-node")["resources"]["limits"]
    assert "nvidia.com/gpu" not in container(rendered("default-values.yaml"), "worker")["resources"]["limits"]


def test_redis_is_one_replica_with_an_append_only_file_on_a_claim():
    redis = workload(rendered("default-values.yaml"), "redis")
    assert redis["kind"] == "StatefulSet" and redis["spec"]["replicas"] == 1
    command = redis["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--appendonly yes" in command and "--appendfsync always" in command and '"$REDIS_PASSWORD"' in command
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert not any(doc["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"
                   for doc in rendered("external-redis-values.yaml") if doc["kind"] in ("StatefulSet", "Service"))


def test_orthanc_and_ohif_are_off_by_default():
    def components(values):
        return {doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in rendered(values)}
    assert not {"orthanc", "ohif"} & components("default-values.yaml")
    assert {"orthanc", "ohif"} <= components("orthanc-ohif-values.yaml")


# -- network policy: the flows it allows -----------------------------------------------------------------------

#: every port any component listens on: each flow is tried on each, so a policy opening a port it should not shows
PORTS = (8900, 11112, 9102, 6379, 4242, 8042, 8080)


def pod_labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "inference-gateway", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": component}


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def peer_matches(peer: dict, labels: dict, namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # the pods (and outside callers) modelled here have no address in a block
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
    else:
        in_namespace = namespace == "imaging"
    return in_namespace and selects(peer.get("podSelector", {}), labels)


def allowed(policies, direction: str, subject: dict, peer_labels: dict, peer_namespace: str, port: int) -> bool:
    """Whether the policies selecting ``subject`` allow this flow (no policy selecting it: allowed)."""
    relevant = [policy["spec"] for policy in policies if selects(policy["spec"]["podSelector"], subject)
                and direction.capitalize() in policy["spec"]["policyTypes"]]
    if not relevant:
        return True
    key = "from" if direction == "ingress" else "to"
    for spec in relevant:
        for rule in spec.get(direction, []):
            peers_ok = not rule.get(key) or any(peer_matches(peer, peer_labels, peer_namespace) for peer in rule[key])
            ports_ok = not rule.get("ports") or any(item.get("port") == port for item in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def flows(docs) -> set[tuple[str, str, int]]:
    """Every (from, to, port) between the release's pods and callers outside it that the policies allow."""
    policies = kind(docs, "NetworkPolicy")
    present = {doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in docs
               if doc["kind"] in ("Deployment", "StatefulSet")}
    callers = {component: (pod_labels(component), "imaging") for component in present}
    callers["outside"] = ({"app": "client"}, "other")
    callers["clinical-apps"] = ({"app": "client"}, "clinical-apps")
    callers["keda"] = ({"app": "keda-operator"}, "keda")
    callers["monitoring"] = ({"app": "prometheus"}, "monitoring")
    result = set()
    for source, (labels, namespace) in callers.items():
        for target in present - {source}:
            for port in PORTS:
                leaves = (source not in present
                          or allowed(policies, "egress", labels, pod_labels(target), "imaging", port))
                if leaves and allowed(policies, "ingress", pod_labels(target), labels, namespace, port):
                    result.add((source, target, port))
    return result


INTERNAL = {("gateway", "redis", 6379), ("worker", "redis", 6379), ("dicom-node", "redis", 6379)}
OUTSIDE = ("outside", "clinical-apps", "keda", "monitoring")
FROM_ANYWHERE = {(source, target, port) for source in OUTSIDE for target, port in (("gateway", 8900),
                                                                                  ("dicom-node", 11112))}
#: Prometheus (the monitoring namespace) scrapes the node's metrics port; the gateway's /metrics is on its own port
SCRAPE = {("monitoring", "dicom-node", 9102)}


def test_network_policy_allows_only_the_system_s_flows():
    assert flows(rendered("default-values.yaml")) == INTERNAL | FROM_ANYWHERE | SCRAPE


def test_network_policy_with_orthanc_and_ohif():
    orthanc = {("dicom-node", "orthanc", 4242), ("orthanc", "dicom-node", 11112), ("gateway", "orthanc", 8042),
               ("worker", "orthanc", 8042), ("ohif", "orthanc", 8042)}
    outside = {(source, target, port) for source in OUTSIDE for target, port in (("orthanc", 4242), ("ohif", 8080))}
    assert flows(rendered("orthanc-ohif-values.yaml")) == INTERNAL | FROM_ANYWHERE | SCRAPE | orthanc | outside


def test_network_policy_narrowed_to_the_site_s_callers_and_keda():
    """gatewayFrom and dicomFrom narrow who calls in; KEDA's namespace reads Redis."""
    expected = INTERNAL | SCRAPE | {("clinical-apps", "gateway", 8900), ("keda", "redis", 6379)}
    assert flows(rendered("keda-values.yaml")) == expected  # dicomFrom is an address block: no pod here


def test_network_policy_starts_from_default_deny_with_dns():
    docs = rendered("default-values.yaml")
    deny = next(doc for doc in kind(docs, "NetworkPolicy") if doc["metadata"]["name"].endswith("-default-deny"))
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]
    assert deny["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": RELEASE,
                                                         "app.kubernetes.io/name": "inference-gateway"}
    dns = next(doc for doc in kind(docs, "NetworkPolicy") if doc["metadata"]["name"].endswith("-dns"))
    assert {item["port"] for item in dns["spec"]["egress"][0]["ports"]} == {53}
    assert not kind(rendered("podman-values.yaml"), "NetworkPolicy")


def test_the_rendered_model_manifest_loads_with_every_weights_file(tmp_path):
    """The registry reads the chart's manifest and finds (and hashes) every file it names, this checkout's
    models/ standing in for the image's /app/models/."""
    from models.registry import registry_for

    docs = rendered("default-values.yaml")
    manifest = next(doc["data"]["manifest.yaml"] for doc in kind(docs, "ConfigMap") if "manifest.yaml" in doc["data"])
    path = tmp_path / "manifest.yaml"
    path.write_text(manifest.replace("/app/models/", f"{PROJECT_ROOT / 'models'}/"), encoding="utf-8")
    registry = registry_for(path)
    for family in registry.families.values():
        for version in family.versions.values():
            version.verify()


def test_the_node_serves_its_metrics_on_a_named_port():
    docs = rendered("default-values.yaml")
    node = container(docs, "dicom-node")
    assert environment(docs, "dicom-node")["INFERENCE_PACS_METRICS_PORT"] == "9102"
    assert {"name": "metrics", "containerPort": 9102} in node["ports"]
    service = next(doc for doc in kind(docs, "Service") if doc["metadata"]["name"].endswith("-dicom-node"))
    assert {"name": "metrics", "port": 9102, "targetPort": "metrics"} in service["spec"]["ports"]
    podman = rendered("podman-values.yaml")  # podman publishes every containerPort on the host: none there
    assert environment(podman, "dicom-node")["INFERENCE_PACS_METRICS_PORT"] == "0"
    assert [port["name"] for port in container(podman, "dicom-node")["ports"]] == ["dicom"]
