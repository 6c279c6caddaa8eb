"""Faults injected for real into running studies: `study/run.py` as its own process on a local Ray, a real
`mlflow server` process, real SIGKILLs. After each: every trial once in MLflow, every metric step once.

Killed here, by process id, only processes these tests started (the driver, its Ray, the MLflow server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, kill_mlflow_server, start_mlflow_server, wait_for_http
from mlflow.tracking import MlflowClient

from study import layout

REPOSITORY = Path(__file__).resolve().parent.parent
TINY_BASE = ("base: {dataset: digits, device: cpu, width: 0.125, z_dim: 16, batch_size: 8, iterations: %d, "
             "log_every: 5, eval_every: 10, checkpoint_every: 10, eval_generated: 64, eval_real: 64}\n")


# ---- processes ------------------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3])


def descendants(root: int) -> list[int]:
    """Every live process below root (Ray's GCS, raylet and workers under a driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def trial_workers(driver: int) -> list[int]:
    """The Ray worker processes running a Tune trial under this driver (proctitle `ray::ImplicitFunc...`)."""
    return [pid for pid in descendants(driver) if command_line(pid).startswith("ray::ImplicitFunc")]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)
    return value


class Study:
    """`python study/run.py` in its own session, on its own local Ray (RAY_ADDRESS=local)."""

    def __init__(self, folder: Path, spec_text: str, tracking_uri: str,
                 extra_env: dict[str, str] | None = None):
        self.folder = folder
        self.spec = folder / "spec.yaml"
        self.spec.write_text(spec_text)
        self.tracking_uri = tracking_uri
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", **(extra_env or {})}
        self.process: subprocess.Popen | None = None
        self.ray_processes: set[int] = set()
        self.logs: list[Path] = []

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, str(REPOSITORY / "study" / "run.py"), "--study", str(self.spec),
                "--tracking-uri", self.tracking_uri, "--storage", str(self.folder / "ray"), *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        log = self.folder / f"driver-{len(self.logs)}.log"
        self.logs.append(log)
        self.process = subprocess.Popen(self.command(*extra), cwd=self.folder, env=self.env,
                                        stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self.process

    def watch(self) -> None:
        """Remember the driver's Ray processes: a SIGKILLed driver leaves them behind."""
        if self.process is not None:
            self.ray_processes.update(descendants(self.process.pid))

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            self.watch()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)
        return self.process.returncode

    def output(self) -> str:
        return "\n".join(log.read_text()[-4000:] for log in self.logs)

    def stop(self) -> None:
        """Kill the driver and every Ray process it started, by id."""
        self.watch()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        kill_all(sorted(self.ray_processes))


# ---- MLflow read-back ------------------------------------------------------------------------------------

def trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.role = 'trial'") if experiment else []


def steps(client: MlflowClient, run, key: str = "loss_d") -> list[int]:
    return [metric.step for metric in client.get_metric_history(run.info.run_id, key)]


def assert_every_step_once(client: MlflowClient, run, iterations: int) -> None:
    """loss_d at every logging step up to the trial's end, none missing, none twice; objective likewise."""
    tags = run.data.tags
    assert tags["status"] in ("finished", "diverged") and run.info.status == "FINISHED", tags
    last = iterations if tags["status"] == "finished" else int(run.data.metrics["iteration"])
    assert steps(client, run) == list(range(5, last + 1, 5)), tags["cell"]
    objective = steps(client, run, "objective")
    assert objective == sorted(set(objective)) and objective[-1] == last


def resumed_at(client: MlflowClient, run) -> list[int]:
    """The iterations of the checkpoints the trial's attempts were restored from, as its run records them
    (study.layout.RESUMED_FROM, at that step: Ray's result.json is no record of the attempts, and a retry
    starts from the copy in storage, which may be older than the killed attempt's last results)."""
    history = client.get_metric_history(run.info.run_id, layout.RESUMED_FROM)
    assert all(metric.step == metric.value for metric in history)
    return [metric.step for metric in history]


