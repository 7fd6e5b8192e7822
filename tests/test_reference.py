"""The reference is the spec: check it against independent float64 formulas."""
import math

import torch

from gradstats.core.reference import ref_grad_stats, rel_err

from conftest import make_grads


def test_reference_matches_flat_formula():
    gs = make_grads([(3, 4), (7,), (0,), (2, 3, 5)], seed=1)
    flat = torch.cat([g.double().reshape(-1) for g in gs])
    for p in (1.0, 2.0, 3.0, math.inf):
        r = ref_grad_stats([gs], p)
        assert rel_err(r.norm, torch.linalg.vector_norm(flat, p).reshape(1)) < 1e-12
        assert rel_err(r.total_norm, torch.linalg.vector_norm(flat, p)) < 1e-12
    r = ref_grad_stats([gs[:2], gs[2:]])
    assert r.numel.tolist() == [19, 30]
    assert r.nonfinite.tolist() == [0, 0]
    assert float(r.max_abs[0]) == float(flat[:19].abs().max())


def test_reference_nonfinite_rules():
    a = torch.tensor([1.0, -3.0, float("inf")])
    b = torch.tensor([float("nan"), 2.0, -float("inf")])
    c = torch.tensor([-5.0, 0.5])
    r = ref_grad_stats([[a], [b], [c], []])
    assert math.isinf(r.norm[0]) and math.isnan(r.norm[1]) and r.norm[2] == math.hypot(5, .5)
    assert r.norm[3] == 0 and r.max_abs[3] == 0 and r.numel[3] == 0
    assert r.max_abs.tolist()[:3] == [3.0, 2.0, 5.0]
    assert r.nonfinite.tolist() == [1, 2, 0, 0]
    assert math.isnan(r.total_norm)
