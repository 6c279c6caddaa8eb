"""study/preflight.py: every refusal of the pre-flight names its field and valid values, all of a study's
problems come together, and each exits 2 before Ray starts (on a cluster: right after joining it) with nothing
written to MLflow. Real files in temp folders, a real sqlite tracking store, a real `ray start` cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from conftest import free_port
from PIL import Image

import study.run
from study.preflight import check_cluster, cluster_resource_problems, preflight
from study.run import main
from study.spec import load_spec
from trainables.config import SEED_MAX, SIZE_BOUNDS, ConfigError, parse_config
from trainables.trial import resolve_device

REPOSITORY = Path(__file__).resolve().parent.parent
# Long enough for every divergence detector to fire, so that a study prints no warning of its own.
TINY = {"dataset": "digits", "device": "cpu", "iterations": 40, "log_every": 5, "eval_every": 10,
        "checkpoint_every": 10, "metrics": ["fd_digits"]}


def write_spec(folder: Path, base: dict | None = None, **fields) -> Path:
    spec = {"name": "pre", "base": {**TINY, **(base or {})}, "axes": {"variant": ["sn", "bsn"]}, **fields}
    path = folder / "pre.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def write_imagefolder(root: Path, empty: tuple[str, ...] = ()) -> Path:
    """root/a/<image>.png, two real images, and a zero-byte file per name in `empty`."""
    (root / "a").mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (40, 40), (index, 100, 200)).save(root / "a" / f"real{index}.png")
    for name in empty:
        (root / "a" / name).write_bytes(b"")
    return root


@pytest.fixture
def edge(tmp_path, monkeypatch):
    """A clean folder and home, the study starting its own Ray here (whatever else runs on this machine), and
    Ray's start forbidden: a pre-flight refusal must come before it."""
    monkeypatch.chdir(tmp_path)
    for variable in ("MLFLOW_TRACKING_URI", "GAN_STABILITY_STORAGE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home" / "torch"))

    def ray_must_not_start(*args, **kwargs):
        raise AssertionError("a pre-flight refusal reached Ray")

    monkeypatch.setattr(ray, "init", ray_must_not_start)
    monkeypatch.setattr(study.run, "run_study", ray_must_not_start)
    return tmp_path


