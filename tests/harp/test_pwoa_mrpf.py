"""PwoA and MRPF: their estimators and allocation rules, then each method end to end on digits."""

import pytest
import torch
import torch.nn.functional as F

from harp.attacks import AttackConfig
from harp.checkpoint import load_checkpoint
from harp.cli import cli, run_cli
from harp.data import dataset_spec
from harp.errors import HarpError
from harp.models import build_model
from harp.pruning.hsic import gaussian_kernel, hsic, hsic_reference, linear_kernel
from harp.pruning.methods import PruneOptions, make_config, prune_checkpoint
from harp.pruning.mrpf import FLOOR_FRACTION, allocate
from harp.pruning.pwoa import PwoAJob, distill_kl, resolve_config
from harp.sparsity import model_sparsity

TINY = PruneOptions(steps=2, subset=200, batch_size=50)


def _direct_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """trace(K H L H) / (n - 1)^2, written out element by element."""
    n = k.shape[0]
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]
    kh = [[sum(float(k[i, a]) * h[a][j] for a in range(n)) for j in range(n)] for i in range(n)]
    lh = [[sum(float(l[i, a]) * h[a][j] for a in range(n)) for j in range(n)] for i in range(n)]
    return sum(kh[i][j] * lh[j][i] for i in range(n) for j in range(n)) / (n - 1) ** 2


@pytest.mark.parametrize("n,sigma", [(6, None), (11, 0.7)])
def test_hsic_equals_the_direct_formula(n, sigma):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (n,), generator=gen), 3).double()
    k_x, k_z, k_y = gaussian_kernel(x, sigma), gaussian_kernel(z, sigma), linear_kernel(y)
    for k, l in ((k_x, k_z), (k_z, k_y)):
        direct = _direct_hsic(k, l)
        assert float(hsic(k, l)) == pytest.approx(direct, rel=1e-9, abs=1e-12)
        assert float(hsic_reference(k, l)) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert float(hsic(k_z, k_z)) > 0
    with pytest.raises(ValueError, match="square"):
        hsic(k_x, k_x[:-1])


