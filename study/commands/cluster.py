"""What a Ray cluster can ever give one trial: the nodes up now, and the node types its autoscaler may start.

`study.commands.tuning.fit_resources` asks `trial_placement` after joining a cluster. A trial that only a node type not
started yet can hold waits for the autoscaler; one that no node type can ever hold ends the study with one line,
instead of pending forever while the autoscaler logs "No available node types can fulfill resource request".

The node types come from the GCS where something reported them (KubeRay does), else from the config file the
cluster's autoscaler was started with (`ray up` puts it at ~/ray_bootstrap_config.yaml on the head; the driver of
`ray job submit` and `ray exec` runs there). Where neither is found the types are unknown and nothing is refused.
"""

import os
from pathlib import Path

import yaml

MONITOR = "autoscaler/_private/monitor.py"  # the autoscaler's process, started by `ray start --head`


def node_types(gcs_address: str) -> dict[str, dict] | None:
    """name -> {"resources": {...}, "max_workers": n (-1: no limit)} of every node type of the cluster at
    gcs_address, the head's included; None when no autoscaler config is found."""
    return _types_from_gcs() or _types_from_file(autoscaling_config_path(gcs_address))


def _types_from_gcs() -> dict[str, dict] | None:
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older Ray without the call, or a GCS that does not answer it
        return None
    if config is None or not config.node_group_configs:
        return None
    return {group.name: {"resources": dict(group.resources), "max_workers": group.max_count}
            for group in config.node_group_configs}


def autoscaling_config_path(gcs_address: str) -> Path | None:
    """The --autoscaling-config of the autoscaler serving gcs_address, when it runs on this machine."""
    port = gcs_address.rsplit(":", 1)[-1]
    for entry in os.listdir("/proc"):
        try:
            args = Path("/proc", entry, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, ended, or not ours to read
            continue
        if not any(a.endswith(MONITOR) for a in args):
            continue
        options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if options.get("--gcs-address", "").rsplit(":", 1)[-1] == port and options.get("--autoscaling-config"):
            return Path(options["--autoscaling-config"]).expanduser()
    return None


def _types_from_file(path: Path | None) -> dict[str, dict] | None:
    try:
        config = yaml.safe_load(path.read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not config.get("available_node_types"):
        return None
    return {name: {"resources": node.get("resources"),  # None: the launcher detects them; unknown here
                   "max_workers": node.get("max_workers", config.get("max_workers", -1))}
            for name, node in config["available_node_types"].items()}


def fits(resources: dict, cpus: float, gpus: float) -> bool:
    return resources.get("CPU", 0) >= cpus and resources.get("GPU", 0) >= gpus


def describe(resources: dict) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def trial_placement(cpus: float, gpus: float, nodes: list[dict], types: dict[str, dict] | None) -> str | None:
    """Where a trial of `cpus` and `gpus` can run: "now" (a node up now holds it), the name of the node type the
    autoscaler can start for it, or None when the node types are unknown. Raises ValueError, with the one line
    to show, when neither a node up now nor any node type ever can."""
    if any(fits(n.get("Resources", {}), cpus, gpus) for n in nodes if n.get("Alive")):
        return "now"
    if types is None:
        return None
    startable = {name: t for name, t in types.items() if t.get("max_workers", -1) != 0}
    for name, t in startable.items():
        if t.get("resources") is None or fits(t["resources"], cpus, gpus):
            return name
    offer = "; ".join(f"{name}: {describe(t['resources'])}" for name, t in types.items() if t.get("resources"))
    raise ValueError(f"--gpus-per-trial {gpus:g} --cpus-per-trial {cpus:g}: no node type of this cluster can "
                     f"ever hold such a trial (it offers {offer})")