def assert_summary_counts(study: Study, runs: list) -> None:
    """The driver's end line counts the outcomes MLflow holds (a tiny trial may diverge on some machine)."""
    outcomes = [run.data.tags["outcome"] for run in runs]
    assert (f"{len(runs)} trials ended: "
            + ", ".join(f"{outcomes.count(name)} {name}" for name in layout.OUTCOMES)) in study.output()


def killed_and_resumed(study: Study, client: MlflowClient, name: str, ended: int, iterations: int) -> list:
    """Start the study, SIGKILL its driver and Ray once `ended` trials ended while another is past its first
    checkpoint, `--resume` it; every trial's steps once, the ended ones untouched. Returns the trial runs."""

    def enough_ended_one_running():
        study.watch()
        runs = trial_runs(client, name)
        done = [run for run in runs if run.data.tags["status"] in ("finished", "diverged")]
        running = [run for run in runs if run.data.tags["status"] == "running"
                   and run.data.metrics.get("iteration", 0) >= 15]
        return done if len(done) >= ended and running else None

    study.start()
    done = wait_for(enough_ended_one_running, 300, f"no {ended} trials ended while another checkpointed")
    study.watch()
    os.kill(study.process.pid, signal.SIGKILL)
    study.process.wait(timeout=30)
    kill_all(sorted(study.ray_processes))  # its orphaned Ray: a lost machine takes those with it
    done_before = {run.info.run_id: (run.info.end_time, steps(client, run)) for run in done}

    study.start("--resume")
    assert study.wait(timeout=420) == 0, study.output()
    runs = trial_runs(client, name)
    for run in runs:
        assert_every_step_once(client, run, iterations)
        if run.info.run_id in done_before:  # ended before the kill: not run again, not even re-closed
            assert (run.info.end_time, steps(client, run)) == done_before[run.info.run_id]
    return runs


# ---- 1. a trial's worker SIGKILLed mid-training ----------------------------------------------------------

@pytest.mark.slow
def test_sigkilled_trial_worker_resumes_from_its_checkpoint_in_the_same_mlflow_run(studies, mlflow_server,
                                                                                   tmp_path):
    study = Study(tmp_path, "name: worker-kill\n" + TINY_BASE % 150 + "axes:\n  variant: [sn, bsn]\n"
                  "seeds: 1\nmax_concurrent: 1\n", mlflow_server)
    studies.append(study)
    client = MlflowClient(mlflow_server)
    study.start()

    def first_trial_past_its_checkpoint():  # iteration 35 logged, the checkpoint of 30 behind it
        study.watch()
        runs = [run for run in trial_runs(client, "worker-kill")
                if run.data.metrics.get("iteration", 0) >= 35]
        workers = trial_workers(study.process.pid)
        return (runs[0], workers) if runs and len(workers) == 1 else None

    victim, [worker] = wait_for(first_trial_past_its_checkpoint, 300, "no trial reached iteration 35")
    os.kill(worker, signal.SIGKILL)
    assert study.wait(timeout=420) == 0, study.output()

    runs = trial_runs(client, "worker-kill")
    assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=sn"]  # each once
    resumed = next(run for run in runs if run.data.tags["trial_id"] == victim.data.tags["trial_id"])
    assert resumed.info.run_id == victim.info.run_id  # the retry continued the same MLflow run
    for run in runs:
        assert_every_step_once(client, run, 150)
    # Killed after logging 35, the trial had checkpointed at 30 (or, by then, at 40): not restarted from 0.
    [iteration] = resumed_at(client, victim)
    assert iteration in range(30, 150, 10)
    assert_summary_counts(study, runs)