def refused(folder: Path, capsys, spec: Path, *argv: str) -> str:
    """stderr of a study refused with exit code 2, having tracked nothing (no database) and started no Ray."""
    database = folder / "tracking" / "mlflow.db"
    (folder / "tracking").mkdir(exist_ok=True)
    code = main(["--study", str(spec), "--tracking-uri", f"sqlite:///{database}", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "\nerror: " in f"\n{err}" and "Traceback" not in err  # after the warnings, if any
    assert not database.exists() and not ray.is_initialized()
    return err


# ---- the data ------------------------------------------------------------------------------------------

def test_a_data_root_that_is_a_file_is_refused(edge, capsys):
    (edge / "a-file").write_text("")
    err = refused(edge, capsys, write_spec(edge, {"dataset": "cifar10", "data_root": "a-file"}))
    assert (f"data_root: dataset 'cifar10' not found: expected {edge / 'a-file'}. data_root is a file; it "
            "must be the folder the dataset's files are in") in err


def test_a_missing_dataset_is_refused_with_where_it_was_expected_and_how_to_get_it(edge, capsys):
    (edge / "data").mkdir()
    err = refused(edge, capsys, write_spec(edge, {"dataset": "cifar10", "data_root": "data"}))
    expected = f"expected {edge}/data/cifar-10-batches-py/data_batch_"
    assert f"data_root: dataset 'cifar10' not found: {expected}" in err
    assert "Extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into" in err


def test_a_zero_byte_image_in_an_imagefolder_is_refused_naming_the_file(edge, capsys):
    write_imagefolder(edge / "faces", empty=("blank.jpg",))
    err = refused(edge, capsys, write_spec(edge, {"dataset": "imagefolder", "data_root": "faces"}))
    assert (f"data_root: dataset 'imagefolder' at {edge}/faces: imagefolder: 1 empty (zero-byte) image "
            f"file(s) among the 3: {edge}/faces/a/blank.jpg; remove or replace them") in err


def test_real_data_of_the_expected_format_passes_and_the_dry_run_prints_no_warning(edge, capsys):
    write_imagefolder(edge / "faces")
    spec = write_spec(edge, {"dataset": "imagefolder", "data_root": "faces"})
    assert main(["--study", str(spec), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "2 trials (2 cells x 1 seeds)" in out
    assert sorted(path.name for path in edge.iterdir()) == ["faces", "home", "pre.yaml"]  # nothing written


# ---- the Inception weights ---------------------------------------------------------------------------

def test_fid_without_the_inception_weights_is_refused_by_the_dry_run_too(edge, capsys):
    spec = write_spec(edge, {"metrics": ["fid"], "inception_weights": "weights/inception.pth"})
    for argv in ((), ("--dry-run",)):
        err = refused(edge, capsys, spec, *argv)
        assert (f"inception_weights: FID/IS/KID need torch-fidelity's InceptionV3 weights, expected at "
                f"{edge}/weights/inception.pth (the file set by `inception_weights` does not exist)") in err
        assert "use the offline surrogate `fd_digits`" in err


def test_a_file_other_than_the_inception_weights_is_refused_by_its_hash(edge, capsys):
    (edge / "weights.pth").write_bytes(b"not the InceptionV3 weights")
    err = refused(edge, capsys, write_spec(edge, {"metrics": ["kid"], "inception_weights": "weights.pth"}))
    assert f"expected at {edge}/weights.pth (the file there is another one: its sha256 starts with " in err


# ---- cache dir, device, seeds, sizes -------------------------------------------------------------------

def test_a_cache_dir_that_cannot_be_written_is_refused(edge, capsys):
    (edge / "a-file").write_text("")
    # procfs takes no new file, whoever asks (root too): the probe file the check writes there fails.
    for cache_dir, named in (("/proc/gan-stability-cache", "cache_dir: cannot write in /proc ("),
                             ("a-file/cache", f"cache_dir: {edge / 'a-file'} is not a folder")):
        err = refused(edge, capsys, write_spec(edge, {"cache_dir": cache_dir}))
        assert named in err


def test_a_device_name_torch_trains_no_trial_on_is_refused(edge, capsys):
    err = refused(edge, capsys, write_spec(edge, {"device": "tpu"}))
    assert "base.device: 'tpu' is not a device a trial runs on; valid: auto, cpu, cuda, cuda:<index>" in err


def test_a_gpu_index_other_than_0_under_a_gpu_share_is_refused_whatever_the_machine(edge, capsys):
    err = refused(edge, capsys, write_spec(edge, {"device": "cuda:7"}, resources={"gpu": 0.5}))
    assert ("device: cuda:7: Ray shows a trial only the GPU it gives it (resources.gpu 0.5), as cuda:0; "
            "valid: auto, cuda, cuda:0") in err


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_gpu_this_machine_lacks_is_refused_naming_those_it_has(edge, capsys):
    err = refused(edge, capsys, write_spec(edge, {"device": "cuda:7"}))
    assert f"device: cuda:7 does not exist on this machine, which has {torch.cuda.device_count()} CUDA" in err
    with pytest.raises(ConfigError, match="device: cuda:7 does not exist on this machine"):
        resolve_device("cuda:7")  # a trial alone (python -m trainables) meets the same message


def test_a_seed_that_would_overflow_the_evaluation_stream_is_refused(edge, capsys):
    err = refused(edge, capsys, write_spec(edge, seeds=[100_000_000_000_000]))
    assert "seeds: 100000000000000 is out of range; valid: an int in 0 .. 4294967295 (2**32 - 1)" in err
    # The largest seed at the last iteration still seeds torch (trainables/trial.py: Trial.evaluate).
    torch.Generator().manual_seed(SEED_MAX * 1_000_003 + SIZE_BOUNDS["iterations"][1])
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(100_000_000_000_000 * 1_000_003 + 1)


@pytest.mark.parametrize(("setting", "named"), [
    ("base.iterations=1000000000000", "base.iterations: 1000000000000 exceeds its upper bound; valid: 1 .. "),
    ("base.batch_size=1000000", "base.batch_size: 1000000 exceeds its upper bound; valid: 2 .. 8192"),
    ("base.width=1e4", "base.width: 10000.0 exceeds its upper bound; valid: > 0.0 and <= 16.0"),
    ("base.z_dim=1000000000", "base.z_dim: 1000000000 exceeds its upper bound; valid: 1 .. 4096"),
    ("base.n_dis=1.0e+9", "base.n_dis: 1000000000 exceeds its upper bound; valid: 1 .. 100"),
    ("base.eval_generated=100000000", "base.eval_generated: 100000000 exceeds its upper bound; valid: 2 .. "),
])
def test_sizes_past_their_named_bound_are_refused(edge, capsys, setting, named):
    assert named in refused(edge, capsys, write_spec(edge), "--set", setting)


@pytest.mark.parametrize("field", sorted(SIZE_BOUNDS))
def test_each_size_bound_admits_its_range_and_nothing_past_it(field):
    low, high = SIZE_BOUNDS[field]
    extra = {"log_every": 1, "eval_every": 1, "checkpoint_every": 1} if field == "iterations" else {}
    assert getattr(parse_config({field: high, **extra}), field) == high
    with pytest.raises(ConfigError, match=f"{field}: .* exceeds its upper bound; valid: "):
        parse_config({field: high * 2})
    below = low if isinstance(low, float) else low - 1  # the lower bounds: each field's own (width: > 0)
    if not isinstance(low, float):
        assert getattr(parse_config({field: low}), field) == low
    with pytest.raises(ConfigError, match=field):
        parse_config({field: below})


# ---- resources ---------------------------------------------------------------------------------------

def test_more_cpus_per_trial_than_this_machine_has_is_refused(edge, capsys):
    cpus = len(os.sched_getaffinity(0))
    err = refused(edge, capsys, write_spec(edge, resources={"cpus": cpus + 1}))
    assert (f"resources.cpus: {cpus + 1} CPUs per trial, but this machine (the study starts its own Ray "
            f"here: no --ray-address, no $RAY_ADDRESS) has {cpus}, so no trial would ever start; "
            f"valid: > 0 and <= {cpus}") in err


def test_a_gpu_share_on_a_machine_without_a_gpu_is_refused_by_the_script_before_ray_starts(tmp_path):
    """The real script, with the GPUs hidden: whichever machine runs this, the study's own Ray has none."""
    spec = write_spec(tmp_path, resources={"gpu": 1})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": "local", "HOME": str(tmp_path),
           "RAY_TMPDIR": str(tmp_path / "ray")}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, str(REPOSITORY / "study" / "run.py"), "--study", str(spec),
                             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert ("resources.gpu: 1 GPU per trial, but this machine (the study starts its own Ray here: no "
            "--ray-address, no $RAY_ADDRESS) has no GPU (0 CUDA devices), so no trial would ever "
            "start; valid: leave resources.gpu unset (null)") in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()  # no MLflow, no Ray


# ---- all together, and the warnings ------------------------------------------------------------------

def test_every_problem_of_a_study_is_reported_at_once_naming_the_trials_it_concerns(edge, capsys):
    (edge / "data").mkdir()
    spec = write_spec(edge, {"metrics": ["fid"], "inception_weights": "missing.pth", "cache_dir": "/proc/x"},
                      axes={"dataset": ["digits", "cifar10"]}, resources={"cpus": 999})
    err = refused(edge, capsys, spec, "--set", "base.data_root=data")
    heading, *lines = err.splitlines()
    assert heading == "error: study 'pre' cannot start (pre-flight; nothing was started or written):"
    problems = {line.split(":")[0].strip(): line for line in lines}
    assert sorted(problems) == ["cache_dir", "data_root", "inception_weights", "resources.cpus"]
    assert problems["data_root"].endswith("(trial dataset=cifar10)")  # the digits trial needs no data_root
    assert problems["inception_weights"].endswith("instead.")  # every trial needs the weights: none named


def test_detectors_too_slow_for_the_run_are_warnings_of_the_dry_run_and_of_the_run(edge, capsys):
    spec = write_spec(edge, {"iterations": 20, "log_every": 50})
    assert main(["--study", str(spec), "--dry-run"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert [line.split(":")[1].strip() for line in warnings] == [
        "divergence.grad_vanishing_patience", "divergence.d_saturation_patience",
        "divergence.grad_explosion_startup + divergence.grad_explosion_patience"]
    assert all(line.endswith("; that divergence detector stays idle") for line in warnings)
    found = preflight(load_spec(str(spec))[0])
    assert found.warnings == [line.removeprefix("warning: ") for line in warnings]


# ---- on a cluster: after joining it, before any MLflow write ----------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real one-node Ray cluster (`ray start --head`, 1 CPU, no GPU) whose workers' home holds
    ~/data/faces, an imagefolder the driver's home lacks: data that lives on the workers only."""
    root = tmp_path_factory.mktemp("cluster")
    write_imagefolder(root / "worker-home" / "data" / "faces")
    (root / "driver-home").mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rpf", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    log = root / "ray-start.log"
    env = {**os.environ, "HOME": str(root / "worker-home"), "PYTHONPATH": str(REPOSITORY)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
         "--disable-usage-stats"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()
        yield {"address": f"127.0.0.1:{port}", "home": root / "driver-home"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` and the Ray processes it started
        try:
            process.wait(timeout=60)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def on_cluster(cluster, tmp_path, monkeypatch):
    """The driver in a clean folder with its own home, joining the cluster; no trial may start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", cluster["address"])
    monkeypatch.setenv("HOME", str(cluster["home"]))

    def no_trial(*args, **kwargs):
        raise AssertionError("a pre-flight refusal reached the study")

    monkeypatch.setattr(study.run, "run_study", no_trial)
    yield tmp_path
    ray.shutdown()
    (cluster["home"] / "ray_bootstrap_config.yaml").unlink(missing_ok=True)


def faces_spec(folder: Path, data_root: str = "~/data/faces", **fields) -> Path:
    return write_spec(folder, {"dataset": "imagefolder", "data_root": data_root, "cache_dir": str(folder)},
                      **fields)


@pytest.mark.slow
def test_on_a_cluster_a_gpu_share_no_node_has_is_refused_after_joining_before_mlflow(on_cluster, capsys,
                                                                                      cluster):
    err = refused(on_cluster, capsys, faces_spec(on_cluster, resources={"gpu": 1}))
    assert (f"resources.gpu: 1 GPU per trial, but no node of the Ray cluster at {cluster['address']} has "
            "that (its nodes up: 1 CPU 0 GPU; node types its autoscaler can start: none known); valid: leave "
            "resources.gpu unset (null)") in err


@pytest.mark.slow
def test_on_a_cluster_a_node_type_its_autoscaler_can_start_satisfies_a_trial(on_cluster, cluster):
    node_types = {"head": {"resources": {"CPU": 0}},
                  "gpu_worker": {"max_workers": 8, "resources": {"CPU": 4, "GPU": 1}}}
    bootstrap = cluster["home"] / "ray_bootstrap_config.yaml"  # where `ray up` leaves it on the head
    bootstrap.write_text(yaml.safe_dump({"available_node_types": node_types}))
    ray.init(address=cluster["address"])
    spec = load_spec(str(faces_spec(on_cluster, resources={"gpu": 0.25, "cpus": 4})))[0]
    assert cluster_resource_problems(spec, "the cluster") == []
    spec = load_spec(str(faces_spec(on_cluster, resources={"gpu": 1, "cpus": 8})))[0]
    assert cluster_resource_problems(spec, "the cluster") == [
        "resources.cpus: 8 CPUs per trial, but of the cluster, the nodes that fit its GPU share have at most "
        "4 (its nodes up: 1 CPU 0 GPU; node types its autoscaler can start: gpu_worker (4 CPU 1 GPU), head "
        "(0 CPU 0 GPU)); valid: > 0 and <= 4"]


@pytest.mark.slow
def test_on_a_cluster_data_that_lives_on_the_workers_only_is_checked_by_a_task_on_a_worker(on_cluster,
                                                                                         cluster):
    spec = load_spec(str(faces_spec(on_cluster)))[0]
    found = preflight(spec, ray_address=cluster["address"])  # as study.run.check_ray_address names it
    assert found.cluster is not None
    assert found.missing_here[0].startswith("data_root: dataset 'imagefolder' not found: expected "
                                            f"{on_cluster.parent}")  # the driver's home lacks it
    ray.init(address=found.cluster)
    [note] = check_cluster(spec, found)
    assert note.startswith("pre-flight: worker node ") and note.endswith(" has what this machine lacks "
                                                                         "(data_root)")


@pytest.mark.slow
def test_on_a_cluster_data_on_no_node_is_refused_naming_the_worker_before_mlflow(on_cluster, capsys):
    err = refused(on_cluster, capsys, faces_spec(on_cluster, data_root="~/data/elsewhere"))
    assert "data_root: dataset 'imagefolder' not found: expected " in err
    assert "/worker-home/data/elsewhere." in err and "(on worker node " in err


@pytest.mark.slow
def test_a_gpu_the_driver_lacks_is_left_to_the_workers_check_on_a_cluster(on_cluster, cluster):
    """cluster.yaml's head has no GPU, its workers do: the device is checked where the trials run."""
    spec = load_spec(str(write_spec(on_cluster, {"device": "cuda", "cache_dir": str(on_cluster)},
                                    resources={"gpu": 1})))[0]
    # no error: on a cluster, this machine's lacks are for a worker to settle
    found = preflight(spec, ray_address=cluster["address"])
    lacking = "device: cuda does not exist on this machine, which has 0 CUDA device(s); valid here: auto, cpu"
    assert found.missing_here == ([] if torch.cuda.is_available() else [lacking])
