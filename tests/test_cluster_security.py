"""cluster.yaml's locks and the IAM policies in cluster/, checked offline (`python -m pytest
tests/test_cluster_security.py -q`, seconds): the head runs under its own scoped profile, never Ray's full-access
default; the nodes use the project's key pair, the user's security group (never Ray's, which opens SSH to
0.0.0.0/0) and IMDSv2; the policies grant EC2 only by the cluster's tag and worker types, PassRole only for the
workers' role, S3 only on the one bucket; docs/cluster.md sets up what cluster.yaml names and opens SSH to the
user's address only. Each check also runs on broken copies, so a check that can no longer fail is caught. What
leaves the laptop: tests/test_secrets_stay_home.py."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_yaml import AUTH_TOKEN, node_setup_commands

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "docs" / "cluster.md").read_text()
HEAD_PROFILE = "batchsize-study-head"
RAY_DEFAULT_PROFILE = "ray-autoscaler-v1"
OPEN = ("0.0.0.0/0", "::/0")


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture
def head_policy() -> dict:
    return json.loads((REPO / "cluster" / "head-policy.json").read_text())


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# ---------------------------------------------------------------------------------------------- the config


def config_problems(config: dict) -> list[str]:
    problems = []
    types = config["available_node_types"]
    head = types.get(config["head_node_type"], {}).get("node_config", {})
    profile = head.get("IamInstanceProfile", {})
    if not profile:
        problems.append(f"head: no IamInstanceProfile; Ray would create {RAY_DEFAULT_PROFILE} (full EC2, full S3)")
    elif RAY_DEFAULT_PROFILE in str(profile) or profile != {"Name": HEAD_PROFILE}:
        problems.append(f"head: IamInstanceProfile {profile}, expected the scoped {HEAD_PROFILE}")
    key = config.get("provider", {}).get("key_pair", {}).get("key_name", "")
    if not key or key.startswith("ray-autoscaler"):
        problems.append(f"provider.key_pair.key_name {key!r}: not the project's own key pair (Ray's default is "
                        f"shared by every Ray cluster of the account)")
    groups = {name: node.get("node_config", {}).get("SecurityGroupIds") for name, node in types.items()}
    if not all(groups.values()) or len({tuple(g) for g in groups.values()}) != 1:
        problems.append(f"SecurityGroupIds must name the same group on every node type (else Ray creates its own, "
                        f"SSH open to 0.0.0.0/0): {groups}")
    for rule in config.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") in OPEN for r in rule.get("IpRanges", [])) or \
                any(r.get("CidrIpv6") in OPEN for r in rule.get("Ipv6Ranges", [])):
            problems.append(f"provider.security_group opens {rule} to the world")
    for name, node in types.items():
        imds = node.get("node_config", {}).get("MetadataOptions", {})
        if imds.get("HttpTokens") != "required" or imds.get("HttpEndpoint", "enabled") != "enabled":
            problems.append(f"{name}: MetadataOptions {imds}; IMDSv2 needs HttpTokens: required")
    if ".rayignore" not in config.get("rsync_filter", []):
        problems.append("rsync_filter lacks .rayignore: ray up would sync the secrets it lists")
    for name, commands in node_setup_commands(config).items():
        if f"chmod 600 {AUTH_TOKEN}" not in commands:
            problems.append(f"{name}: no setup command makes {AUTH_TOKEN} readable by its owner only")
    return problems


def _no_head_profile(c):
    del c["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]


def _ray_default_profile(c):
    c["available_node_types"]["head"]["node_config"]["IamInstanceProfile"] = {"Name": RAY_DEFAULT_PROFILE}


def _shared_key_pair(c):
    del c["provider"]["key_pair"]


def _worker_without_group(c):
    del c["available_node_types"]["gpu-4x"]["node_config"]["SecurityGroupIds"]


def _world_ssh_rule(c):
    c["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}


def _imdsv1(c):
    c["available_node_types"]["gpu-1x"]["node_config"]["MetadataOptions"] = {"HttpTokens": "optional"}


def _no_rayignore(c):
    c["rsync_filter"] = [".gitignore"]


def _token_mode_left(c):
    c["setup_commands"] = [cmd for cmd in c["setup_commands"] if "chmod" not in cmd]


BROKEN = {"no head profile": (_no_head_profile, "no IamInstanceProfile"),
          "Ray's default profile": (_ray_default_profile, RAY_DEFAULT_PROFILE),
          "shared key pair": (_shared_key_pair, "key_pair"),
          "worker without the group": (_worker_without_group, "SecurityGroupIds"),
          "SSH from the world": (_world_ssh_rule, "0.0.0.0/0"),
          "IMDSv1": (_imdsv1, "HttpTokens"),
          "no .rayignore in the filter": (_no_rayignore, ".rayignore"),
          "token mode left": (_token_mode_left, "readable by its owner only")}


def test_cluster_yaml_is_locked_down(config):
    assert config_problems(config) == []


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_unlocked_config_is_caught(config, case):
    mutate, fragment = BROKEN[case]
    broken = copy.deepcopy(config)
    mutate(broken)
    assert any(fragment in p for p in config_problems(broken)), config_problems(broken)



# ---------------------------------------------------------------------------------------------- the policies


def statements(policy: dict) -> list[dict]:
    return [{**s, "Action": [s["Action"]] if isinstance(s["Action"], str) else s["Action"],
             "Resource": [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]}
            for s in policy["Statement"]]


def policy_problems(policy: dict, config: dict) -> list[str]:
    """Every grant of the head's policy is scoped: by the cluster's tag, to the workers' role, to the bucket."""
    problems = []
    if policy.get("Version") != "2012-10-17":
        problems.append(f"Version {policy.get('Version')!r}: policy variables and conditions need 2012-10-17")
    region, cluster = config["provider"]["region"], config["cluster_name"]
    worker_roles = {n["node_config"]["IamInstanceProfile"]["Name"] for n in worker_types(config).values()}
    instance_types = sorted({n["node_config"]["InstanceType"] for n in worker_types(config).values()})
    key = config["provider"]["key_pair"]["key_name"]
    ami_parameter = config["available_node_types"]["head"]["node_config"]["ImageId"].removeprefix("resolve:ssm:")
    for s in statements(policy):
        where = s.get("Sid", s["Action"])
        if s.get("Effect") != "Allow" or {"NotAction", "NotResource", "NotPrincipal"} & set(s):
            problems.append(f"{where}: only plain Allow statements are expected")
        condition = s.get("Condition", {}).get("StringEquals", {})
        for action in s["Action"]:
            service, _, verb = action.partition(":")
            if "*" in action:
                problems.append(f"{where}: wildcard action {action}")
            if s["Resource"] == ["*"] and not verb.startswith("Describe"):
                problems.append(f"{where}: {action} on every resource")
            if action in ("ec2:TerminateInstances", "ec2:CreateTags") and \
                    condition.get("ec2:ResourceTag/ray-cluster-name") != cluster and \
                    condition.get("ec2:CreateAction") != "RunInstances":
                problems.append(f"{where}: {action} not limited to instances tagged ray-cluster-name={cluster}")
            if action == "ec2:RunInstances" and any(":instance/" in r for r in s["Resource"]):
                if condition.get("aws:RequestTag/ray-cluster-name") != cluster:
                    problems.append(f"{where}: RunInstances of instances not tagged ray-cluster-name={cluster}")
                if sorted(condition.get("ec2:InstanceType", [])) != instance_types:
                    problems.append(f"{where}: instance types {condition.get('ec2:InstanceType')}, the worker "
                                    f"types are {instance_types}")
            if service == "iam" and (verb != "PassRole" or
                                     s["Resource"] != [f"arn:aws:iam::ACCOUNT_ID:role/{r}" for r in worker_roles]):
                problems.append(f"{where}: {action} on {s['Resource']}; only PassRole of {worker_roles}")
            if service == "ssm" and (verb != "GetParameters" or
                                     not all(ami_parameter.startswith(r.split(":parameter", 1)[1].rstrip("*"))
                                             for r in s["Resource"])):
                problems.append(f"{where}: {action} on {s['Resource']}; only the AMI parameter {ami_parameter}")
            if service not in ("ec2", "iam", "ssm", "s3"):
                problems.append(f"{where}: {action}: a service the head does not use")
        for resource in s["Resource"]:
            if resource.startswith("arn:aws:s3:::") and resource not in ("arn:aws:s3:::BUCKET",
                                                                          "arn:aws:s3:::BUCKET/*"):
                problems.append(f"{where}: S3 resource {resource}, not the study bucket")
            if resource.startswith(("arn:aws:ec2:", "arn:aws:ssm:")) and resource.split(":")[3] != region:
                problems.append(f"{where}: {resource} is outside the cluster's region {region}")
            if ":security-group/" in resource and not resource.endswith("/SG_ID"):
                problems.append(f"{where}: {resource}: any security group, not the cluster's")
            if ":key-pair/" in resource and resource.split("key-pair/")[1] != f"{key}*":
                problems.append(f"{where}: {resource}: a key pair other than {key}")
    return problems