@pytest.mark.slow
def test_sigkilled_pack_worker_resumes_every_member_from_the_pack_checkpoint(studies, mlflow_server,
                                                                             tmp_path):
    study = Study(tmp_path, "name: pack-kill\n" + TINY_BASE % 100
                  + "axes:\n  g_lr: [1.0e-4, 2.0e-4, 4.0e-4]\nseeds: 1\npack_size: 3\n", mlflow_server)
    studies.append(study)
    client = MlflowClient(mlflow_server)
    study.start()

    def members_past_a_checkpoint():  # iteration 35 logged by every member, the pack checkpoint of 30 behind
        study.watch()
        runs = trial_runs(client, "pack-kill")
        workers = trial_workers(study.process.pid)
        ready = len(runs) == 3 and all(run.data.metrics.get("iteration", 0) >= 35 for run in runs)
        return (runs, workers) if ready and len(workers) == 1 else None

    before, [worker] = wait_for(members_past_a_checkpoint, 300, "the pack did not reach iteration 35")
    os.kill(worker, signal.SIGKILL)
    assert study.wait(timeout=420) == 0, study.output()

    runs = trial_runs(client, "pack-kill")
    assert sorted(run.info.run_id for run in runs) == sorted(run.info.run_id for run in before)  # same runs
    for run in runs:
        assert_every_step_once(client, run, 100)
    # Every member resumed from the one pack checkpoint, at 30 (or, by the kill, 40), not from 0.
    [[iteration]] = {tuple(resumed_at(client, run)) for run in runs}
    assert iteration in range(30, 100, 10)
    assert_summary_counts(study, runs)


# ---- 2. the driver SIGKILLed mid-study, then --resume -----------------------------------------------------

@pytest.mark.slow
def test_sigkilled_driver_resumes_with_every_trial_once_and_no_finished_trial_rerun(studies, mlflow_server,
                                                                                   tmp_path):
    study = Study(tmp_path, "name: driver-kill\n" + TINY_BASE % 100 + "axes:\n  variant: [none, sn, bsn]\n"
                  "seeds: 1\nmax_concurrent: 1\n", mlflow_server)
    studies.append(study)
    client = MlflowClient(mlflow_server)
    runs = killed_and_resumed(study, client, "driver-kill", ended=1, iterations=100)
    assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=none", "variant=sn"]
    experiment = client.get_experiment_by_name("driver-kill")
    [parent] = client.search_runs([experiment.experiment_id], "tags.role = 'study'")
    assert parent.data.tags["status"] == "finished" and parent.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {parent.info.run_id}


@pytest.mark.slow
def test_sigkilled_driver_of_an_optuna_search_resumes_to_its_budget_with_every_trial_once(studies,
                                                                                          mlflow_server,
                                                                                          tmp_path):
    study = Study(tmp_path, "name: optuna-kill\n" + TINY_BASE % 60
                  + "axes:\n  g_lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-3}\nseeds: 2\n"
                  "search: {kind: optuna, seed: 3}\nbudget: {samples: 3}\nmax_concurrent: 1\n", mlflow_server)
    studies.append(study)
    client = MlflowClient(mlflow_server)
    runs = killed_and_resumed(study, client, "optuna-kill", ended=2, iterations=60)
    assert len(runs) == 6  # 3 points x 2 seeds: none lost, none run twice
    points = {}
    for run in runs:
        points.setdefault(run.data.params["g_lr"], []).append(run.data.params["seed"])
    assert sorted(sorted(seeds) for seeds in points.values()) == [["0", "1"]] * 3  # each point for both seeds


# ---- 3. the MLflow server down mid-study, and down at the start -------------------------------------------

