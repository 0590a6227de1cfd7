"""Checks of the flags both study CLIs (and the report) share, run before Ray starts or anything is written.

Each raises StudyError with one line that names the flag, the value and what would be accepted; the CLIs turn it
into `error: ...` and exit status 2 (study.commands.driver.main_of).
"""

import math
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from study.errors import StudyError

MAX_TRIALS = 10_000  # trials per study unless --max-trials says more: Tune keeps every trial in the driver's memory
ADDRESS_TIMEOUT_S = 10.0  # how long --address may take to accept a connection and answer as Ray's GCS
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose first component is a bucket name
# Query options that would carry a secret (pyarrow refuses them, but its error would print the value).
SECRET_OPTION = re.compile(r"secret|password|token|access_key|credential", re.IGNORECASE)


def check_name(name: str) -> None:
    """--name is one folder under --storage-path: a path would put the study's files in two places."""
    bad = (not name or name != name.strip() or "/" in name or "\\" in name or "\0" in name or name in (".", "..")
           or len(name.encode()) > 255)
    if bad:
        raise StudyError(f"--name {name!r} is not one folder name; pass a plain name such as mnist-1 (put the "
                         f"parent folder in --storage-path)")
    # In an s3:// or gs:// storage path pyarrow decodes %2f and %2e%2e into / and .., and ? or # would end the path.
    if set(name) & set("%?#"):
        raise StudyError(f"--name {name!r} contains % ? or #, which a storage URI would read as escapes, a query or "
                         f"a fragment; pass a plain name such as mnist-1")


