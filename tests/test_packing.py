"""Trial packing on CPU: each member of a pack is its single trial (same reports, weights, events), a diverged
member stops alone, the pack resumes exactly, and incompatible configs are refused naming the field.

The equivalence tests run both sides in float64: float32 rounding differences between grouped and plain
convolutions (~1e-7) are amplified by the GAN dynamics to percents within ~50 iterations, which would hide a
real bug behind a loose tolerance; in float64 they stay below 1e-9 over hundreds of iterations.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import float64_trials

from trainables.config import SCALED_VARIANTS, VARIANTS, ConfigError
from trainables.packing import PackedAdam, train_pack
from trainables.train import train
from trainables.trial import CHECKPOINT_FILE

TINY = {
    "width": 0.125, "batch_size": 8, "z_dim": 16, "iterations": 40, "log_every": 5, "eval_every": 1000,
    "checkpoint_every": 1000, "eval_generated": 64, "eval_real": 64,
}
EXPLODING = {"divergence": {"grad_explosion": 1e-3}}  # every step over: an explosion confirmed at 25
FLOAT64_RTOL = 1e-8
FLOAT32_RTOL = 100 * torch.finfo(torch.float32).eps  # a hundred float32 roundings: ~1.2e-5
# G's biases before a batch norm have a zero gradient in exact arithmetic: Adam turns the rounding noise that
# stands for it into full-size steps, so these biases (and the running means that include them) and their
# moments follow the noise, not the training. Everything else of a member must equal its single trial.
BIASES_BEFORE_BATCH_NORM = ("project", "blocks.deconv1", "blocks.deconv2", "blocks.deconv3")
BATCH_NORMS_AFTER_BIAS = ("project_bn", "blocks.bn1", "blocks.bn2", "blocks.bn3")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one torch thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """A `report` callable: keeps every report and the checkpoint folder it came with."""

    def __init__(self, on_report=None):
        self.reports: list[dict] = []
        self.checkpoints: list[str | None] = []
        self.on_report = on_report

    def __call__(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)
        if self.on_report is not None:
            self.on_report(metrics, checkpoint_dir)


def checkpoint(folder) -> dict:
    return torch.load(folder / CHECKPOINT_FILE, weights_only=True)


def tensors_of(state: dict) -> dict[str, torch.Tensor]:
    """Weights, buffers and Adam moments (named by parameter) of a train.py checkpoint, flat."""
    out = {f"G.{k}": v for k, v in state["generator"].items()}
    out |= {f"D.{k}": v for k, v in state["discriminator"].items()}
    for opt, network in (("opt_g", "generator"), ("opt_d", "discriminator")):
        buffers = {name for name, value in state[network].items() if not value.is_floating_point()
                   or "running_" in name or name.endswith((".u", ".v"))}
        parameter_names = [name for name in state[network] if name not in buffers]
        for index, moments in state[opt]["state"].items():
            out |= {f"{opt}.{parameter_names[index]}.{key}": value for key, value in moments.items()}
    return out


def follows_training(key: str) -> bool:
    """False for the tensors that only rounding noise drives (BIASES_BEFORE_BATCH_NORM)."""
    return not any(f"{layer}.bias" in key for layer in BIASES_BEFORE_BATCH_NORM) and not any(
        f"G.{norm}.running_mean" == key for norm in BATCH_NORMS_AFTER_BIAS)


def assert_close_reports(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    for key, value in expected.items():
        if key == "it_per_s":  # wall-clock
            continue
        if isinstance(value, str):
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, rel=rtol, abs=rtol), key


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory):
    """A pack of three bssn members (member 1 explodes) and the three single trials, all in float64."""
    root = tmp_path_factory.mktemp("float64")
    base = TINY | {"variant": "bssn", "width": 0.0625, "iterations": 200, "log_every": 25, "eval_every": 100,
                   "checkpoint_every": 100}
    configs = [
        base | {"seed": 0},
        base | {"seed": 1, "scale": 1.5} | EXPLODING,
        base | {"seed": 2, "scale": 0.8, "g_lr": 5e-4, "d_lr": 1e-4, "beta1": 0.0, "beta2": 0.9},
    ]
    pack_reports: list[tuple[dict, str | None]] = []

    def keep_checkpoint_at_100(metrics, checkpoint_dir):
        pack_reports.append((dict(metrics), checkpoint_dir))
        if metrics["iteration"] == 100:
            shutil.copytree(checkpoint_dir, root / "pack_checkpoint_100")

    with float64_trials():
        members = [Recorder() for _ in configs]
        summaries = train_pack(configs, members, workdir=root / "pack", pack_report=keep_checkpoint_at_100)
        singles = []
        for k, config in enumerate(configs):
            singles.append(Recorder())
            train(config, singles[-1], workdir=root / f"single_{k}")
        # member 0 taken out of the pack at iteration 100 and finished alone by train()
        alone = Recorder()
        train(configs[0], alone, workdir=root / "alone",
              resume_from=root / "pack_checkpoint_100" / "member_0")
    return {"root": root, "configs": configs, "summaries": summaries, "members": members,
            "singles": singles, "pack_reports": pack_reports, "alone": alone}


def test_each_member_reports_what_its_single_trial_reports(float64_runs):
    for member, single in zip(float64_runs["members"], float64_runs["singles"], strict=True):
        assert [r["iteration"] for r in member.reports] == [r["iteration"] for r in single.reports]
        assert [c is None for c in member.checkpoints] == [c is None for c in single.checkpoints]
        for actual, expected in zip(member.reports, single.reports, strict=True):
            assert_close_reports(actual, expected, FLOAT64_RTOL)
    assert float64_runs["summaries"] == [m.reports[-1] for m in float64_runs["members"]]


def test_member_checkpoints_hold_the_single_trials_weights_and_adam_state(float64_runs):
    root = float64_runs["root"]
    for k in range(3):
        packed = checkpoint(root / "pack" / "checkpoint" / f"member_{k}")
        single = checkpoint(root / f"single_{k}" / "checkpoint")
        assert packed["iteration"] == single["iteration"]
        assert packed["opt_d"]["param_groups"] == single["opt_d"]["param_groups"]
        expected, actual = tensors_of(single), tensors_of(packed)
        assert actual.keys() == expected.keys()
        compared = [key for key in expected if follows_training(key)]
        assert len(compared) == len(expected) - 5 * len(BIASES_BEFORE_BATCH_NORM)  # bias, mean, Adam state
        for key in compared:
            torch.testing.assert_close(actual[key], expected[key], rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL,
                                       msg=key)


def test_diverged_member_stops_alone_with_its_single_trial_cause_and_step(float64_runs):
    summaries, singles = float64_runs["summaries"], float64_runs["singles"]
    exploded = summaries[1]
    assert exploded["divergence_cause"] == "grad_explosion" and exploded["diverged"] == 1
    assert exploded["iteration"] < 200
    assert (exploded["divergence_cause"], exploded["divergence_step"]) == (
        singles[1].reports[-1]["divergence_cause"], singles[1].reports[-1]["divergence_step"])
    for k in (0, 2):
        assert (summaries[k]["iteration"], summaries[k]["diverged"], summaries[k]["done"]) == (200, 0, 1)
    pack_dir = float64_runs["root"] / "pack"
    events = json.loads((pack_dir / "member_1" / "events.json").read_text())
    stop = next(e for e in events if e["action"] == "stop")  # after its start-up spike, a grad_spike event
    assert (stop["cause"], stop["network"]) == ("grad_explosion", "D")
    member_0 = json.loads((pack_dir / "member_0" / "events.json").read_text())
    assert all(e["action"] == "record" for e in member_0)
    assert sorted(p.name for p in (pack_dir / "member_2" / "samples").iterdir()) == [
        "iter_0000100.png", "iter_0000200.png"]
    # the pack reports one member fewer from the logging step at which member 1 stopped
    active = {metrics["iteration"]: metrics["active_members"] for metrics, _ in float64_runs["pack_reports"]}
    assert active[exploded["iteration"]] == 2 and active[200] == 0
    assert all(metrics["pack_size"] == 3 for metrics, _ in float64_runs["pack_reports"])


def test_member_checkpoint_resumes_alone_in_train(float64_runs):
    alone, member = float64_runs["alone"], float64_runs["members"][0]
    assert [r["iteration"] for r in alone.reports] == [125, 150, 175, 200]
    for actual, expected in zip(alone.reports, member.reports[-4:], strict=True):
        # sigma_conv's power iteration starts warm from the previous evaluation's vector, which no checkpoint
        # holds; it stops at a relative change of 1e-4 per 10 steps (diagnostics.ConvOperatorProbe).
        conv = {key for key in expected if key.startswith("sigma_conv/")}
        assert_close_reports({k: v for k, v in actual.items() if k not in conv},
                             {k: v for k, v in expected.items() if k not in conv}, FLOAT64_RTOL)
        for key in conv:
            assert actual[key] == pytest.approx(expected[key], rel=1e-3), key


def test_members_compute_their_first_d_step_as_their_single_trials_in_float32(tmp_path):
    # Only the first D step is compared: from its Adam update on, float32 rounding in near-zero gradient
    # components (different between grouped and plain convolutions, and between CPUs) flips whole ±lr steps,
    # and the float64 tests above check the trajectory. Before it, the two differ by rounding alone.
    configs = [TINY | {"seed": 3, "iterations": 1, "log_every": 1},
               TINY | {"seed": 4, "iterations": 1, "log_every": 1, "d_lr": 1e-3, "beta2": 0.9}]
    members = [Recorder(), Recorder()]
    train_pack(configs, members, workdir=tmp_path / "pack")
    for k, config in enumerate(configs):
        single = Recorder()
        train(config, single, workdir=tmp_path / f"single_{k}")
        (actual,), (expected,) = members[k].reports, single.reports
        d_step = [key for key in expected if key.startswith(("loss_d", "d_real", "d_fake", "grad_norm/D"))]
        assert len(d_step) > 6  # the loss, D's outputs and D's gradient norm, in total and per layer
        for key in d_step:
            assert actual[key] == pytest.approx(expected[key], rel=FLOAT32_RTOL, abs=FLOAT32_RTOL), (k, key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_packs_and_matches_its_single_trials_first_iteration(tmp_path, variant):
    # In float64 (see the module docstring): in float32 the first Adam step already turns rounding noise in
    # near-zero gradient components into full ±lr steps, and loss_g, grad_norm/G and fd_digits come after it.
    # scale differs where the variant takes c; the learned-gamma variants pack with the hinge loss
    scaled = {"scale": 1.3} if variant in SCALED_VARIANTS else {}
    configs = [TINY | {"variant": variant, "loss": "hinge", "iterations": 1, "eval_every": 1, "seed": 0},
               TINY | {"variant": variant, "loss": "hinge", "iterations": 1, "eval_every": 1, "seed": 1,
                       "d_lr": 1e-3} | scaled]
    members = [Recorder(), Recorder()]
    singles = [Recorder(), Recorder()]
    with float64_trials():
        train_pack(configs, members, workdir=tmp_path / "pack")
        for k, config in enumerate(configs):
            train(config, singles[k], workdir=tmp_path / f"single_{k}")
    for member, single in zip(members, singles, strict=True):
        (actual,), (expected,) = member.reports, single.reports
        assert {"loss_g", "grad_norm/G", "fd_digits"} <= expected.keys()
        assert_close_reports(actual, expected, FLOAT64_RTOL)


def test_pack_resumes_exactly_from_its_checkpoint(tmp_path):
    configs = [TINY | {"seed": 5, "checkpoint_every": 20},
               TINY | {"seed": 6, "checkpoint_every": 20, "g_lr": 1e-4}]
    straight = [Recorder(), Recorder()]
    train_pack(configs, straight, workdir=tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def die_after_first_checkpoint(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_pack(configs, [Recorder(), Recorder()], workdir=tmp_path / "resumed",
                   pack_report=die_after_first_checkpoint)
    resumed = [Recorder(), Recorder()]
    train_pack(configs, resumed, workdir=tmp_path / "resumed",
               resume_from=tmp_path / "resumed" / "checkpoint")

    for k in range(2):
        assert [r["iteration"] for r in resumed[k].reports] == [25, 30, 35, 40]
        for actual, expected in zip(resumed[k].reports, straight[k].reports[-4:], strict=True):
            assert_close_reports(actual, expected, rtol=0)  # bitwise: same computation, same order
        expected = tensors_of(checkpoint(tmp_path / "straight" / "checkpoint" / f"member_{k}"))
        actual = tensors_of(checkpoint(tmp_path / "resumed" / "checkpoint" / f"member_{k}"))
        for key, value in expected.items():
            assert torch.equal(actual[key], value), key


def test_finished_pack_resumed_reports_each_result_without_training(tmp_path):
    configs = [TINY | {"seed": 0, "iterations": 5}, TINY | {"seed": 1, "iterations": 5}]
    summaries = train_pack(configs, [Recorder(), Recorder()], workdir=tmp_path)
    again = [Recorder(), Recorder()]
    assert train_pack(configs, again, workdir=tmp_path, resume_from=tmp_path / "checkpoint") == summaries
    assert [r.reports for r in again] == [[s] for s in summaries]


def test_resume_with_reordered_configs_is_refused_naming_member_and_field(tmp_path):
    configs = [TINY | {"seed": 0, "iterations": 2}, TINY | {"seed": 1, "iterations": 2}]
    train_pack(configs, [Recorder(), Recorder()], workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"configs\[0\]: differs from its checkpoint in seed"):
        train_pack(configs[::-1], [Recorder(), Recorder()], workdir=tmp_path,
                   resume_from=tmp_path / "checkpoint")


def test_packed_adam_equals_torch_adam_per_member():
    torch.manual_seed(0)
    hyper = [(1e-3, 0.5, 0.999), (2e-4, 0.0, 0.9), (5e-2, 0.9, 0.99)]
    start = torch.randn(3, 50)
    singles = [torch.nn.Parameter(row.clone()) for row in start]
    optimizers = [torch.optim.Adam([p], lr=lr, betas=(b1, b2))
                  for p, (lr, b1, b2) in zip(singles, hyper, strict=True)]
    packed = start.clone()
    adam = PackedAdam(tuple(packed.shape), lr=[h[0] for h in hyper], beta1=[h[1] for h in hyper],
                      beta2=[h[2] for h in hyper], device=torch.device("cpu"))
    for _ in range(100):
        grads = torch.randn(3, 50) * torch.logspace(-6, 2, 50)  # gradients over eight orders of magnitude
        for p, opt, grad in zip(singles, optimizers, grads, strict=True):
            p.grad = grad.clone()
            opt.step()
        adam.step(packed, grads)
    for k, p in enumerate(singles):
        torch.testing.assert_close(packed[k], p.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(adam.exp_avg_sq[k], optimizers[k].state[p]["exp_avg_sq"], rtol=1e-6,
                                   atol=0)


@pytest.mark.parametrize(("change", "field"), [
    ({"n_dis": 2}, "configs[1].n_dis"),
    ({"variant": "bsn"}, "configs[1].variant"),
    ({"batch_size": 16}, "configs[1].batch_size"),
    ({"iterations": 41}, "configs[1].iterations"),
])
def test_incompatible_member_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        train_pack([TINY, TINY | change], [Recorder(), Recorder()], workdir=tmp_path / "pack")
    assert not (tmp_path / "pack").exists()


def test_unpackable_loss_and_bad_member_config_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"configs\[0\]\.loss: 'wgan_gp'"):
        train_pack([TINY | {"loss": "wgan_gp"}], [Recorder()], workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"configs\[1\]: invalid trial config:\n  n_dis"):
        train_pack([TINY, TINY | {"n_dis": 0}], [Recorder(), Recorder()], workdir=tmp_path)
    with pytest.raises(ValueError, match="reports: need one report callable per config"):
        train_pack([TINY, TINY], [Recorder()], workdir=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_members_compute_their_first_d_step_as_their_single_trials_on_cuda(tmp_path):
    # The first D step only, as in float32 on the CPU; cuDNN's convolutions run in TF32 (10-bit mantissa) and
    # pick different algorithms for grouped and plain convolutions: ten TF32 roundings apart at most.
    configs = [TINY | {"seed": s, "iterations": 1, "log_every": 1, "device": "cuda", "d_lr": lr}
               for s, lr in ((0, 2e-4), (1, 1e-3))]
    members = [Recorder(), Recorder()]
    train_pack(configs, members, workdir=tmp_path / "pack")
    tf32_rtol = 10 * 2.0**-10
    for k, config in enumerate(configs):
        single = Recorder()
        train(config, single, workdir=tmp_path / f"single_{k}")
        (actual,), (expected,) = members[k].reports, single.reports
        for key in ("loss_d", "d_real", "d_fake", "d_real_min", "d_fake_max", "grad_norm/D"):
            assert math.isclose(actual[key], expected[key], rel_tol=tf32_rtol, abs_tol=tf32_rtol), (k, key)
