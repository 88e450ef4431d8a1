"""Reference values for starling-privacy's accountants, from Google's dp-accounting (pip install dp-accounting).

Writes shared/privacy/fixtures/dp_accounting.json: a grid of (q, sigma, steps, delta) with dp_accounting's
RDP epsilon (default orders, add-or-remove-one) and PLD epsilon (PLDAccountant defaults: connect-the-dots,
discretisation 1e-4), raw RDP values at some orders, delta-for-epsilon, a heterogeneous composition and
noise calibrations. The Rust tests (shared/privacy/tests/reference.rs) check against this file, so CI needs no
Python. Re-run: python3 scripts/make_dp_fixtures.py
"""
import json
import os

import dp_accounting
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

OUT = os.path.join(os.path.dirname(__file__), "..", "shared", "privacy", "fixtures", "dp_accounting.json")


def event(q, sigma, steps):
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def rdp_acc(events):
    a = rdp_privacy_accountant.RdpAccountant()
    for e in events:
        a.compose(e)
    return a


def pld_acc(events):
    a = pld_privacy_accountant.PLDAccountant()
    for e in events:
        a.compose(e)
    return a


grid = []
for q in [0.001, 0.01, 0.1, 1.0]:
    for sigma in [0.8, 1.1, 2.0, 5.0]:
        for steps in [10, 1000]:
            for delta in [1e-5]:
                ev = [event(q, sigma, steps)]
                grid.append({
                    "q": q, "sigma": sigma, "steps": steps, "delta": delta,
                    "rdp_epsilon": rdp_acc(ev).get_epsilon(delta),
                    "pld_epsilon": pld_acc(ev).get_epsilon(delta),
                })
# A long run and a different delta.
for (q, sigma, steps, delta) in [(0.004, 1.0, 10000, 1e-6), (0.05, 0.7, 300, 1e-7)]:
    ev = [event(q, sigma, steps)]
    grid.append({"q": q, "sigma": sigma, "steps": steps, "delta": delta,
                 "rdp_epsilon": rdp_acc(ev).get_epsilon(delta),
                 "pld_epsilon": pld_acc(ev).get_epsilon(delta)})

orders = [1.5, 2.0, 3.25, 8.0, 32.0, 128.0]
raw_rdp = []
for (q, sigma) in [(0.01, 1.0), (0.1, 2.0), (0.5, 0.9)]:
    raw_rdp.append({"q": q, "sigma": sigma, "orders": orders,
                    "rdp": list(rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders))})

deltas = []
for (q, sigma, steps, eps) in [(0.01, 1.1, 1000, 1.0), (0.1, 2.0, 100, 2.0)]:
    ev = [event(q, sigma, steps)]
    deltas.append({"q": q, "sigma": sigma, "steps": steps, "epsilon": eps,
                   "rdp_delta": rdp_acc(ev).get_delta(eps), "pld_delta": pld_acc(ev).get_delta(eps)})

hetero_events = [(0.01, 1.0, 200), (0.02, 1.5, 300), (1.0, 8.0, 5)]
ev = [event(*e) for e in hetero_events]
hetero = {"events": hetero_events, "delta": 1e-5,
          "rdp_epsilon": rdp_acc(ev).get_epsilon(1e-5), "pld_epsilon": pld_acc(ev).get_epsilon(1e-5)}

calib = []
for (eps, delta, q, steps) in [(1.0, 1e-5, 0.01, 1000), (8.0, 1e-5, 0.05, 500)]:
    for name, make in [("rdp", rdp_privacy_accountant.RdpAccountant), ("pld", pld_privacy_accountant.PLDAccountant)]:
        sigma = mechanism_calibration.calibrate_dp_mechanism(
            make, lambda s: event(q, s, steps), eps, delta,
            mechanism_calibration.LowerEndpointAndGuess(0.1, 1.0), tol=1e-5)
        calib.append({"accountant": name, "epsilon": eps, "delta": delta, "q": q, "steps": steps, "sigma": sigma})

with open(OUT, "w") as f:
    json.dump({"dp_accounting_version": dp_accounting.__version__ if hasattr(dp_accounting, "__version__") else "0.6.0",
               "grid": grid, "raw_rdp": raw_rdp, "deltas": deltas, "heterogeneous": hetero,
               "calibration": calib}, f, indent=1)
print("wrote", OUT, len(grid), "grid points")