def _everywhere(p):
    p["Statement"][-1]["Resource"] = "*"


def _terminate_anything(p):
    for s in p["Statement"]:
        s.pop("Condition", None) if "ec2:TerminateInstances" in s["Action"] else None


def _pass_any_role(p):
    next(s for s in p["Statement"] if s["Action"] == "iam:PassRole")["Resource"] = "arn:aws:iam::ACCOUNT_ID:role/*"


def _any_instance_type(p):
    next(s for s in p["Statement"] if "Condition" in s and "ec2:InstanceType" in s["Condition"]["StringEquals"]
         )["Condition"]["StringEquals"].pop("ec2:InstanceType")


def _s3_wildcard(p):
    p["Statement"].append({"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::*"})


def _any_group(p):
    for s in p["Statement"]:
        s["Resource"] = [r.replace("SG_ID", "*") for r in s["Resource"]] if isinstance(s["Resource"], list) \
            else s["Resource"]


POLICY_BROKEN = {"bucket on every resource": (_everywhere, "on every resource"),
                 "terminate any instance": (_terminate_anything, "TerminateInstances not limited"),
                 "pass any role": (_pass_any_role, "only PassRole"),
                 "any instance type": (_any_instance_type, "instance types"),
                 "S3 wildcard": (_s3_wildcard, "wildcard action s3:*"),
                 "any security group": (_any_group, "any security group")}