def test_distillation_is_zero_iff_student_equals_teacher():
    torch.manual_seed(0)
    logits = 5 * torch.randn(8, 10)
    assert float(distill_kl(logits, logits.clone(), 30.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(logits + 3 * torch.randn(8, 10), logits, 30.0)) > 1e-4
    # the job's student starts as the teacher: the distillation term starts at zero
    model = build_model("small_cnn", dataset_spec("digits")).eval()
    cfg = resolve_config(make_config("pwoa", sparsity=0.9), "digits", None)
    job = PwoAJob(model, AttackConfig(0.1, 0.05, 2), cfg)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert float(distill_kl(job.model(x), job.teacher(x), cfg.distill_temperature)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("admm,retrain,eligible", [(2, 2, [False, False, True, True]), (2, 0, [False, True]),
                                                    (0, 2, [True, True])])
def test_only_retraining_epochs_can_be_kept(admm, retrain, eligible):
    # the last ADMM epoch ends hard-pruned but was never trained under its masks: it had been kept
    # (validation PGD favours the collapsed model) although retraining epochs followed
    cfg = resolve_config(make_config("pwoa", sparsity=0.9, admm_epochs=admm, retrain_epochs=retrain), "digits", None)
    job = PwoAJob(build_model("small_cnn", dataset_spec("digits")), AttackConfig(0.1, 0.05, 2), cfg)
    seen = []
    for epoch in range(admm + retrain):
        job.epoch_end(epoch)
        seen.append(job.eligible())
    assert seen == eligible


@pytest.mark.parametrize("mix_ratio", [0.0, 0.5])
def test_pwoa_hits_the_target_and_counts_adversarial_examples(digits_robust_ckpt, tmp_path, mix_ratio):
    config = make_config("pwoa", sparsity=0.99, admm_epochs=1, retrain_epochs=1, mix_ratio=mix_ratio)
    prune_checkpoint(digits_robust_ckpt, tmp_path / "p", config, TINY, quiet=True)
    ckpt = load_checkpoint(tmp_path / "p")
    assert abs(model_sparsity(ckpt.build_model()) - 0.99) <= 0.001
    pruning = ckpt.meta["pruning"]
    assert pruning["method"] == "pwoa" and pruning["config"]["distill_temperature"] == 30.0
    # 200 examples x 2 epochs in batches of 50, every second batch adversarial: exactly half of them
    assert pruning["adversarial_examples"] == (200 if mix_ratio else 0)
    assert ckpt.meta["history"][-1]["adversarial_examples"] == pruning["adversarial_examples"]
    assert [h["phase"] for h in ckpt.meta["history"]] == ["admm", "retrain"]
    for name, mask in ckpt.masks.items():
        assert (ckpt.state[f"{name}.weight"][~mask] == 0).all()
    assert not any(k.endswith(("admm_u", "admm_z", "mask")) for k in ckpt.state)


def test_mrpf_allocation_is_exact_and_monotone():
    gen = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(7)]
    sens = dict(zip(names, torch.rand(7, generator=gen).tolist(), strict=True))
    ranked = sorted(names, key=sens.get)
    equal = {n: 1000 for n in names}
    for allocation in ("count", "density"):  # equal sizes: both rules are the same, exactly monotone
        counts = allocate(sens, equal, 0.05, 1.0, allocation=allocation)
        assert sum(counts.values()) == 350
        assert all(counts[a] <= counts[b] for a, b in zip(ranked, ranked[1:]))
        assert counts[ranked[-1]] > counts[ranked[0]]
    sizes = {"l0": 288, "l1": 18432, "l2": 73728, "l3": 2560, "l4": 640, "l5": 9000, "l6": 300}
    budget = -(-sum(sizes.values()) // 100)  # keep_count(total, 0.01)
    for temperature in (0.0, 0.5, 1.0, 3.0):
        by_density = allocate(sens, sizes, 0.01, temperature, allocation="density")
        by_count = allocate(sens, sizes, 0.01, temperature, allocation="count")
        for counts in (by_density, by_count):
            assert sum(counts.values()) == budget
            assert all(1 <= counts[n] <= sizes[n] and counts[n] / sizes[n] >= FLOOR_FRACTION * 0.01 - 1 / sizes[n]
                       for n in names)
        dens = {n: by_density[n] / sizes[n] for n in names}
        for a, b in zip(ranked, ranked[1:]):  # fractions monotone up to one weight of rounding
            assert dens[a] <= dens[b] + 1 / sizes[a] + 1 / sizes[b]
        # counts monotone up to rounding among layers neither whole nor held at the floor
        free = [n for n in ranked if by_count[n] < sizes[n] and by_count[n] > FLOOR_FRACTION * 0.01 * sizes[n] + 1]
        assert all(by_count[a] <= by_count[b] + 1 for a, b in zip(free, free[1:]))
    spread = allocate(sens, sizes, 0.01, 3.0, allocation="density")
    assert spread[ranked[-1]] / sizes[ranked[-1]] > 5 * spread[ranked[0]] / sizes[ranked[0]]
    # count: a small layer's share follows its sensitivity, so it is kept far denser than uniform
    small = {"first": 3.0, "big": 1.0}
    counts = allocate(small, {"first": 288, "big": 100_000}, 0.01, 1.0)
    assert counts["first"] == 288 and counts["first"] + counts["big"] == -(-100_288 // 100)
    # temperature 0: equal shares of 255.6 weights; the three extra weights go to the three most
    # sensitive layers (float rounding of dens * numel had given one to the least sensitive)
    sizes = {"a": 288, "b": 18432, "c": 73728, "d": 32768, "e": 2560}
    counts = allocate({"a": 2, "b": 1, "c": 0.5, "d": 0.25, "e": -0.1}, sizes, 0.01, 0.0)
    assert counts == {"a": 256, "b": 256, "c": 256, "d": 255, "e": 255}


@pytest.mark.parametrize("sensitivity", ["prune", "noise"])
def test_mrpf_hits_the_target_and_records_sensitivities(digits_robust_ckpt, tmp_path, sensitivity):
    config = make_config("mrpf", sparsity=0.99, sensitivity=sensitivity, mrs_examples=32)
    prune_checkpoint(digits_robust_ckpt, tmp_path / "m", config, TINY, quiet=True)
    ckpt = load_checkpoint(tmp_path / "m")
    model = ckpt.build_model()
    assert abs(model_sparsity(model) - 0.99) <= 0.001
    mrs = ckpt.meta["pruning"]["mrs"]
    assert mrs["sensitivity"] == sensitivity and mrs["examples"] == 32 and set(mrs["layers"]) == set(ckpt.masks)
    # one PGD run on the 32 examples for the model as it is, one per perturbed layer
    assert ckpt.meta["pruning"]["adversarial_examples"] == 32 * (len(ckpt.masks) + 1)
    for name, mask in ckpt.masks.items():
        assert int(mask.sum()) == mrs["layers"][name]["keep"]
    assert sum(v["keep"] for v in mrs["layers"].values()) == -(-sum(m.numel() for m in ckpt.masks.values()) // 100)
    by_mrs = sorted(mrs["layers"].values(), key=lambda v: v["mrs"])
    # default allocation "count": the most sensitive layer keeps more weights than the least (or is whole)
    assert by_mrs[-1]["keep"] >= by_mrs[0]["keep"] or by_mrs[-1]["density"] == 1.0


def test_pwoa_and_mrpf_checkpoints_export_like_any_other(digits_robust_ckpt, tmp_path):
    from harp.export.exporter import export_checkpoint
    from harp.kernels.runtime import load_runtime

    configs = {"pwoa": make_config("pwoa", sparsity=0.99, admm_epochs=1, retrain_epochs=1),
               "mrpf": make_config("mrpf", sparsity=0.99, mrs_examples=32)}
    for name, config in configs.items():
        prune_checkpoint(digits_robust_ckpt, tmp_path / name, config, TINY, quiet=True)
        manifest = export_checkpoint(tmp_path / name, tmp_path / f"{name}-artifact", n_parity=32, n_adversarial=8)
        assert manifest["parity"]["results"] and all(r["passed"] for r in manifest["parity"]["results"].values())
        x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # digits: 1x8x8 raw pixels
        logits = load_runtime(tmp_path / f"{name}-artifact").run(x.numpy())
        expected = load_checkpoint(tmp_path / name).build_model().eval()(x).detach().numpy()
        assert abs(logits - expected).max() <= 1e-4 * max(1.0, abs(expected).max())


def test_bad_pwoa_and_mrpf_options_are_user_errors(capsys, tmp_path):
    bad = [({"method": "pwoa", "mix_ratio": 1.5}, "--mix-ratio"), ({"method": "pwoa", "projection": "ring"}, "proj"),
           ({"method": "pwoa", "granularity": "channel"}, "single weights"), ({"method": "pwoa", "rho": 0.0}, "--rho"),
           ({"method": "pwoa", "temperature": 2.0}, "do not apply to pwoa"),
           ({"method": "mrpf", "sensitivity": "vibes"}, "unknown sensitivity"),
           ({"method": "mrpf", "temperature": -1.0}, "--temperature"),
           ({"method": "mrpf", "mrs_examples": 1}, "--mrs-examples"),
           ({"method": "mrpf", "allocation": "vibes"}, "unknown allocation"),
           ({"method": "mrpf", "mix_ratio": 0.5}, "do not apply to mrpf"),
           # ignored by the default --sensitivity prune, and recorded as if used
           ({"method": "mrpf", "noise_scale": 5.0}, "--noise-scale applies to --sensitivity noise only"),
           ({"method": "mrpf", "sensitivity": "noise", "noise_scale": 0.0}, "--noise-scale must be > 0"),
           ({"method": "lwm", "lambda_x": 0.1}, "do not apply to lwm")]
    for kw, message in bad:
        with pytest.raises(HarpError, match=message):
            make_config(kw.pop("method"), sparsity=0.9, **kw)
    with pytest.raises(HarpError, match="!= --epochs"):
        resolve_config(make_config("pwoa", sparsity=0.9, admm_epochs=2, retrain_epochs=2), "digits", 3)
    with pytest.raises(HarpError, match="at least 1"):
        resolve_config(make_config("pwoa", sparsity=0.9, admm_epochs=0, retrain_epochs=0), "digits", None)
    assert resolve_config(make_config("pwoa", sparsity=0.9), "digits", 4).admm_epochs == 2
    assert make_config("mrpf", sparsity=0.9, sensitivity="noise").noise_scale == 0.5
    assert make_config("mrpf", sparsity=0.9).noise_scale is None
    for args, message in ((["--method", "pwoa", "--mix-ratio", "2"], "--mix-ratio"),
                          (["--method", "mrpf", "--sensitivity", "vibes"], "Invalid value for '--sensitivity'"),
                          (["--method", "harp", "--temperature", "2"], "do not apply to harp")):
        code = run_cli(cli, ["prune", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
