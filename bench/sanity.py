"""Sanity checks of a robustness evaluation, each PASS or WARN with the numbers behind it.

A robustness number is only as good as the attack behind it. These are the usual
red flags of a broken evaluation (gradient masking, a weak or buggy attack, a
model that outputs probabilities, non-deterministic outputs):

1. iterative >= single-step: PGD L-inf is at least as strong as FGSM at the same eps;
2. monotone: accuracy does not increase with the budget along every curve;
3. large eps: PGD L-inf with eps = LARGE_EPS (the whole pixel range) drives accuracy to ~0;
4. black-box <= white-box: the Square attack on a backend is not stronger than the
   strongest white-box attack transferred to that backend at the same eps, nor than
   PGD L-inf alone (a gradient-free attack beating PGD is the classic sign of masked
   gradients, even when AutoAttack, which includes Square, already exposes it);
5. logits: outputs are not probabilities (rows in [0, 1] that sum to 1);
6. deterministic: every backend returns identical outputs for the same input twice;
7. within budget: every adversarial image lies in its eps-ball (and the checks above
   are only meaningful if it does).

"Stronger/weaker" allow a tolerance of max(MIN_TOL, 2 / n) in accuracy (two
examples), since PGD's random start moves single examples. Each check is a pure
function of numbers the evaluation measured, so tests can feed it crafted ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LARGE_EPS = 1.0
LARGE_EPS_MAX_ACCURACY = 0.05
MIN_TOL = 0.01
WHITE_BOX_LINF = ("fgsm", "pgd", "autoattack")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "PASS" or "WARN"
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def tolerance(n: int) -> float:
    return max(MIN_TOL, 2.0 / max(n, 1))


def _check(name: str, ok: bool, detail: str) -> Check:
    return Check(name, "PASS" if ok else "WARN", detail)


def iterative_vs_single_step(attacks: dict[str, Any], n: int) -> Check | None:
    if "fgsm" not in attacks or "pgd" not in attacks:
        return None
    fgsm, pgd = attacks["fgsm"]["torch_accuracy"], attacks["pgd"]["torch_accuracy"]
    return _check("iterative >= single-step", pgd <= fgsm + tolerance(n),
                  f"PGD {pgd:.2%} vs FGSM {fgsm:.2%} accuracy at eps {attacks['pgd']['eps']:.4g}")


def monotone_curves(curves: dict[str, Any], n: int) -> list[Check]:
    out = []
    for kind, curve in curves.items():
        acc = curve["accuracy"]
        rises = [(curve["budgets"][i], curve["budgets"][i + 1]) for i in range(len(acc) - 1)
                 if acc[i + 1] > acc[i] + tolerance(n)]
        detail = ", ".join(f"{a:.3g}: {b:.1%}" for a, b in zip(curve["budgets"], acc))
        if rises:
            detail = f"accuracy rises between budgets {rises[0][0]:.3g} and {rises[0][1]:.3g} ({detail})"
        out.append(_check(f"accuracy non-increasing in budget ({kind})", not rises, detail))
    return out


def large_eps(accuracy: float | None) -> Check | None:
    if accuracy is None:
        return None
    return _check("accuracy ~0 at very large eps", accuracy <= LARGE_EPS_MAX_ACCURACY,
                  f"PGD L-inf eps={LARGE_EPS:g}: accuracy {accuracy:.2%} (expected <= {LARGE_EPS_MAX_ACCURACY:.0%}"
                  "; more means masked gradients or a broken attack)")


def blackbox_vs_whitebox(attacks: dict[str, Any], blackbox: dict[str, Any], n: int) -> list[Check]:
    out = []
    white = [a for name, a in attacks.items() if name in WHITE_BOX_LINF]
    for backend, result in blackbox.get("backends", {}).items():
        best = [a["backends"][backend]["accuracy"] for a in white if backend in a["backends"]]
        if not best:
            continue
        strongest = min(best)
        out.append(_check(f"black-box not stronger than white-box ({backend})",
                          result["accuracy"] >= strongest - tolerance(n),
                          f"Square ({blackbox['queries']} queries) {result['accuracy']:.2%} vs strongest "
                          f"white-box {strongest:.2%}"))
        pgd = attacks.get("pgd", {}).get("backends", {}).get(backend)
        if pgd is not None:
            out.append(_check(f"black-box not stronger than PGD ({backend})",
                              result["accuracy"] >= pgd["accuracy"] - tolerance(n),
                              f"Square {result['accuracy']:.2%} vs PGD {pgd['accuracy']:.2%}"
                              + ("" if result["accuracy"] >= pgd["accuracy"] - tolerance(n) else
                                 ": gradient masking suspected, PGD overstates robustness")))
    return out


def logits_not_probabilities(outputs: dict[str, np.ndarray]) -> list[Check]:
    out = []
    for backend, y in outputs.items():
        in_unit = bool(((y >= 0) & (y <= 1)).all())
        sums_to_one = bool(np.allclose(y.sum(axis=1), 1.0, atol=1e-3))
        out.append(_check(f"outputs are logits ({backend})", not (in_unit and sums_to_one),
                          f"min {y.min():.3g}, max {y.max():.3g}, row sums {y.sum(axis=1).min():.3g}.."
                          f"{y.sum(axis=1).max():.3g}"))
    return out


def deterministic(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> list[Check]:
    out = []
    for backend, a in first.items():
        diff = float(np.abs(a - second[backend]).max())
        out.append(_check(f"deterministic outputs ({backend})", diff == 0.0,
                          f"max |run 1 - run 2| = {diff:.3g} over {a.shape[0]} inputs"))
    return out


def within_budget(attacks: dict[str, Any], blackbox: dict[str, Any]) -> Check | None:
    runs = [(name, a["eps"], a["max_perturbation"]) for name, a in attacks.items()]
    runs += [(f"square on {b}", blackbox["eps"], r["max_perturbation"])
             for b, r in blackbox.get("backends", {}).items()]
    if not runs:
        return None
    over = [(name, eps, m) for name, eps, m in runs if m > eps * (1 + 1e-5) + 1e-6]
    detail = ", ".join(f"{name} {m:.4g}/{eps:.4g}" for name, eps, m in (over or runs))
    return _check("adversarial examples within budget", not over,
                  ("over budget: " if over else "max perturbation / eps: ") + detail)


def sanity_checks(result: dict[str, Any], *, large_eps_accuracy: float | None, outputs: dict[str, np.ndarray],
                  repeated: dict[str, np.ndarray]) -> list[Check]:
    """Every check that applies to a robustness result (some need attacks or curves that were not run)."""
    n = result["n"]
    checks = [iterative_vs_single_step(result["attacks"], n), *monotone_curves(result.get("curves", {}), n),
              large_eps(large_eps_accuracy), *blackbox_vs_whitebox(result["attacks"], result.get("blackbox", {}), n),
              *logits_not_probabilities(outputs), *deterministic(outputs, repeated),
              within_budget(result["attacks"], result.get("blackbox", {}))]
    return [c for c in checks if c is not None]