def test_the_head_policy_is_scoped(head_policy, config):
    assert policy_problems(head_policy, config) == []
    granted = {a for s in statements(head_policy) for a in s["Action"]}
    # What Ray's AWS node provider calls from the head (ray/autoscaler/_private/aws/node_provider.py).
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole", "ssm:GetParameters", "s3:PutObject", "s3:ListBucket"} <= granted


@pytest.mark.parametrize("case", sorted(POLICY_BROKEN))
def test_a_widened_policy_is_caught(head_policy, config, case):
    mutate, fragment = POLICY_BROKEN[case]
    broken = copy.deepcopy(head_policy)
    mutate(broken)
    assert any(fragment in p for p in policy_problems(broken, config)), policy_problems(broken, config)


def test_the_workers_touch_the_bucket_only_and_the_roles_trust_ec2():
    worker = json.loads((REPO / "cluster" / "worker-policy.json").read_text())
    resources = {r for s in statements(worker) for r in s["Resource"]}
    actions = {a for s in statements(worker) for a in s["Action"]}
    assert resources == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    assert all(a.startswith("s3:") and "*" not in a for a in actions)
    trust = json.loads((REPO / "cluster" / "ec2-trust.json").read_text())
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]


# ---------------------------------------------------------------------------------------------- the documented setup


def shell_commands(text: str) -> list[str]:
    """Each command of the document's ```bash blocks, continuation lines joined, trailing comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for b in blocks for line in re.sub(r"\\\n\s*", " ", b).splitlines()]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_docs_set_up_what_cluster_yaml_names(config):
    commands = shell_commands(DOCS)
    placeholder = config["available_node_types"]["head"]["node_config"]["SecurityGroupIds"][0]
    assert any(c.startswith("sed ") and f"s/{placeholder}/$SG_ID/" in c and "cluster.yaml" in c for c in commands)
    for profile, policy in ((HEAD_PROFILE, "head-policy.json"),
                            *((n["node_config"]["IamInstanceProfile"]["Name"], "worker-policy.json")
                              for n in worker_types(config).values())):
        assert f"aws iam create-instance-profile --instance-profile-name {profile}" in commands
        assert any(f"put-role-policy --role-name {profile} " in c and f"fill cluster/{policy}" in c
                   for c in commands), profile


def test_the_docs_open_ssh_to_the_users_address_only():
    ingress = [c for c in shell_commands(DOCS) if "authorize-security-group-ingress" in c]
    ssh = [c for c in ingress if "--port 22" in c]
    assert ssh and all(re.search(r'--cidr "\$[(A-Z_].*/32"', c) for c in ssh), ssh
    assert all(not any(o in c for o in OPEN) for c in ingress)
    others = [c for c in ingress if c not in ssh]
    assert others == [c for c in others if '--source-group "$SG_ID"' in c and c.count("--group-id") == 1]
