"""Secrets stay home: what `ray up` and `ray job submit --working-dir .` send from the laptop, checked through
Ray's own packer and rsync filters on a tree holding credential files; `ray up` run from another folder syncs
nothing; the Ray token is never printed by a documented command and a local study makes it 0600; MinIO credentials
reach the study's storage through a named profile and not through the job record. `python -m pytest
tests/test_secrets_stay_home.py -q` (seconds; no Ray cluster is started)."""

import contextlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from study.commands import tuning
from tests.test_cluster_security import shell_commands
from tests.test_cluster_yaml import AUTH_TOKEN

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "docs" / "cluster.md").read_text()
SECRETS = [".env", ".env.local", "deploy.pem", "id_rsa", ".aws/credentials", ".ssh/id_ed25519", "kaggle.json",
           ".kaggle/kaggle.json", "study/.env", "minio-credentials", "gcs-credentials.json", ".netrc", "credentials"]


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


# ---------------------------------------------------------------------------------------------- the token


def test_no_documented_command_prints_the_token():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for command in shell_commands(doc.read_text()):
            if "get-auth-token" in command:
                assert re.search(r"get-auth-token(\s+--generate)?\s*>\s*/dev/null", command), (doc.name, command)
    assert "chmod 600 ~/.ray/auth_token" in shell_commands(DOCS)


def test_the_token_a_local_study_creates_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tuning.protect_auth_token()  # no token yet: nothing to do, no error
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("x")
    token.chmod(0o644)  # as Ray writes it under the usual umask 022
    tuning.protect_auth_token()
    assert token.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------------------------- ray up from elsewhere


def project_mounts(config: dict) -> dict[str, str]:
    return {remote: local for remote, local in config["file_mounts"].items() if (remote, local) != (AUTH_TOKEN,) * 2}


def mount_problems(config: dict, elsewhere: Path) -> list[str]:
    """A project mount that would name something when `ray up` runs from another folder (`elsewhere`) ships
    that folder: "." from the home folder ships ~/.aws and ~/.ssh."""
    return [f"file_mounts {remote}: {local!r} exists outside the repository too (run from {elsewhere})"
            for remote, local in project_mounts(config).items() if (elsewhere / local).exists()]


def test_ray_up_from_another_folder_syncs_nothing(config, tmp_path, monkeypatch):
    assert mount_problems(config, tmp_path) == [] and mount_problems(config, Path.home()) == []
    assert mount_problems({"file_mounts": {"~/batchsize-study": "."}}, tmp_path)  # the check can fail
    # Ray hashes every mount before it syncs one: from elsewhere it stops there, File not found.
    from ray.autoscaler._private.util import hash_runtime_conf

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        hash_runtime_conf(project_mounts(config), None, {}, generate_file_mounts_contents_hash=True)
    for local in project_mounts(config).values():
        assert (REPO / local).resolve() == REPO


# ---------------------------------------------------------------------------------------------- what leaves the laptop


def ignore_lines(name: str) -> set[str]:
    return {line.strip() for line in (REPO / name).read_text().splitlines() if line.strip()
            and not line.startswith("#")}


@pytest.mark.parametrize("name", [".rayignore", ".gitignore"])
def test_the_ignore_files_list_the_secrets(name):
    assert {".env", "*.pem", ".aws/", "kaggle.json", ".ssh/", "credentials"} <= ignore_lines(name)


def a_tree_with_secrets(root: Path, ignore_files: tuple[str, ...]) -> Path:
    root.mkdir()
    for name in ignore_files:
        shutil.copy(REPO / name, root / name)
    for rel in [*SECRETS, "study/engine/train.py", "tests/test_credentials.py", "cluster/head-policy.json", "docs/cluster.md"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


def test_ray_job_submit_leaves_the_secrets_home(tmp_path):
    """Ray's own packer of `--working-dir .`, with .rayignore alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 would
    drop .gitignore) and with both files."""
    from ray._private.runtime_env.packaging import _zip_files

    for i, ignore_files in enumerate(((".rayignore",), (".rayignore", ".gitignore"))):
        tree = a_tree_with_secrets(tmp_path / f"tree{i}", ignore_files)
        _zip_files(str(tree), [], str(tree.with_suffix(".zip")), include_gitignore=True)
        shipped = set(zipfile.ZipFile(tree.with_suffix(".zip")).namelist())
        assert {"study/engine/train.py", "tests/test_credentials.py", "cluster/head-policy.json", "docs/cluster.md"} <= shipped
        assert not {s for s in SECRETS if s in shipped or any(n.startswith(s + "/") for n in shipped)}, shipped


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_ray_up_leaves_the_secrets_home(config, tmp_path):
    """rsync with the filters Ray's command runner builds from rsync_filter and rsync_exclude."""
    tree = a_tree_with_secrets(tmp_path / "repo", (".rayignore", ".gitignore"))
    filters = [a for f in config["rsync_filter"] for a in ("--filter", f"dir-merge,- {f}")]
    excludes = [a for e in config["rsync_exclude"] for a in ("--exclude", e)]
    subprocess.run(["rsync", "-a", *excludes, *filters, f"{tree}/", str(tmp_path / "node")], check=True)
    shipped = {p.relative_to(tmp_path / "node").as_posix() for p in (tmp_path / "node").rglob("*")}
    assert "study/engine/train.py" in shipped and not set(SECRETS) & shipped


@contextlib.contextmanager
def header_capture_server(header: str):
    """An HTTP server on 127.0.0.1 (a free port) answering 404 to everything and keeping each request's `header`."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get(header))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_minio_profile_reaches_pyarrow_and_not_the_autoscaler(tmp_path):
    """docs/cluster.md's MinIO credentials: a named profile in the mounted file, chosen by AWS_PROFILE in the job;
    pyarrow signs with its key, and boto3's default chain (the autoscaler's) does not pick it up."""
    credentials = tmp_path / "minio-credentials"
    credentials.write_text("[study-minio]\naws_access_key_id = AKIDSTUDYMINIO\naws_secret_access_key = s3cr3t\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_SHARED_CREDENTIALS_FILE=str(credentials),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_EC2_METADATA_DISABLED="true")
    with header_capture_server("Authorization") as (port, seen):
        uri = f"s3://bucket/study?endpoint_override=http://127.0.0.1:{port}&region=us-west-2"
        read = f"import pyarrow.fs as f; fs, p = f.FileSystem.from_uri({uri!r}); fs.get_file_info(p)"
        subprocess.run([sys.executable, "-c", read], env={**env, "AWS_PROFILE": "study-minio"}, check=True,
                       timeout=120)
    assert seen and all("Credential=AKIDSTUDYMINIO/" in h for h in seen), seen
    default_chain = "import boto3; print(boto3.Session().get_credentials())"
    done = subprocess.run([sys.executable, "-c", default_chain], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "None"
