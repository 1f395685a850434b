"""The deploy files (deploy/), checked offline: they are runnable documentation, so they must stay runnable.

- KubeRay manifests validate against the ``openAPIV3Schema`` of the CRD version they declare (from
  ``shared/kuberay`` beside the repository), as strictly as the API server's field validation: unknown
  fields are errors, ``x-kubernetes-int-or-string`` and ``x-kubernetes-list-map-keys`` are enforced.
  CEL rules (``x-kubernetes-validations``) are not evaluated.
- Every ``stagetrain`` command they contain or document uses a command and options the CLI has, with the
  arguments it takes; every job file it names exists and is a valid spec.
- The clusters they describe can hold those jobs (the same check stagetrain runs before each stage), and
  give the workers at least the job's ``preemption.grace_seconds`` to stop.
- The Dockerfile and the cluster launcher pin the torch, torchvision and Ray of pyproject.toml, and the
  launcher config passes Ray's own preparation and validation (what ``ray up`` does first).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CRD_DIR = REPO.parent / "shared" / "kuberay"
CRD_FILES = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml")
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DEPLOY_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
# Where the repository is on the nodes: the Dockerfile's WORKDIR, the launcher's file_mounts target.
IMAGE_ROOT, LAUNCHER_ROOT = "/app/", "/home/ray/stagetrain/"
# build_plan needs a dataset size; the worker layout that the cluster checks use does not depend on it.
DATASET_SIZE = 1_281_167

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2 MB of YAML

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"no KubeRay CRDs at {CRD_DIR}: put a copy of the shared/ folder beside the repository clone",
)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d is not None]


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins ``name`` to."""
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"pyproject.toml: {name} is not pinned with == ({dep})"
            return spec.version
    raise AssertionError(f"pyproject.toml does not depend on {name}")


# ------------------------------------------------------------------------------ CRD schemas -> jsonschema


