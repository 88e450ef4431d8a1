"""Reference values for starling-privacy's distributed discrete Gaussian accountant (shared/privacy/src/ddg.rs).

Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation": n clients each add N_Z(0, s^2) (grid units) to their scaled, stochastically rounded vectors of
L2 norm <= D2 (L1 <= D1); the sum is Renyi-DP at order a with (Proposition 14)
    eps(a) = min( a/2 l2^2 + tau d,  a/2 (l2^2 + 2 l1 tau + tau^2 d),  a/2 (l2 + sqrt(d) tau)^2 ),
    l2 = D2 / (sqrt(n) s),  l1 = D1 / (sqrt(n) s),  tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k+1)),
Poisson subsampling at rate q by Zhu & Wang 2019 (Theorem 5, upper bound), and (eps, delta) by the RDP
conversion dp_accounting uses. This transcribes the published reference (google-research/federated,
distributed_dp/accounting_utils.py: compute_rdp_dgaussian, _compute_rdp_subsampled, ddgauss_epsilon with
rounding inflation at beta = 0) with scipy, and converts with dp_accounting's own function, so the Rust tests
(shared/privacy/tests/ddg_reference.rs) need no Python.
Re-run: pip install scipy dp-accounting; python3 scripts/make_ddg_fixtures.py
"""
import json
import math
import os

import numpy as np
from scipy import special
from dp_accounting.rdp import rdp_privacy_accountant

OUT = os.path.join(os.path.dirname(__file__), "..", "shared", "privacy", "fixtures", "ddg.json")
ORDERS = tuple(range(2, 129)) + (256,)


def log_comb(n, k):
    g = special.gammaln
    return g(n + 1) - g(k + 1) - g(n - k + 1)


def rdp_subsampled(alpha, gamma, eps):
    a = [0, eps(2)]
    b = [((1 - gamma) ** (alpha - 1)) * (alpha * gamma - gamma + 1),
         special.comb(alpha, 2) * (gamma ** 2) * (1 - gamma) ** (alpha - 2)]
    for l in range(3, alpha + 1):
        a.append((l - 1) * eps(l) + log_comb(alpha, l) + (alpha - l) * np.log(1 - gamma) + l * np.log(gamma))
        b.append(3)
    return special.logsumexp(a=a, b=b) / (alpha - 1)


def rdp_dgaussian(q, l1_scale, l2_scale, tau, dim, steps):
    def eps(order):
        t1 = (order / 2.0) * l2_scale ** 2 + tau * dim
        t2 = (order / 2.0) * (l2_scale ** 2 + 2 * l1_scale * tau + tau ** 2 * dim)
        t3 = (order / 2.0) * (l2_scale + np.sqrt(dim) * tau) ** 2
        return min(t1, t2, t3)
    if q == 1:
        rdp = np.array([eps(o) for o in ORDERS])
    else:
        rdp = np.array([min(rdp_subsampled(o, q, eps), eps(o)) for o in ORDERS])
    return rdp * steps


def tau_of(n, s):
    return 10 * sum(math.exp(-2 * (math.pi * s) ** 2 * (k / (k + 1))) for k in range(1, n))


def case(n, s, clip, dim, q, steps, delta):
    """clip: L2 norm bound in grid units before rounding; s: one client's noise stddev in grid units."""
    l2 = clip + math.sqrt(dim)  # rounding inflation at beta = 0: D2 + sqrt(d)
    l1 = l2 * min(math.sqrt(dim), l2)
    tau = tau_of(n, s)
    l1s, l2s = l1 / (math.sqrt(n) * s), l2 / (math.sqrt(n) * s)
    rdp = rdp_dgaussian(q, l1s, l2s, tau, dim, steps)
    eps, order = rdp_privacy_accountant.compute_epsilon(list(ORDERS), rdp, delta)
    return {"clients": n, "local_sigma": s, "clip": clip, "dim": dim, "q": q, "steps": steps,
            "delta": delta, "l2_sensitivity": l2, "l1_sensitivity": l1, "tau": tau,
            "rdp_at": {str(o): float(rdp[ORDERS.index(o)]) for o in (2, 8, 32, 128, 256)},
            "epsilon": float(eps), "order": float(order)}


cases = []
for (n, s, clip, dim, q, steps, delta) in [
    # One round of 100 devices, a 41k-value adapter at 2^10 steps per 0.05 (C = 1 → 20,480 grid units).
    (100, 2000.0, 20480.0, 41_000, 1.0, 1, 1e-5),
    (100, 2000.0, 20480.0, 41_000, 0.34, 12, 1e-5),
    (20, 500.0, 4096.0, 10_000, 0.07, 100, 1e-5),
    (1000, 300.0, 4096.0, 100_000, 0.01, 1000, 1e-6),
    # Small noise shares: tau (the cost of summing discrete Gaussians) is no longer negligible.
    (10, 0.8, 50.0, 16, 1.0, 1, 1e-5),
    (3, 0.6, 20.0, 64, 0.5, 10, 1e-5),
    (1000, 0.7, 20.0, 16, 0.1, 10, 1e-5),
]:
    cases.append(case(n, s, clip, dim, q, steps, delta))

with open(OUT, "w") as f:
    json.dump({"source": "scripts/make_ddg_fixtures.py (KLS 2021 Prop. 14, Zhu-Wang 2019 Thm 5, dp_accounting conversion)",
               "cases": cases}, f, indent=1)
print(json.dumps(cases, indent=1)[:3000])