def check_no_credentials(uri: str, flag: str) -> None:
    """A URI carries no credentials (s3://KEY:SECRET@bucket, which pyarrow would use): they would be printed in
    errors and stored with the study (study.json, Tune's records, the report). The refusal does not repeat them."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return
    authority, query = re.split(r"[/?#]", rest, maxsplit=1)[0], urlsplit(uri).query
    # A bucket name has no ':' or '@'; a secret with an unescaped '/' leaves "KEY:SEC" before the first slash.
    userinfo = "@" in authority or (scheme.lower() in BUCKET_SCHEMES and ":" in authority)
    # A user in the query's endpoint (endpoint_override=http://USER:PASS@host) is printed and stored just the same.
    secret_option = "@" in query or any(SECRET_OPTION.search(key) for key in re.findall(r"(?:^|&)([^=&]*)", query))
    if userinfo or secret_option:
        where = "before its bucket or host" if userinfo else "in its query"
        raise StudyError(f"{flag} must not carry credentials (the {scheme}:// URI has a key or user {where}): they "
                         f"would be printed and stored with the study; give them to the store's client instead (S3: "
                         f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile; see docs/cluster.md)")


def check_uri(uri: str, flag: str) -> None:
    """A path is not empty, carries no credentials, and a URI of a bucket store names its bucket (s3:// alone
    makes pyarrow raise)."""
    if not uri.strip():
        raise StudyError(f"{flag} is empty; pass a folder or a URI such as s3://BUCKET/prefix")
    if "://" not in uri:
        return
    check_no_credentials(uri, flag)
    parts = urlsplit(uri)
    if parts.scheme in BUCKET_SCHEMES and not parts.netloc:
        raise StudyError(f"{flag} {uri!r} names no bucket; pass {parts.scheme}://BUCKET/prefix")


def check_number(flag: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """value is a finite number in [low, high] (bounds made open by low_open/high_open); None passes."""
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        low_text = f"{low:g}" if math.isfinite(low) else "-inf"
        high_text = f"{high:g}" if math.isfinite(high) else "inf"
        raise StudyError(f"{flag} must be a finite number in {left}{low_text}, {high_text}{right}, got {value}")


def check_unique(flag: str, values) -> None:
    """A grid axis lists each value once: a repeated one would run identical trials (same seed) that the report
    would count as independent runs."""
    seen = set()
    for value in values or ():
        if value in seen:
            raise StudyError(f"{flag} lists {value} more than once; give each value once (--runs/--seeds repeat "
                             f"configurations with different seeds)")
        seen.add(value)


def check_grid_size(trials: int, limit: int, what: str) -> None:
    if trials > limit:
        raise StudyError(f"the grid has {trials:,} trials ({what}), more than the limit of {limit:,}; make the grid "
                         f"smaller, or pass --max-trials {trials} if the driver has the memory for it")


def check_common_flags(args) -> None:
    """The flags of tuning.add_common_args that need no data and no Ray."""
    check_name(args.name)
    check_uri(args.storage_path, "--storage-path")
    if args.address:
        host_port(args.address)
    for flag, value in (("--cpus-per-trial", args.cpus_per_trial), ("--gpus-per-trial", args.gpus_per_trial)):
        if not math.isfinite(value):
            raise StudyError(f"{flag} must be a finite number, got {value}")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise StudyError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    if getattr(args, "max_trials", MAX_TRIALS) < 1:
        raise StudyError(f"--max-trials must be >= 1, got {args.max_trials}")


def check_lr_flags(args) -> None:
    """The warmup fits in the epochs (the flags' own ranges: study.commands.flags.check)."""
    check_number("--warmup-epochs", args.warmup_epochs, 0, args.epochs)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address HOST:PORT or ray://HOST:PORT; None for "auto" and "local" (Ray's to resolve)."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port:
        raise StudyError(f"--address {address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    return host, port


def auto_address() -> tuple[str | None, str]:
    """(the address --address auto names, where it came from), resolved as Ray resolves it: RAY_ADDRESS, then the
    file the last `ray start` on this machine wrote. (None, "") where neither names one: ray.init then looks for a
    running Ray itself, or says at once that there is none."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env, "RAY_ADDRESS"
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # a Ray that moved it: its own lookup in ray.init still runs
        return None, ""
    path = get_ray_address_file(None)
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None, ""
    return text or None, path


def gcs_problem(address: str, timeout: float) -> str | None:
    """Why what listens at HOST:PORT is not a Ray cluster, or None where it answers the first call every Ray client
    makes to the GCS (GetClusterId) within `timeout`. A port where something else listens would otherwise send
    ray.init into its long retries."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel  # TLS and token auth set up as Ray's clients do
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without these modules: the connection check stands alone
        return None
    channel = init_grpc_channel(address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                           timeout=timeout)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:  # Ray's GCS, refusing this token: ray.init says so clearly
            return None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"a connection is accepted but no Ray answer comes in {timeout:g} s"
        return f"something listens there but does not answer as Ray's GCS: {code.name}"
    finally:
        channel.close()
    return None


def reachable(address: str, timeout: float | None = None) -> None:
    """The Ray cluster `address` names (HOST:PORT, ray://HOST:PORT, or auto as Ray resolves it) answers within
    `timeout`: a connection, then, for a GCS address, Ray's protocol. Without this ray.init retries an address
    where no Ray answers (a dead cluster, a stale `ray start` record, another server's port) for minutes."""
    timeout = ADDRESS_TIMEOUT_S if timeout is None else timeout
    source = ""
    if address == "auto":
        address, source = auto_address()
        if address is None:
            return
    target = host_port(address)
    if target is None:
        return
    named = f"{address} (--address auto, from {source}; " if source else f"{address} ("
    deadline = time.monotonic() + timeout
    try:
        socket.create_connection(target, timeout=timeout).close()
        reason = None
    except OSError as err:
        reason = f"no answer in {timeout:g} s" if isinstance(err, TimeoutError) else (err.strerror or str(err))
    if reason is None and not address.startswith("ray://"):  # ray:// is Ray Client's server, not the GCS
        reason = gcs_problem(address, max(deadline - time.monotonic(), 1.0))
    if reason is not None:
        raise StudyError(f"no Ray cluster answers at {named}{reason}); start it (ray start --head) or fix "
                         f"--address / RAY_ADDRESS")
