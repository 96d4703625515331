"""Properties of lmcflow.metrics checked against direct numpy formulas."""
import numpy as np
import pandas as pd
import pytest
import torch

from lmcflow.metrics import barrier, barriers, coef_c, cosine, linear_baseline, llfc_batch


def _np_cos(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cosine_matches_numpy(xy, dtype):
    x, y = (t.to(dtype) for t in xy)
    got = cosine(x, y)
    assert got.dtype == torch.float64 and got.shape == (7,)
    np.testing.assert_allclose(got.numpy(), _np_cos(x.float().numpy(), y.float().numpy()),
                               rtol=1e-12, atol=1e-12)


def test_cosine_signed_scale_invariant_and_self(xy):
    x, y = xy
    np.testing.assert_allclose(cosine(x, -x).numpy(), -1.0, atol=1e-12)
    np.testing.assert_allclose(cosine(x, x).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(cosine(3.7 * x, 0.2 * y).numpy(), cosine(x, y).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(cosine(-x, y).numpy(), -cosine(x, y).numpy(), atol=1e-12)


def test_cosine_flattens_trailing_dims():
    x, y = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    np.testing.assert_allclose(cosine(x, y).numpy(), _np_cos(x.reshape(4, -1), y.reshape(4, -1)),
                               rtol=1e-12)


def test_cosine_zero_row_is_nan(xy):
    x, y = xy
    x = x.clone()
    x[2] = 0
    c = cosine(x, y)
    assert torch.isnan(c[2]) and not torch.isnan(c[[0, 1, 3, 4, 5, 6]]).any()
    assert torch.isnan(cosine(y, x)[2])


def test_coef_c_exact_scale_and_formula(xy):
    x, y = xy
    target = x.double()
    np.testing.assert_allclose(coef_c(target / 2.5, target).numpy(), 2.5, rtol=1e-12)
    expect = (x.double() * y.double()).sum(1) / (x.double() ** 2).sum(1)
    got = coef_c(x, y)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expect.numpy(), rtol=1e-12)
    z = x.clone()
    z[0] = 0
    assert torch.isnan(coef_c(z, y)[0]) and not torch.isnan(coef_c(z, y)[1:]).any()


def test_the_official_llfc_coefficient_is_cos_squared_over_c(xy):
    """The official code's coefficient <f_α, t>/‖t‖² (zzp1012/LLFC dissimilarity.py: the
    least-squares k with k·t ≈ f_α) is exactly cos²⟨f_α, t⟩ / c for our c = <f_α, t>/‖f_α‖²
    (c·k = <f_α, t>²/(‖f_α‖²‖t‖²) = cos²), so 1/c only where f_α ∥ t (README: LLFC)."""
    f, noise = (v.double() for v in xy)
    t = 0.8 * f + 0.3 * noise  # a target close to f, as under LLFC
    official = (f * t).sum(1) / (t * t).sum(1)
    c, cos = coef_c(f, t), cosine(f, t)
    np.testing.assert_allclose(official.numpy(), (cos ** 2 / c).numpy(), rtol=1e-12)
    assert (official - 1 / c).abs().min() > 1e-3  # not 1/c: cos < 1 here
    parallel = 3 * t  # f_α ∥ t: cos = 1 and k = 1/c
    k = (parallel * t).sum(1) / (t * t).sum(1)
    np.testing.assert_allclose(k.numpy(), (1 / coef_c(parallel, t)).numpy(), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_llfc_batch_exact_interpolation(xy, alpha):
    fa, fb = xy
    f_alpha = alpha * fa.double() + (1 - alpha) * fb.double()
    out = llfc_batch(fa, fb, f_alpha, alpha)
    np.testing.assert_allclose(out["one_minus_cos_alpha"].numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out["coef_c"].numpy(), 1.0, rtol=1e-12)
    # a pure rescaling of the interpolated features keeps cos = 1 but c = 1/scale
    out2 = llfc_batch(fa, fb, 4.0 * f_alpha, alpha)
    np.testing.assert_allclose(out2["one_minus_cos_alpha"].numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out2["coef_c"].numpy(), 0.25, rtol=1e-12)


def test_llfc_batch_matches_numpy(xy):
    fa, fb = xy
    f_alpha = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    alpha = 0.3
    out = llfc_batch(fa, fb, f_alpha, alpha)
    assert set(out) == {"one_minus_cos_alpha", "one_minus_cos_ab", "coef_c"}
    a, b, f = (t.double().numpy() for t in (fa, fb, f_alpha))
    t = alpha * a + (1 - alpha) * b
    np.testing.assert_allclose(out["one_minus_cos_alpha"].numpy(), 1 - _np_cos(f, t), rtol=1e-10)
    np.testing.assert_allclose(out["one_minus_cos_ab"].numpy(), 1 - _np_cos(a, b), rtol=1e-10)
    np.testing.assert_allclose(out["coef_c"].numpy(), (f * t).sum(1) / (f * f).sum(1), rtol=1e-10)
    for v in out.values():
        assert v.dtype == torch.float64 and v.shape == (7,)


def test_linear_baseline():
    np.testing.assert_allclose(linear_baseline([0, 0.25, 1], 2.0, 6.0), [6.0, 5.0, 2.0])


def test_barrier_hand_example_line_and_order():
    assert barrier([0, 0.5, 1], [1, 3, 2]) == pytest.approx(1.5)
    assert barrier([1, 0, 0.5], [2, 1, 3]) == pytest.approx(1.5)
    grid = np.linspace(0, 1, 11)
    assert barrier(grid, 4 - 3 * grid) == pytest.approx(0.0, abs=1e-12)
    perm = np.random.default_rng(0).permutation(11)
    vals = np.sin(3 * grid) + grid
    assert barrier(grid[perm], vals[perm]) == pytest.approx(barrier(grid, vals))
    # a convex dip: the curve is below the line everywhere inside, the max is at the endpoints
    assert barrier(grid, (grid - 0.5) ** 2) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("grid", [[0, 0.5], [0.5, 1], [0.1, 0.5, 0.9]])
def test_barrier_needs_endpoints(grid):
    with pytest.raises(ValueError):
        barrier(grid, np.zeros(len(grid)))


def test_barriers_two_groups():
    grid = [0.0, 0.5, 1.0]
    rows = []
    for method, mid_loss, mid_err in (("spawning", 3.0, 0.5), ("permutation", 1.5, 0.1)):
        for a, l, e in zip(grid, [1.0, mid_loss, 2.0], [0.1, mid_err, 0.1]):
            rows.append(dict(experiment="mlp", method=method, pair=0, alpha=a, split="test",
                             bn="reset", loss=l, error=e))
    df = pd.DataFrame(rows).sample(frac=1, random_state=0)
    before = df.copy()
    out = barriers(df).set_index("method")
    pd.testing.assert_frame_equal(df, before)
    assert len(out) == 2
    assert set(out.columns) >= {"experiment", "pair", "split", "bn", "loss_barrier", "error_barrier"}
    assert out.loc["spawning", "loss_barrier"] == pytest.approx(1.5)
    assert out.loc["spawning", "error_barrier"] == pytest.approx(0.4)
    assert out.loc["permutation", "loss_barrier"] == pytest.approx(0.0)
    assert out.loc["permutation", "error_barrier"] == pytest.approx(0.0)
