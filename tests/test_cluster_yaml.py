"""Checks cluster.yaml (the Ray cluster launcher config for AWS) offline, against the installed Ray.

`python -m pytest tests/test_cluster_yaml.py -q`. What `ray up` rejects before touching AWS is checked with Ray's
own schema (ray/autoscaler/ray-schema.json) and validator (prepare_config + validate_config, as `ray up` calls
them). What would only fail on AWS, minutes into a launch, is checked explicitly: node resources are whole
numbers, no trial can land on the head, every node installs the synced project with Ray in exactly the range
pyproject.toml pins (the one source of the Ray version: the two files are compared with each other, never with
whatever Ray happens to be installed), and boto3 as the `cluster` extra has it, every node runs with Ray's token auth
on and the laptop's token, every file_mounts source exists, and the start commands use only flags `ray start` knows. Each check is also run on a
broken copy of the config, so a check that can no longer fail is itself caught.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import InvalidRequirement, Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"  # at the repository root, where `ray up cluster.yaml` is run from
RAY_REQUIREMENT = re.compile(r"[\"']ray(?:\[[^\]]*\])?[^\"']*[\"']")  # a quoted "ray[extras]<spec>" argument
BOTO3_SPEC = re.compile(r"\bboto3\s*([<>=!~][^\s\"']*)")
# Ray's token auth: the laptop's token travels to every node through file_mounts (docs/cluster.md, "Token authentication").
AUTH_TOKEN = "~/.ray/auth_token"
AUTH_MODE_EXPORT = "export RAY_AUTH_MODE=token"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


# ---------------------------------------------------------------------------------------------- the checks


def schema_problems(config: dict) -> list[str]:
    """Every violation of the schema shipped with the installed Ray, with its location in the config."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
            for e in validator.iter_errors(config)]


def ray_validator_problems(config: dict) -> list[str] | None:
    """What Ray's own validator says, run as `ray up` runs it; None where this Ray has no such validator.

    validate_config adds to the schema: head_node_type among available_node_types, the sum of min_workers within
    max_workers, cluster_synced_files present (prepare_config fills it from Ray's AWS defaults). Everything after
    it in `ray up` (instance types, AMI, IAM, subnets) needs AWS credentials and is not reproduced offline.
    """
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return None
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # Ray raises ValidationError, ValueError, RuntimeError or KeyError; any is a rejection
        return [f"ray validator: {type(err).__name__}: {err}"]
    return []


