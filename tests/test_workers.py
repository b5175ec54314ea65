"""workers/: the cluster definitions a user deploys evonas with, checked as far as this
machine can: the launcher YAML by Ray's own schema (what `ray up` checks first), and in all
three files what must not drift silently: token authentication on every node, the
dashboard on 127.0.0.1 only, one Ray version in image and manifest that satisfies the
package's requirement, and setup commands that call code evonas still has."""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
from importlib.metadata import metadata, requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

WORKERS = Path(__file__).resolve().parent.parent / "workers"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((WORKERS / "cluster-aws-gpu.yaml").read_text())


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return list(yaml.safe_load_all((WORKERS / "kuberay-raycluster.yaml").read_text()))


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (WORKERS / "Dockerfile").read_text()


def _ray_cluster(manifest: list[dict]) -> dict:
    (cluster,) = [doc for doc in manifest if doc["kind"] == "RayCluster"]
    return cluster


def test_launcher_config_passes_rays_own_schema(launcher):
    # Ray's private validator is the one `ray up` runs; a misspelt key is caught here, not
    # on a cloud account. The misspelt copy proves the validator still bites.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_every_node_authenticates_with_a_token_and_keeps_its_dashboard_local(
        launcher, manifest, dockerfile):
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    (head_start,) = [c for c in launcher["head_start_ray_commands"] if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start

    cluster = _ray_cluster(manifest)
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    # Nothing in the manifest opens the cluster to the outside.
    exposed = [d for d in manifest if d["kind"] == "Ingress" or (
        d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort"))]
    assert not exposed
    policy = [d for d in manifest if d["kind"] == "NetworkPolicy"]
    assert policy and policy[0]["spec"]["podSelector"]["matchLabels"] == {
        "ray.io/cluster": cluster["metadata"]["name"]}

    assert re.search(r"^ENV .*RAY_AUTH_MODE=token", dockerfile, re.M | re.S)


def test_image_and_manifest_name_one_ray_that_the_package_accepts(manifest, dockerfile):
    image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", dockerfile,
                      re.M)
    assert image, "workers/Dockerfile names no rayproject/ray image"
    ray_version, python = image.group(1), f"{image.group(2)}.{image.group(3)}"
    assert _ray_cluster(manifest)["spec"]["rayVersion"] == ray_version
    (ray_req,) = [Requirement(r) for r in requires("evonas") if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(ray_version), (ray_version, str(ray_req))
    assert SpecifierSet(metadata("evonas")["Requires-Python"]).contains(python), python


def _python_snippets(launcher: dict, manifest: list[dict]) -> list[str]:
    commands = [c for c in launcher["setup_commands"] if c.startswith("python -c")]
    commands = [re.match(r'python -c "(.*)"$', c).group(1) for c in commands]
    spec = _ray_cluster(manifest)["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod.get("initContainers", []):
            if container["command"][:2] == ["python", "-c"]:
                commands.append(container["command"][2])
    return commands


def test_setup_commands_call_functions_evonas_has_with_arguments_they_take(launcher, manifest):
    snippets = _python_snippets(launcher, manifest)
    assert len(snippets) == 3  # the launcher's setup, the head's and the GPU group's init
    for code in snippets:
        tree = ast.parse(code)
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert calls, code
        for call in calls:
            func = names[call.func.id]
            args = [ast.literal_eval(a) for a in call.args]
            inspect.signature(func).bind(*args)
