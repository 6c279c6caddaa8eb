"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and checks), launching nothing; the
commands its header documents parse with Ray's own CLI and with bash; MLflow sits behind MLflow's basic-auth
app with credentials from SSM (never the file), Ray runs with token auth, and the documented tunnel reaches
MLflow where it listens. The basic-auth setup is run for real against a local `mlflow server`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from conftest import free_port, kill_mlflow_server, wait_for_http
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import cli as ray_cli

from study.run import parse_args
from study.spec import load_spec

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"
PRIVATE_IP = "$(hostname -I | awk '{print $1}')"  # what MLflow binds to and the trials' tracking URI names


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def documented(prefix: str) -> list[str]:
    """The header's command lines (`#   ray ...`, `#   ssh ...`), without the comment marker."""
    header = [line for line in CLUSTER.read_text().splitlines() if line.startswith("#  ")]
    lines = [line.removeprefix("#").strip() for line in header]
    return [line for line in lines if line.startswith(prefix)]


def every_command(config: dict) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    return [command for key in keys for command in config[key]]


def mlflow_server_command(config: dict) -> str:
    [server] = [line for line in config["head_start_ray_commands"] if "mlflow server" in line
                and not line.startswith("pkill")]
    return server


def test_cluster_yaml_validates_against_rays_cluster_config_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)
    validate_config(prepare_config(load()))  # what `ray up` checks after filling in the provider defaults


def test_a_cpu_head_and_an_autoscaling_gpu_worker_type_on_aws():
    config = load()
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trial on the head
    types = config["available_node_types"]
    [worker] = [node for name, node in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and worker["min_workers"] == 0 < worker["max_workers"]


def test_project_is_installed_on_every_node_and_the_head_sets_where_studies_go_and_which_ray_they_join():
    config = load()
    assert config["file_mounts"] == {"~/gan-stability": "."}
    assert any("pip install" in line and "-e ~/gan-stability" in line for line in config["setup_commands"])
    server = mlflow_server_command(config)
    assert f"--host {PRIVATE_IP}" in server and "0.0.0.0" not in server
    assert "--backend-store-uri sqlite:///" in server and "--artifacts-destination s3://" in server
    exports = " ".join(config["head_setup_commands"])
    assert f"MLFLOW_TRACKING_URI=http://{PRIVATE_IP}:5000" in exports
    assert "GAN_STABILITY_STORAGE=s3://" in exports
    assert "export RAY_ADDRESS=auto" in exports  # the driver joins this cluster on the head only


def test_every_command_of_the_file_is_valid_bash():
    for command in every_command(load()):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)


def test_mlflow_runs_the_basic_auth_app_with_its_secrets_from_ssm_and_no_secret_is_in_the_file():
    config = load()
    server = mlflow_server_command(config)
    assert "--app-name basic-auth" in server
    for variable, parameter in (("MLFLOW_AUTH_ADMIN_PASSWORD", "mlflow-admin-password"),
                                ("MLFLOW_FLASK_SERVER_SECRET_KEY", "mlflow-flask-secret")):
        assert re.search(rf'{variable}="\$\(aws ssm get-parameter --name /gan-stability/{parameter} '
                         r"--with-decryption --query Parameter.Value --output text\)\"", server), variable
    ini = " ".join(config["head_setup_commands"])
    assert "'default_permission = NO_PERMISSIONS'" in ini and "admin_password" not in ini
    text = CLUSTER.read_text()
    assert not re.search(r"(?<![-\w])(password|secret|token)\s*=\s*[^\s$%'\"]", text, re.IGNORECASE)
    assert "RAY_AUTH_TOKEN=" not in text  # the token is a file only its user reads, not an environment value


def test_every_node_runs_ray_with_token_auth_and_writes_both_secret_files_only_its_user_can_read():
    setup = load()["setup_commands"]  # every node, head and workers, before Ray starts
    assert "grep -q RAY_AUTH_MODE ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in setup
    token = next(line for line in setup if "> ~/.ray/auth_token" in line)  # Ray's default token path
    credentials = next(line for line in setup if "> ~/.mlflow/credentials" in line)  # MLflow's client file
    for line in (token, credentials):
        assert line.startswith("(umask 077 && ") and "--with-decryption" in line


def test_the_secrets_documented_are_the_ones_the_nodes_read():
    created = {re.search(r"--name (\S+)", line).group(1) for line in documented("aws ssm put-parameter")}
    read = set(re.findall(r"get-parameter --name (\S+)", " ".join(every_command(load()))))
    assert created == read == {"/gan-stability/mlflow-admin-password", "/gan-stability/mlflow-flask-secret",
                               "/gan-stability/ray-auth-token"}