@pytest.mark.slow
def test_mlflow_server_down_for_10_s_mid_study_loses_no_metric(studies, tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        wait_for_http(f"{uri}/health")
        study = Study(tmp_path, "name: mlflow-down\n" + TINY_BASE % 200 + "axes:\n  variant: [sn, bsn]\n"
                      "seeds: 1\n", uri)
        studies.append(study)
        client = MlflowClient(uri)
        study.start()
        wait_for(lambda: any(run.data.metrics.get("iteration", 0) >= 15
                             for run in trial_runs(client, "mlflow-down")), 300, "no trial reached 15")
        down = time.time()
        kill_mlflow_server(server)  # mid-study
        time.sleep(10)
        server = start_mlflow_server(root, port)  # same database: back as it was
        wait_for_http(f"{uri}/health")
        up = time.time()
        assert study.wait(timeout=420) == 0, study.output()
        runs = trial_runs(client, "mlflow-down")
        assert sorted(run.data.tags["cell"] for run in runs) == ["variant=bsn", "variant=sn"]
        for run in runs:
            assert_every_step_once(client, run, 200)
        # A trial logged before the outage and after it, every step in between present: it waited it out.
        spans = [[metric.timestamp / 1000 for metric in client.get_metric_history(run.info.run_id, "loss_d")]
                 for run in runs]
        assert any(min(stamps) < down and max(stamps) > up for stamps in spans), (down, up)
    finally:
        kill_mlflow_server(server)


@pytest.mark.slow
def test_hung_mlflow_server_at_the_start_is_refused_within_15_s_before_any_trial(tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        wait_for_http(f"{uri}/health")
        os.killpg(server.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
        study = Study(tmp_path, "name: hung\n" + TINY_BASE % 20, uri)
        # A probe without its timeout would wait forever on the stopped server: subprocess.run's timeout.
        result = subprocess.run(study.command() + ["--dry-run"], cwd=tmp_path, env=study.env,
                                capture_output=True, text=True, timeout=120)
    finally:
        kill_mlflow_server(server)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--tracking-uri {uri}: no MLflow server answered within 15 s" in result.stderr
    assert not (tmp_path / "ray").exists()


# ---- 4. divergence injected into the trials of a study with ASHA, and with Optuna -------------------------

# sitecustomize for the study's processes: once a Ray worker imports trainables.train, trials with seed 1, 2
# or 3 get a NaN batch, an inf D gradient or a NaN D loss at D step 7 (the real code paths, poisoned values):
# the sampler and D are built in trainables.trial, the loss is taken in trainables.train.
INJECTOR = textwrap.dedent('''
    import importlib.abc
    import importlib.util
    import math
    import sys

    FAULT_BY_SEED = {1: "nan_data", 2: "inf_grad", 3: "nan_loss"}
    AT_STEP = 7


    def poison(train_module):
        trial_module = sys.modules["trainables.trial"]
        original = dict(vars(train_module)) | dict(vars(trial_module))

        def train(config, report, **kwargs):
            fault = FAULT_BY_SEED.get(train_module.parse_config(config).seed)
            calls = {"n": 0}

            def hit():
                calls["n"] += 1
                return calls["n"] == AT_STEP

            class Sampler(original["BatchSampler"]):
                def next(self):
                    batch = super().next()
                    return batch * math.nan if hit() else batch

            def discriminator_loss(*args):
                loss = original["discriminator_loss"](*args)
                return loss * math.nan if hit() else loss

            def build_discriminator(*args, **kwargs):
                discriminator = original["build_discriminator"](*args, **kwargs)
                bias = next(p for name, p in discriminator.named_parameters() if name.endswith("bias"))
                bias.register_hook(lambda grad: grad * math.inf if hit() else grad)
                return discriminator

            module, patched = {"nan_data": (trial_module, {"BatchSampler": Sampler}),
                               "nan_loss": (train_module, {"discriminator_loss": discriminator_loss}),
                               "inf_grad": (trial_module, {"build_discriminator": build_discriminator}),
                               }.get(fault, (train_module, {}))
            vars(module).update(patched)
            try:
                return original["train"](config, report, **kwargs)
            finally:
                vars(module).update({name: original[name] for name in patched})

        train_module.train = train


    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainables.train":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                poison(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, Hook())
''')
EXPECTED_CAUSE = {"0": "", "1": "nonfinite_loss", "2": "nonfinite_grad", "3": "nonfinite_loss"}


def injector_env(folder: Path) -> dict[str, str]:
    (folder / "inject").mkdir()
    (folder / "inject" / "sitecustomize.py").write_text(INJECTOR)
    paths = [str(folder / "inject"), os.environ.get("PYTHONPATH")]
    return {"PYTHONPATH": os.pathsep.join(path for path in paths if path)}


@pytest.mark.slow
def test_nan_data_inf_grad_nan_loss_in_an_asha_study_are_named_and_the_study_completes(studies, mlflow_server,
                                                                                       tmp_path):
    study = Study(tmp_path, "name: diverge-asha\n" + TINY_BASE % 40 + "seeds: 4\n"
                  "scheduler: {kind: asha, grace_period: 10, reduction_factor: 2}\n", mlflow_server,
                  injector_env(tmp_path))
    studies.append(study)
    study.start()
    assert study.wait(timeout=420) == 0, study.output()
    client = MlflowClient(mlflow_server)
    runs = {run.data.tags["seed"]: run for run in trial_runs(client, "diverge-asha")}
    assert sorted(runs) == ["0", "1", "2", "3"]
    for seed, run in runs.items():
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["divergence_cause"] == EXPECTED_CAUSE[seed], (seed, tags)
        if seed != "0":  # D step 7 is iteration 7 (n_dis 1); the trial stops at the next logging step, 10
            assert (tags["status"], tags["diverged"], tags["divergence_step"]) == ("diverged", "1", "7")
            assert metrics["objective"] == 1e4 and metrics["iteration"] == 10
            events = json.loads(Path(client.download_artifacts(run.info.run_id, "events.json",
                                                               str(tmp_path / seed))).read_text())
            assert events[0]["cause"] == EXPECTED_CAUSE[seed] and events[0]["iteration"] == 7
        else:
            assert tags["diverged"] == "0"
    assert "4 trials ended" in study.output() and "0 failed" in study.output()


@pytest.mark.slow
def test_exploding_lr_in_an_optuna_search_is_a_named_divergence_and_the_search_completes(studies,
                                                                                         mlflow_server,
                                                                                         tmp_path):
    study = Study(tmp_path, "name: diverge-optuna\n"
                  + (TINY_BASE % 30).replace("}", ", variant: sn, divergence: {grad_explosion: 50.0}}")
                  + "axes:\n  lr: {bundle: {ok: {g_lr: 2.0e-4, d_lr: 2.0e-4}, exploding: {g_lr: 10.0, "
                  "d_lr: 10.0}}}\nseeds: 1\nsearch: {kind: optuna, seed: 6}\nbudget: {samples: 3}\n",
                  mlflow_server)
    studies.append(study)
    study.start()
    assert study.wait(timeout=420) == 0, study.output()
    client = MlflowClient(mlflow_server)
    runs = trial_runs(client, "diverge-optuna")
    # Search seed 6 draws ok, ok, exploding. A trial is its (cell, seed): the second draw of ok for seed 0 is
    # the same trial, so it hands Optuna the recorded result and trains nothing (the same config and seed
    # would train the same run again).
    assert len(runs) == 2
    by_label = {}
    for run in runs:
        by_label.setdefault(run.data.params["g_lr"], []).append(run)
    assert sorted(by_label) == ["0.0002", "10.0"]
    for run in by_label["10.0"]:  # an sn D at lr 10 saturates G in its first step: G's gradient is gone
        assert (run.data.tags["divergence_cause"], run.data.metrics["objective"]) == ("grad_vanishing", 1e4)
    for run in by_label["0.0002"]:
        assert run.data.tags["diverged"] == "0" and run.data.metrics["objective"] < 1e4
    # the summary counts trials, (cell, seed)s, as their MLflow runs say: 2, whatever Optuna drew 3 times
    assert "2 trials ended" in study.output() and "0 failed" in study.output()