def structural_to_jsonschema(s: dict) -> dict:
    """A CRD's OpenAPI v3 (structural) schema as JSON Schema, with the API server's strictness.

    Subschemas are only followed where they are schemas (properties, items, ...), never into ``default``
    or ``enum`` values. ``x-kubernetes-*`` keywords are left for the validator, which ignores the ones
    it does not know."""
    out = dict(s)
    if "properties" in s:
        out["properties"] = {k: structural_to_jsonschema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # kubectl apply's default --validate=strict rejects them
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = structural_to_jsonschema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        out["items"] = structural_to_jsonschema(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            out[key] = [structural_to_jsonschema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        out["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-type: map``: no two items share their key fields (defaults applied)."""
    if not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} have the same {', '.join(keys)}: {', '.join(map(str, key))}"
            )
        seen.setdefault(key, i)


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for every version of the KubeRay CRDs."""
    validators = {}
    for name in CRD_FILES:
        (crd,) = load_docs(CRD_DIR / name)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = KubeValidator(schema)
    return validators


def schema_errors(doc: dict, validators: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in validators, f"no CRD for apiVersion {key[0]}, kind {key[1]} in {CRD_DIR}"
    errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def manifest(name: str, kind: str) -> dict:
    (doc,) = [d for d in load_docs(DEPLOY / "kuberay" / name) if d["kind"] == kind]
    return doc


# ------------------------------------------------------------------------------ the manifests


def test_deploy_files_exist():
    names = {rel(p) for p in DEPLOY_FILES}
    assert {
        "deploy/Dockerfile",
        "deploy/cluster-launcher.yaml",
        "deploy/kuberay/rayjob.yaml",
        "deploy/kuberay/raycluster.yaml",
    } <= names


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_header_says_how_to_launch(path):
    """Runnable documentation: every deploy file opens with a comment that shows a command."""
    header = []
    for line in path.read_text().splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(re.match(r"#\s{2,}\S", line) for line in header), (
        f"{rel(path)}: the opening comment shows no command (an indented line like '#   kubectl apply -f "
        "...')"
    )


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_validates_against_its_crd(path, crd_validators):
    docs = load_docs(path)
    assert docs, f"{rel(path)}: no YAML documents"
    kinds = set()
    for doc in docs:
        kinds.add(doc.get("kind"))
        name = doc.get("metadata", {}).get("name", "")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, (
            f"{rel(path)}: {doc.get('kind')} metadata.name must be a DNS-1123 label, got {name!r}"
        )
        if doc.get("apiVersion", "").startswith("ray.io/"):
            errors = schema_errors(doc, crd_validators)
            assert not errors, f"{rel(path)}: {doc['kind']} {name}:\n  " + "\n  ".join(errors)
        else:
            # No schema here for core kinds: allow only the ones checked by hand below.
            assert (doc.get("apiVersion"), doc.get("kind")) in (
                ("v1", "ServiceAccount"),
                ("networking.k8s.io/v1", "NetworkPolicy"),
            ), (
                f"{rel(path)}: {doc.get('apiVersion')} {doc.get('kind')} is not checked by "
                "tests/test_deploy.py"
            )
    assert kinds & {"RayJob", "RayCluster"}, f"{rel(path)}: no RayJob or RayCluster"


@needs_crds
def test_schema_rejects_a_wrong_type(crd_validators):
    """The validation is not vacuous: a string where the CRD says integer fails, at that field."""
    doc = copy.deepcopy(manifest("raycluster.yaml", "RayCluster"))
    assert schema_errors(doc, crd_validators) == []
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    with pytest.raises(jsonschema.ValidationError) as info:
        crd_validators[("ray.io/v1", "RayCluster")].validate(doc)
    assert list(info.value.absolute_path) == ["spec", "workerGroupSpecs", 0, "replicas"]
    assert "is not of type 'integer'" in info.value.message


@needs_crds
def test_schema_rejects_an_unknown_field(crd_validators):
    doc = copy.deepcopy(manifest("rayjob.yaml", "RayJob"))
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")  # a typo
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        crd_validators[("ray.io/v1", "RayJob")].validate(doc)


@needs_crds
@pytest.mark.parametrize(
    ("cpu", "ok"), [(8, True), ("8", True), ("500m", True), (8.5, False), ("8 cores", False)]
)
def test_schema_int_or_string_quantities(crd_validators, cpu, ok):
    doc = copy.deepcopy(manifest("rayjob.yaml", "RayJob"))
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["cpu"] = cpu
    errors = schema_errors(doc, crd_validators)
    assert (errors == []) == ok, errors


@needs_crds
def test_schema_rejects_duplicate_list_map_keys(crd_validators):
    doc = copy.deepcopy(manifest("rayjob.yaml", "RayJob"))
    pod = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["volumes"].append(copy.deepcopy(pod["volumes"][0]))
    (error,) = schema_errors(doc, crd_validators)
    assert "volumes: items 0 and 1 have the same name: dshm" in error


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_groups(doc: dict) -> Iterator[tuple[str, dict, int]]:
    """(group name, group spec, pods counted): an autoscaled group counts at its minimum,
    since stagetrain checks a stage against the nodes that exist, not those the autoscaler may add."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"], 1
    autoscaled = spec.get("enableInTreeAutoscaling", False)
    for g in spec.get("workerGroupSpecs", []):
        count = g["minReplicas"] if autoscaled else g.get("replicas", g["minReplicas"])
        yield g["groupName"], g, count * g.get("numOfHosts", 1)


def _quantity(value) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def ray_resources(group: dict) -> dict[str, float]:
    """A Ray pod's CPUs and GPUs as KubeRay starts it: rayStartParams, else the container's limits."""
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    resources = container.get("resources", {})
    limits = {**resources.get("requests", {}), **resources.get("limits", {})}
    return {
        "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def cluster_problems(spec_path: Path, nodes: list[tuple[dict[str, float], int]]) -> list[str]:
    """What service.decisions.fits_cluster would say about each stage of the job on these nodes."""
    from service.decisions import fits_cluster
    from service.plan import build_plan
    from service.spec import load_spec

    spec = load_spec(str(spec_path))
    plan = build_plan(spec, DATASET_SIZE)
    total = {r: sum(res.get(r, 0) * n for res, n in nodes) for r in ("CPU", "GPU")}
    res = spec.resources
    problems = [
        fits_cluster(plan, i, res.use_gpu, res.cpus_per_worker, res.gpus_per_worker, total)
        for i in range(len(plan.stages))
    ]
    return [p for p in problems if p]


def ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in load_docs(p) if d["kind"] in ("RayJob", "RayCluster")]


@pytest.mark.parametrize(
    ("path", "doc"), ray_docs(), ids=lambda x: rel(x) if isinstance(x, Path) else x["kind"]
)
def test_cluster_can_run_its_jobs(path, doc):
    """Each job the file runs or documents fits the cluster (fails fast otherwise), and every pod gives
    it the job's preemption grace period; the preStop hook waits longer than that, and less than the pod."""
    from service.spec import load_spec

    jobs = referenced_jobs(path)
    assert jobs, f"{rel(path)}: runs no job file of the repository (`stagetrain run /app/examples/...`)"
    groups = list(ray_groups(doc))
    nodes = [(ray_resources(g), n) for _, g, n in groups]
    assert any(res["GPU"] > 0 and n > 0 for res, n in nodes), f"{rel(path)}: no GPU worker group"
    for job in jobs:
        problems = cluster_problems(job, nodes)
        assert not problems, f"{rel(path)}: {rel(job)} would fail fast on this cluster: " + "; ".join(
            problems
        )
        grace = load_spec(str(job)).preemption.grace_seconds
        for name, group, _ in groups:
            pod = group["template"]["spec"]
            period = pod.get("terminationGracePeriodSeconds", 30)
            assert period >= grace, (
                f"{rel(path)}: group {name}: terminationGracePeriodSeconds {period} < "
                f"preemption.grace_seconds {grace:g} of {rel(job)}"
            )
            for container in pod["containers"]:
                hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                if hook and hook[0] == IMAGE_ROOT + "deploy/prestop.sh":
                    wait = float(hook[1])
                    assert grace < wait < period, (
                        f"{rel(path)}: group {name}: prestop.sh waits {wait:g}s; needs "
                        f"preemption.grace_seconds {grace:g} < it < {period}"
                    )


def test_rayjob_contract():
    doc = manifest("rayjob.yaml", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    (inv,) = invocations_in_command(spec["entrypoint"], "deploy/kuberay/rayjob.yaml: spec.entrypoint")
    # a retry (backoffLimit) reruns the entrypoint: a fixed job id and storage make it continue the job
    assert inv.argv[0] == "run" and "--job-id" in inv.argv and "--storage" in inv.argv, spec["entrypoint"]
    assert spec["backoffLimit"] >= 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    from service.spec import load_spec

    grace = load_spec(str(REPO / "examples/imagenet-resnet50.yaml")).preemption.grace_seconds
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > grace, "Ray would SIGKILL the coordinator mid-checkpoint"
    gpu_groups = [g for name, g, n in ray_groups(doc) if ray_resources(g)["GPU"] > 0]
    assert gpu_groups, "the RayJob's cluster has no worker group with nvidia.com/gpu"
    for g in gpu_groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


RAY_PORTS = {8265, 6379, 10001}  # job API and dashboard, GCS, Ray client: what takes code


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_access_needs_a_token_and_comes_only_from_the_namespace(name, kind):
    """Token auth on, from a Secret the header says how to create and hand to clients; a NetworkPolicy
    on every Ray pod admits the three Ray ports only from pods of the namespace, everything else only
    among the Ray pods."""
    doc = manifest(name, kind)
    spec = cluster_spec(doc)
    auth = spec["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    header = (DEPLOY / "kuberay" / name).read_text().split("\napiVersion:")[0]
    assert f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token=" in header
    assert "export RAY_AUTH_MODE=token" in header and f"secret {auth['secretName']} -o jsonpath" in header
    policy = manifest(name, "NetworkPolicy")["spec"]
    selected = policy["podSelector"]["matchLabels"]
    for group, g, _ in ray_groups(doc):
        labels = g["template"].get("metadata", {}).get("labels", {})
        assert selected.items() <= labels.items(), f"{name}: the NetworkPolicy does not select {group}'s pods"
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"{name}: {peer} admits pods outside the namespace"
        ports = {p["port"] for p in rule.get("ports", [])}
        if peer["podSelector"] == {}:  # any pod of the namespace: the Ray ports only
            assert ports == RAY_PORTS, rule
        else:  # every port, but only among the Ray pods
            assert peer["podSelector"]["matchLabels"] == selected and not ports, rule
    assert any(r["from"] == [{"podSelector": {}}] for r in policy["ingress"])


def test_raycluster_contract():
    doc = manifest("raycluster.yaml", "RayCluster")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = [g for g in spec["workerGroupSpecs"] if ray_resources(g)["GPU"] > 0]
    assert 0 <= gpu["minReplicas"] <= gpu.get("replicas", gpu["minReplicas"]) <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] > gpu["minReplicas"], "no room to autoscale"
    assert ray_resources(spec["headGroupSpec"])["GPU"] == 0


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_pods_get_s3_access_from_irsa(path):
    docs = load_docs(path)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        if doc["kind"] not in ("RayJob", "RayCluster"):
            continue
        for name, group, _ in ray_groups(doc):
            account = group["template"]["spec"].get("serviceAccountName")
            assert account in accounts, (
                f"{rel(path)}: group {name}: serviceAccountName {account!r} is not defined in this file"
            )
            arn = accounts[account]["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
            assert re.fullmatch(r"arn:aws:iam::\d{12}:role/\S+", arn), (
                f"{rel(path)}: {account}: role-arn {arn!r}"
            )


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_versions_match_pyproject(path):
    ray = pinned("ray")
    images = set()
    for doc in load_docs(path):
        if doc["kind"] in ("RayJob", "RayCluster"):
            assert cluster_spec(doc)["rayVersion"] == ray, f"{rel(path)}: rayVersion != pyproject's ray {ray}"
            images |= {c["image"] for _, g, _ in ray_groups(doc) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"{rel(path)}: head and workers must run the same image, got {sorted(images)}"


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_no_secrets(path):
    text = path.read_text()
    for pattern in (
        r"AWS_SECRET_ACCESS_KEY",
        r"AWS_ACCESS_KEY_ID",
        r"AWS_SESSION_TOKEN",
        r"\bAKIA[0-9A-Z]{16}\b",
        r"secretKeyRef",
        r"^kind:\s*Secret\b",
    ):
        assert not re.search(pattern, text, re.MULTILINE), (
            f"{rel(path)}: matches {pattern!r}; credentials come from IRSA or instance profiles, not deploy "
            "files"
        )


# ------------------------------------------------------------------------------ stagetrain commands


def _command(name: str):
    from service.cli import cli

    return cli.commands[name]


def cli_commands() -> set[str]:
    from service.cli import cli

    return set(cli.commands)


def cli_options(command: str) -> dict[str, bool]:
    """Option name -> whether it takes a value, read from the click command itself."""
    import click

    options = {"--help": False, "-h": False}
    for p in _command(command).params:
        if isinstance(p, click.Option):
            for name in (*p.opts, *p.secondary_opts):
                options[name] = not (p.is_flag or p.count)
    return options


def cli_arguments(command: str) -> list[tuple[str, bool]]:
    """The positional arguments as (metavar, required): [('JOB.yaml', True)], [('JOB_ID', True)]."""
    import click

    return [
        (p.metavar or p.human_readable_name, p.required)
        for p in _command(command).params
        if isinstance(p, click.Argument)
    ]


@dataclass
class Invocation:
    where: str
    argv: list[str]  # after "stagetrain"
    complete: bool  # a whole command line, arguments and all; else a mention of a command in `backticks`


_SHELL_OPERATORS = set("();<>|&")


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose, a trailing backslash
        return line.split()


def invocations_in_command(line: str, where: str, complete: bool = True) -> list[Invocation]:
    """Every `stagetrain ...` in a shell command line, up to the next shell operator or comment."""
    tokens, found = _tokens(line), []
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"(\S*/bin/)?stagetrain", tok):
            argv = []
            for t in tokens[i + 1 :]:
                if set(t) <= _SHELL_OPERATORS:
                    break
                argv.append(t)
            found.append(Invocation(where, argv, complete))
    return found


def _command_strings(node, key: str = "") -> Iterator[tuple[str, str]]:
    """(field path, command line) for the command fields of a manifest or launcher config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _command_strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        last = key.rsplit(".", 1)[-1]
        if last in ("command", "args") and all(isinstance(x, str) for x in node):
            yield key, shlex.join(node)
            for i, x in enumerate(node):  # bash -c "a script"
                if " " in x:
                    yield f"{key}[{i}]", x
        elif last.endswith("_commands"):
            for i, x in enumerate(node):
                yield f"{key}[{i}]", str(x)
        else:
            for i, x in enumerate(node):
                yield from _command_strings(x, f"{key}[{i}]")
    elif isinstance(node, str) and key.rsplit(".", 1)[-1] == "entrypoint":
        yield key, node


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instruction, _, rest = buf.strip().partition(" ")
        out.append((instruction.upper(), rest.strip()))
        buf = ""
    return out


def file_invocations(path: Path) -> list[Invocation]:
    """The stagetrain commands of a deploy file: its command fields (entrypoint, container command/args,
    the launcher's *_commands, Dockerfile RUN/CMD/ENTRYPOINT), its comment lines that are commands
    (indented two or more spaces after '#', as in the job examples' headers), and `mentions`."""
    text, name = path.read_text(), rel(path)
    found: list[Invocation] = []
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*#\s{2,}\S", line):
            found += invocations_in_command(line.lstrip()[1:], f"{name}:{n}")
        for mention in re.findall(r"`([^`]*)`", line):
            found += invocations_in_command(mention, f"{name}:{n}", complete=False)
    if path.suffix in (".yaml", ".yml"):
        for i, doc in enumerate(load_docs(path)):
            for key, command in _command_strings(doc):
                found += invocations_in_command(command, f"{name}: document {i + 1}, {key}")
    elif path.name == "Dockerfile":
        for instruction, args in dockerfile_instructions(text):
            if instruction in ("RUN", "CMD", "ENTRYPOINT"):
                command = shlex.join(json.loads(args)) if args.startswith("[") else args
                found += invocations_in_command(command, f"{name}: {instruction} {args[:40]}")
    return found


def repo_path(path: str) -> Path | None:
    """A job file named on a node, in the repository; None for URLs (s3://...), which cannot be checked."""
    if "://" in path:
        return None
    for root in (IMAGE_ROOT, LAUNCHER_ROOT):
        if path.startswith(root):
            return REPO / path[len(root) :]
    return REPO / path


def parse_invocation(inv: Invocation) -> tuple[list[str], list[str], list[str]]:
    """(positional arguments, --job-id values, problems) of a stagetrain command, parsed with the
    options that `stagetrain COMMAND --help` lists."""
    shown = "stagetrain " + " ".join(inv.argv)
    command, options = inv.argv[0], cli_options(inv.argv[0])
    positionals, job_ids, problems = [], [], []
    args = iter(inv.argv[1:])
    for arg in args:
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in options:
            problems.append(
                f"{inv.where}: `{shown}`: {command} has no option {name} (it has {sorted(options)})"
            )
            continue
        if options[name] and not eq:
            value = next(args, None)
            if value is None:
                problems.append(f"{inv.where}: `{shown}`: {name} needs a value")
        if name == "--job-id" and value:
            job_ids.append(value)
    return positionals, job_ids, problems


def check_invocation(inv: Invocation) -> list[str]:
    """What is wrong with a stagetrain command, as messages naming where it is."""
    from service.layout import check_job_id
    from service.spec import SpecError, load_spec

    shown = "stagetrain " + " ".join(inv.argv)
    if not inv.argv or inv.argv[0] in ("-h", "--help"):
        return []
    command = inv.argv[0]
    if command not in cli_commands():
        return [f"{inv.where}: `{shown}`: no command {command!r}; the CLI has {sorted(cli_commands())}"]
    positionals, job_ids, problems = parse_invocation(inv)
    arguments = cli_arguments(command)
    metavars = [m for m, _ in arguments]
    if inv.complete and not sum(r for _, r in arguments) <= len(positionals) <= len(arguments):
        problems.append(f"{inv.where}: `{shown}`: {command} takes {' '.join(metavars) or 'no arguments'}")
    for metavar, value in zip(metavars, positionals, strict=False):  # missing ones are reported above
        if metavar == "JOB_ID":
            job_ids.append(value)
        elif metavar.endswith((".yaml", ".yml")) and (job := repo_path(value)) is not None:
            if not job.is_file():
                problems.append(
                    f"{inv.where}: `{shown}`: job file {value} is not in the repository ({rel(job)})"
                )
                continue
            try:
                load_spec(str(job))
            except SpecError as e:
                problems.append(
                    f"{inv.where}: `{shown}`: {rel(job)} is not a valid job spec: " + "; ".join(e.problems)
                )
    for job_id in job_ids:
        try:
            check_job_id(job_id)
        except ValueError as e:
            problems.append(f"{inv.where}: `{shown}`: {e}")
    return problems


def referenced_jobs(path: Path) -> list[Path]:
    """The repository's job files that the `stagetrain run` commands in ``path`` train."""
    jobs = []
    for inv in file_invocations(path):
        if inv.complete and inv.argv[:1] == ["run"]:
            positionals, _, _ = parse_invocation(inv)
            job = repo_path(positionals[0]) if positionals else None
            if job is not None and job.is_file() and job not in jobs:
                jobs.append(job)
    return jobs


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=rel)
def test_stagetrain_commands_exist(path):
    invocations = file_invocations(path)
    problems = [p for inv in invocations for p in check_invocation(inv)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [*MANIFESTS, LAUNCHER], ids=rel)
def test_stagetrain_commands_are_found(path):
    """The checker sees the commands: each cluster file runs a job with a complete `stagetrain run`."""
    assert any(inv.complete and inv.argv[:1] == ["run"] for inv in file_invocations(path)), rel(path)


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_matches_pyproject():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    (base,) = [a for i, a in instructions if i == "FROM"]
    base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], base.split()[0])
    ray = pinned("ray")
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311(-gpu|-cu\d+|-cpu)?", base), (
        f"deploy/Dockerfile: base {base}: want rayproject/ray:{ray}-py311[-gpu] (pyproject pins ray=={ray})"
    )
    runs = " ".join(a for i, a in instructions if i == "RUN")
    for name in ("torch", "torchvision"):
        found = set(re.findall(rf"(?<![\w-]){name}==([\w.+]+)", runs))
        assert found == {pinned(name)}, (
            f"deploy/Dockerfile installs {name} {found or 'unpinned'}, pyproject.toml pins {pinned(name)}"
        )
    assert re.search(r"pip install [^&;]*(?<!\S)\.(\s|$)", runs), "deploy/Dockerfile does not `pip install .`"


def test_dockerfile_env_and_layout():
    from service.executor import DEFAULT_ENV

    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    env = dict(kv.split("=", 1) for i, a in instructions if i == "ENV" for kv in shlex.split(a))
    for key, value in DEFAULT_ENV.items():
        assert env.get(key) == value, (
            f"deploy/Dockerfile: ENV {key}={value} (service/executor.py DEFAULT_ENV)"
        )
    assert ("WORKDIR", IMAGE_ROOT.rstrip("/")) in instructions
    copied = {}
    for i, a in instructions:
        if i == "COPY":
            *sources, dest = [w for w in a.split() if not w.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"deploy/Dockerfile: COPY {src}: not in the repository"
                assert dest.rstrip("/") in (IMAGE_ROOT + src, IMAGE_ROOT.rstrip("/")), (
                    f"deploy/Dockerfile: COPY {src} {dest}: keep the repository layout under {IMAGE_ROOT}"
                )
                copied[src] = dest
    needed = ["pyproject.toml", *pyproject()["tool"]["setuptools"]["packages"]]
    # and whatever the manifests use from the image: job files, the preStop hook
    for path in MANIFESTS:
        for doc in load_docs(path):
            needed += re.findall(rf"{IMAGE_ROOT}(\S+?\.(?:ya?ml|sh))\b", json.dumps(doc))
    for inv in (inv for path in MANIFESTS for inv in file_invocations(path) if inv.complete):
        needed += [a[len(IMAGE_ROOT) :] for a in inv.argv if a.startswith(IMAGE_ROOT)]
    for path in sorted(set(needed)):
        assert (REPO / path).exists(), (
            f"{IMAGE_ROOT}{path} is used by deploy/kuberay but is not in the repository"
        )
        assert any(path == src or path.startswith(src.rstrip("/") + "/") for src in copied), (
            f"deploy/Dockerfile does not COPY {path} (used as {IMAGE_ROOT}{path})"
        )


def test_prestop_hook_is_valid_bash():
    script = DEPLOY / "prestop.sh"
    assert os.access(script, os.X_OK), "deploy/prestop.sh must be executable (it is the preStop command)"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------ cluster launcher


def launcher_config() -> dict:
    (config,) = load_docs(LAUNCHER)
    return config


def test_cluster_launcher_passes_ray_up_validation():
    """What `ray up` does before it starts anything: merge the provider's defaults, then validate
    against ray-schema.json and the cross-field rules (head type exists, min_workers <= max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    assert config["head_node_type"] in config["available_node_types"]
    validate_config(prepare_config(copy.deepcopy(config)))
    for name, node_type in config["available_node_types"].items():
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", config["max_workers"]), name


def test_cluster_launcher_rejects_a_wrong_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    config["available_node_types"]["ray.worker.gpu_spot"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_cluster_launcher_contract():
    config = launcher_config()
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    spot = [
        k
        for k, v in workers.items()
        if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert any(workers[k]["resources"].get("GPU", 0) > 0 for k in spot), "no GPU spot worker type"
    ray = pinned("ray")
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray}-py311"), config["docker"]["image"]
    setup = " ".join(config["setup_commands"])
    for name in ("torch", "torchvision"):
        assert set(re.findall(rf"(?<![\w-]){name}==([\w.+]+)", setup)) == {pinned(name)}, (
            f"setup_commands: {name}"
        )
    assert config["file_mounts"].get(LAUNCHER_ROOT.rstrip("/")) == ".", (
        f"file_mounts: the repository goes to {LAUNCHER_ROOT}"
    )
    assert f"pip install --no-cache-dir {LAUNCHER_ROOT.rstrip('/')}" in setup


def test_cluster_launcher_can_run_its_jobs():
    config = launcher_config()
    jobs = referenced_jobs(LAUNCHER)
    assert jobs, "deploy/cluster-launcher.yaml runs no job file of the repository"
    nodes = [
        (t.get("resources", {}), 1 if name == config["head_node_type"] else t.get("min_workers", 0))
        for name, t in config["available_node_types"].items()
    ]
    for job in jobs:
        problems = cluster_problems(job, nodes)
        assert not problems, (
            f"deploy/cluster-launcher.yaml: {rel(job)} would fail fast at min_workers: {problems}"
        )