def parse_ray_command(line: str) -> tuple[str, dict]:
    """Ray's own CLI parses the documented `ray ...` line (options and arguments), invoking nothing."""
    argv = shlex.split(line, comments=True)
    assert argv[0] == "ray"
    context = ray_cli.make_context("ray", argv[1:])
    name, command, rest = ray_cli.resolve_command(context, context.protected_args + context.args)
    return name, command.make_context(name, rest, parent=context).params


def test_the_documented_ray_commands_parse_with_rays_cli_and_the_study_command_line():
    lines = documented("ray ")
    lines += re.findall(r"\$\((ray [^)]*)\)", " ".join(documented("ssh ")))  # the head's IP in the tunnel
    parsed = dict(parse_ray_command(line) for line in lines)
    assert set(parsed) == {"up", "submit", "exec", "get-head-ip"}
    assert all(params["cluster_config_file"] == "cluster.yaml" for params in parsed.values())
    submitted = parsed["submit"]
    assert submitted["script"] == "study/run.py"
    load_spec(parse_args(list(submitted["script_args"])).study)  # a preset that exists, a valid spec


def test_the_documented_tunnel_reaches_mlflow_on_the_heads_private_ip_and_port():
    server = mlflow_server_command(load())
    port = re.search(r"--port (\d+)", server).group(1)
    [tunnel] = documented("ssh ")
    assert re.search(rf"-L {port}:HEAD_PRIVATE_IP:{port} ubuntu@\$\(ray get-head-ip cluster.yaml\)", tunnel)
    assert "~/.ssh/ray-autoscaler_us-west-2.pem" in tunnel  # the key `ray up` creates for the region
    assert load()["provider"]["region"] == "us-west-2"
    # HEAD_PRIVATE_IP is what the documented `ray exec` prints: the first address of `hostname -I`, as the
    # server's --host. `ray attach -p` would forward to the head's localhost, where nothing listens.
    _, printed = parse_ray_command(next(line for line in documented("ray exec")))
    assert printed["cmd"] == "hostname -I | cut -d' ' -f1"
    assert not any(line.startswith("ray attach") for line in documented("ray "))


def run_setup(command: str, home: Path, secrets: dict[str, str]) -> None:
    """A setup command of the file, run for real in `home`, with `aws ssm get-parameter` answered from
    `secrets` (no AWS here)."""
    answer = " ".join(f"{name}) printf '%s\\n' {shlex.quote(value)};;" for name, value in secrets.items())
    stub = f'aws() {{ case "$4" in {answer} esac; }}; '
    subprocess.run(["bash", "-c", stub + command], env={**os.environ, "HOME": str(home)}, check=True)


@pytest.mark.slow
def test_the_basic_auth_setup_refuses_anonymous_requests_and_lets_the_nodes_credentials_in(tmp_path):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (pyproject.toml)")
    config = load()
    secrets = {"/gan-stability/mlflow-admin-password": "admin-" + os.urandom(8).hex(),
               "/gan-stability/mlflow-flask-secret": os.urandom(8).hex(),
               "/gan-stability/ray-auth-token": os.urandom(16).hex()}
    (tmp_path / "mlflow").mkdir()
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".ray").mkdir()
    for command in config["setup_commands"] + config["head_setup_commands"]:
        if any(path in command for path in ("~/.mlflow/credentials", "~/.ray/auth_token", "basic_auth.ini")):
            run_setup(command, tmp_path, secrets)
    assert (tmp_path / ".ray" / "auth_token").read_text().strip() == secrets["/gan-stability/ray-auth-token"]
    assert (tmp_path / ".mlflow" / "credentials").stat().st_mode & 0o077 == 0

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HOME": str(tmp_path),
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "mlflow" / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["/gan-stability/mlflow-admin-password"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["/gan-stability/mlflow-flask-secret"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                               str(tmp_path / "artifacts")], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for_http(f"{uri}/health", timeout=180)  # open to all: the driver's probe needs no credentials
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401
        # A node's client: MLflow reads ~/.mlflow/credentials, as written by the setup command.
        client = ("import mlflow; c = mlflow.tracking.MlflowClient(); "
                  "print(c.get_experiment(c.create_experiment('on-the-cluster')).name)")
        result = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": uri})
        assert result.stdout.strip() == "on-the-cluster", result.stderr[-2000:]
    finally:
        kill_mlflow_server(server)