def node_setup_commands(config: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs, merged as Ray merges them: setup_commands first, then the head's
    or the workers' list; a worker type's own worker_setup_commands replace both."""
    common = config.get("setup_commands", [])
    merged = {}
    for name, node in config.get("available_node_types", {}).items():
        if name == config.get("head_node_type"):
            merged[name] = common + config.get("head_setup_commands", [])
        else:
            merged[name] = node.get("worker_setup_commands", common + config.get("worker_setup_commands", []))
    return merged


def synced_project_paths(config: dict) -> list[str]:
    """Remote paths that file_mounts fills with the repository itself."""
    return [remote for remote, local in config.get("file_mounts", {}).items()
            if (REPO / local).resolve() == REPO]


def installs_editable(command: str, path: str) -> bool:
    """Whether `command` is a pip install (pip or uv pip) with `-e path` / `--editable path`."""
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not any(a == "pip" and b == "install" for a, b in zip(words, words[1:])):
        return False
    target = path.rstrip("/")
    for flag, value in zip(words, words[1:]):
        if flag in ("-e", "--editable") and value.rstrip("/") == target:
            return True
    return any(w.startswith("--editable=") and w.split("=", 1)[1].rstrip("/") == target for w in words)


def ray_start_flags() -> set[str]:
    """Every option of the installed `ray start`."""
    from ray.scripts.scripts import start

    return {opt for param in start.params for opt in param.opts}


def ray_start_calls(commands: list[str]) -> list[list[str]]:
    """The words of each `ray start ...` in a list of shell commands (which may chain with ; && ||)."""
    calls = []
    for command in commands:
        for part in re.split(r";|&&|\|\|", command):
            words = part.split()
            if words[:2] == ["ray", "start"]:
                calls.append(words[2:])
    return calls


def resource_problems(config: dict) -> list[str]:
    problems = []
    head_type = config.get("head_node_type")
    for name, node in config.get("available_node_types", {}).items():
        resources = node.get("resources", {})
        for key, value in resources.items():
            # Ray hands these to `ray start` and the autoscaler bin-packs with them; 0.5 GPU is not a machine.
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name}: resource {key}={value!r} must be a whole number >= 0")
        if name == head_type:
            if resources.get("CPU") != 0 or resources.get("GPU", 0) != 0:
                problems.append(f"{name}: the head must declare CPU 0 and no GPU so no trial runs on it, "
                                f"got {resources}")
        else:
            if not resources.get("GPU", 0) >= 1:
                problems.append(f"{name}: a worker type must have a GPU, got {resources}")
            if node.get("min_workers", 0) != 0:
                problems.append(f"{name}: min_workers must be 0 (autoscale from zero), got {node['min_workers']}")
            if node.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") != "spot":
                problems.append(f"{name}: GPU workers are meant to be spot instances")
    return problems


def explicit_problems(config: dict) -> list[str]:
    """The checks Ray leaves to AWS or does not make at all, reimplemented here so they run offline."""
    problems = []
    types = config.get("available_node_types", {})
    head_type = config.get("head_node_type")
    if head_type not in types:
        problems.append(f"head_node_type {head_type!r} is not among available_node_types ({', '.join(types)})")
    min_sum = sum(node.get("min_workers", 0) for node in types.values())
    if min_sum > config.get("max_workers", 0):
        problems.append(f"the min_workers of all types ({min_sum}) exceed max_workers ({config.get('max_workers')})")
    problems += resource_problems(config)
    for name, node in types.items():
        # Without one Ray falls back to a years-old Ubuntu 18.04 Deep Learning AMI.
        if not node.get("node_config", {}).get("ImageId"):
            problems.append(f"{name}: node_config has no ImageId")

    projects = synced_project_paths(config)
    if not projects:
        problems.append("file_mounts does not sync the repository root ('.') to the nodes")
    mounts = config.get("file_mounts", {})
    if mounts.get(AUTH_TOKEN) != AUTH_TOKEN:
        problems.append(f"file_mounts must ship the laptop's Ray token: {AUTH_TOKEN!r}: {AUTH_TOKEN!r}")
    for remote, local in mounts.items():
        if (remote, local) == (AUTH_TOKEN, AUTH_TOKEN):
            continue
        if Path(local).expanduser().is_absolute():
            problems.append(f"file_mounts {remote}: source {local!r} is absolute; use a path relative to the repo")
        elif not (REPO / local).exists():
            problems.append(f"file_mounts {remote}: source {local!r} does not exist under {REPO}")
    for name, commands in node_setup_commands(config).items():
        if projects and not any(installs_editable(c, p) for c in commands for p in projects):
            problems.append(f"{name}: no setup command runs `pip install -e {projects[0]}` (the synced project)")
        wanted = project_ray().specifier
        installs = [r for c in commands for r in ray_requirements(c)]
        if not installs:
            problems.append(f"{name}: no setup command installs Ray (ray[default,tune]{wanted}, as pyproject.toml)")
        for req in installs:
            if req.specifier != wanted:
                problems.append(f"{name}: setup installs ray{req.specifier or ' (any version)'}, pyproject.toml "
                                f"pins ray{wanted}")
            if "default" not in req.extras:
                problems.append(f"{name}: setup installs {req} without [default] (dashboard, jobs, autoscaler)")
        boto3 = {m.group(1) for c in commands for m in BOTO3_SPEC.finditer(c)}
        if boto3 != {str(cluster_extra()["boto3"].specifier)}:
            problems.append(f"{name}: setup installs boto3{'/'.join(sorted(boto3)) or ' not at all'}, the `cluster` "
                            f"extra has boto3{cluster_extra()['boto3'].specifier}")
        if not any(AUTH_MODE_EXPORT in c for c in commands):
            problems.append(f"{name}: no setup command puts `{AUTH_MODE_EXPORT}` in the login shells")
    return problems + start_command_problems(config)


def ray_requirements(command: str) -> list[Requirement]:
    """The Ray requirements (ray, ray[extras], any specifier) a shell command passes as arguments."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    found = []
    for word in words:
        try:
            req = Requirement(word)
        except InvalidRequirement:  # flags, paths, URLs
            continue
        if req.name == "ray":
            found.append(req)
    return found


def project_ray() -> Requirement:
    """Ray as the project's dependencies (pyproject.toml) pin it: the series the suite is tested with."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == "ray")


def cluster_extra() -> dict[str, Requirement]:
    """The project's `cluster` extra (pyproject.toml), what the laptop installs, by package name."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {r.name: r for r in map(Requirement, extras["cluster"])}


def start_command_problems(config: dict) -> list[str]:
    problems = []
    known = ray_start_flags()
    head = ray_start_calls(config.get("head_start_ray_commands", []))
    workers = ray_start_calls(config.get("worker_start_ray_commands", []))
    if len(head) != 1 or len(workers) != 1:
        return [f"expected one `ray start` for the head and one for workers, got {len(head)} and {len(workers)}"]
    for role, words in (("head", head[0]), ("worker", workers[0])):
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and flag not in known:
                problems.append(f"{role} start command: `ray start` has no option {flag}")
    head_opts = dict(w.split("=", 1) if "=" in w else (w, "") for w in head[0])
    worker_opts = dict(w.split("=", 1) if "=" in w else (w, "") for w in workers[0])
    for flag, value in (("--head", ""), ("--autoscaling-config", "~/ray_bootstrap_config.yaml"),
                        ("--dashboard-host", "0.0.0.0")):
        if head_opts.get(flag) != value:
            problems.append(f"head start command needs {flag}{'=' + value if value else ''}")
    port = head_opts.get("--port", "6379")
    if worker_opts.get("--address") != f"$RAY_HEAD_IP:{port}":
        problems.append(f"workers must join $RAY_HEAD_IP:{port} (the head's --port), "
                        f"got --address={worker_opts.get('--address')}")
    return problems


def test_the_cluster_extra_is_in_dev_and_brings_the_jobs_cli():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "batchsize-study[cluster]" in extras["dev"]  # the cluster tests run the jobs CLI
    assert {"default"} <= cluster_extra()["ray"].extras  # `ray job submit` needs ray[default]
    assert cluster_extra()["ray"].specifier == project_ray().specifier
    # A series, not an open floor: a fresh install must not pick up a Ray release the suite never ran with.
    assert any(s.operator in ("<", "<=", "==", "~=") for s in project_ray().specifier), project_ray()


def all_problems(config: dict) -> list[str]:
    return schema_problems(config) + (ray_validator_problems(config) or []) + explicit_problems(config)


# ---------------------------------------------------------------------------------------------- the config


def test_cluster_yaml_matches_the_schema_of_the_installed_ray(config):
    assert schema_problems(config) == []


def test_cluster_yaml_passes_rays_own_validator(config):
    problems = ray_validator_problems(config)
    if problems is None:
        pytest.skip(f"ray {ray.__version__} has no ray.autoscaler._private.util.validate_config")
    assert problems == []


def test_cluster_yaml_passes_the_explicit_checks(config):
    assert explicit_problems(config) == []


def test_every_node_type_installs_the_project_with_the_projects_ray_range(config):
    per_node = node_setup_commands(config)
    assert set(per_node) == set(config["available_node_types"])
    for name, commands in per_node.items():
        ranges = {str(r.specifier) for c in commands for r in ray_requirements(c)}
        assert ranges == {str(project_ray().specifier)}, name
        assert any(installs_editable(c, "~/batchsize-study") for c in commands), name


# ---------------------------------------------------------------------------------------------- broken copies


def _drop_head_type(c):
    del c["available_node_types"][c["head_node_type"]]


def _fractional_gpu(c):
    c["available_node_types"]["gpu-1x"]["resources"]["GPU"] = 0.5


def _unknown_top_level_key(c):
    c["worker_count"] = 4


def _trials_on_head(c):
    c["available_node_types"][c["head_node_type"]]["resources"] = {"CPU": 4}


def _other_ray_version(c):
    c["setup_commands"] = [RAY_REQUIREMENT.sub('"ray[default]==0.0.1"', cmd) for cmd in c["setup_commands"]]


def _unpinned_ray(c):
    c["setup_commands"] = [RAY_REQUIREMENT.sub('"ray[default,tune]"', cmd) for cmd in c["setup_commands"]]


def _no_project_install(c):
    c["setup_commands"] = [cmd for cmd in c["setup_commands"] if not installs_editable(cmd, "~/batchsize-study")]


def _worker_type_overrides_setup(c):
    c["available_node_types"]["gpu-4x"]["worker_setup_commands"] = ["echo nothing installed"]


def _missing_mount_source(c):
    c["file_mounts"]["~/data"] = "no-such-folder"


def _misspelled_start_flag(c):
    c["head_start_ray_commands"] = [cmd.replace("--dashboard-host", "--dashboard-hots")
                                    for cmd in c["head_start_ray_commands"]]


def _worker_joins_wrong_port(c):
    c["worker_start_ray_commands"] = [cmd.replace(":6379", ":6380") for cmd in c["worker_start_ray_commands"]]


def _on_demand_workers(c):
    del c["available_node_types"]["gpu-1x"]["node_config"]["InstanceMarketOptions"]


def _no_token_shipped(c):
    del c["file_mounts"][AUTH_TOKEN]


def _auth_mode_unset(c):
    c["setup_commands"] = [cmd for cmd in c["setup_commands"] if AUTH_MODE_EXPORT not in cmd]


def _other_boto3(c):
    c["setup_commands"] = [BOTO3_SPEC.sub("boto3>=1.0", cmd) for cmd in c["setup_commands"]]


# (mutation, a fragment the problem list must contain, the checkers that must each catch it on their own)
BROKEN = {
    "head type missing": (_drop_head_type, "head_node_type", (ray_validator_problems, explicit_problems)),
    "fractional GPU": (_fractional_gpu, "0.5", (schema_problems, ray_validator_problems, explicit_problems)),
    "unknown top-level key": (_unknown_top_level_key, "worker_count", (schema_problems, ray_validator_problems)),
    "trials on head": (_trials_on_head, "no trial runs on it", (explicit_problems,)),
    "other Ray version": (_other_ray_version, "0.0.1", (explicit_problems,)),
    "unpinned Ray": (_unpinned_ray, "ray (any version)", (explicit_problems,)),
    "no project install": (_no_project_install, "pip install -e", (explicit_problems,)),
    "node type overrides setup": (_worker_type_overrides_setup, "gpu-4x", (explicit_problems,)),
    "missing mount source": (_missing_mount_source, "no-such-folder", (explicit_problems,)),
    "misspelled start flag": (_misspelled_start_flag, "--dashboard-hots", (explicit_problems,)),
    "worker joins wrong port": (_worker_joins_wrong_port, "6380", (explicit_problems,)),
    "on-demand workers": (_on_demand_workers, "spot", (explicit_problems,)),
    "no token shipped": (_no_token_shipped, "auth_token", (explicit_problems,)),
    "auth mode unset": (_auth_mode_unset, "RAY_AUTH_MODE", (explicit_problems,)),
    "other boto3": (_other_boto3, "boto3>=1.0", (explicit_problems,)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_config_is_caught(config, case):
    mutate, fragment, checkers = BROKEN[case]
    broken = copy.deepcopy(config)
    mutate(broken)
    for check in checkers:
        found = check(copy.deepcopy(broken))
        if found is None:  # this Ray has no validator to ask
            continue
        assert any(fragment in p for p in found), f"{check.__name__} missed {case!r}: {found}"
    assert any(fragment in p for p in all_problems(broken))
