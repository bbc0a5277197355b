"""Merging methods: invariants on tiny ResNets built here."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from dmm.errors import DMMError
from dmm.merging import available_methods, get_method, merge_states
from dmm.permute import PermutationSpec, apply_permutation, random_permutation, spec_for


def _trained_like(seed: int):
    """A tiny model with non-trivial BN statistics and weights."""
    m = tiny_model(seed)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 16, 16) * (1 + seed))
    return m.eval()


BASE_METHODS = {"average": {}, "task_arithmetic": {}, "ties": {"density": 1.0},
                "rebasin": {}}


def test_registry_lists_methods_with_papers():
    assert set(BASE_METHODS) <= set(available_methods())
    for name in BASE_METHODS:
        m = get_method(name)
        assert m.paper.startswith("https://") and m.bn_handling


def test_permuted_model_gives_identical_outputs():
    m = _trained_like(1)
    spec = spec_for(m)
    perms = random_permutation(spec, m.state_dict(), torch.Generator().manual_seed(0))
    p = tiny_model(2)
    p.load_state_dict(apply_permutation(spec, perms, m.state_dict()))
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(p.eval()(x), m(x), atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in p.state_dict().items())


def test_rebasin_of_model_and_permuted_copy_returns_the_model():
    m = _trained_like(1)
    a = m.state_dict()
    spec = spec_for(m)
    b = apply_permutation(spec, random_permutation(spec, a, torch.Generator().manual_seed(3)), a)
    out = merge_states([a, b], "rebasin", model=m)
    for k, v in a.items():
        if k.endswith("num_batches_tracked"):
            assert int(out[k]) == 2 * int(v)
        else:
            torch.testing.assert_close(out[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(BASE_METHODS))
@pytest.mark.parametrize("k", [1, 3])
def test_identical_models_merge_to_themselves(method, k):
    m = _trained_like(0)
    s = m.state_dict()
    base = tiny_model(7).state_dict()
    out = merge_states([s] * k, method, model=m, base=base, weights=[1.0 + i for i in range(k)],
                       **BASE_METHODS[method])
    for key, v in s.items():
        if key.endswith("num_batches_tracked"):
            assert int(out[key]) == k * int(v)
        else:
            torch.testing.assert_close(out[key], v, atol=1e-6, rtol=0)


def test_ties_density_one_without_conflicts_equals_task_arithmetic():
    m = _trained_like(0)
    base = m.state_dict()
    g = torch.Generator().manual_seed(0)
    direction = {k: torch.rand(v.shape, generator=g) for k, v in base.items()
                 if v.dtype.is_floating_point}
    # all task vectors positive multiples of one direction: no sign conflicts
    states = [{k: (v + c * direction[k] if k in direction else v) for k, v in base.items()}
              for c in (0.1, 0.5, 0.9)]
    w = [1.0, 2.0, 3.0]
    ta = merge_states(states, "task_arithmetic", model=m, base=base, weights=w, scale=0.7)
    ti = merge_states(states, "ties", model=m, base=base, weights=w, scale=0.7, density=1.0)
    for k in ta:
        torch.testing.assert_close(ti[k], ta[k], atol=1e-6, rtol=0)


def test_ties_trims_and_elects_signs():
    from dmm.merging.task_arithmetic import ties_combine, trim_to_density
    t = torch.tensor([1.0, -4.0, 2.0, 0.5])
    assert torch.equal(trim_to_density(t, 0.5), torch.tensor([0.0, -4.0, 2.0, 0.0]))
    out = ties_combine([torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 2.0])], [1, 1], 1.0)
    torch.testing.assert_close(out, torch.tensor([-3.0, 2.0], dtype=torch.float64))


def test_bad_inputs_are_clear_errors():
    m = _trained_like(0)
    s = m.state_dict()
    with pytest.raises(DMMError, match="base model"):
        merge_states([s, s], "task_arithmetic", model=m)
    with pytest.raises(DMMError, match="density"):
        merge_states([s, s], "ties", model=m, base=s, density=1.5)
    other = tiny_model(0, classes=5).state_dict()
    with pytest.raises(DMMError, match="shape"):
        merge_states([s, other], "average", model=m)
    with pytest.raises(DMMError, match="unknown merging method"):
        merge_states([s], "nope", model=m)
    spec = spec_for(m)
    broken = PermutationSpec({k: v for k, v in spec.axes_to_perm.items() if k != "fc.bias"})
    with pytest.raises(DMMError, match="does not fit"):
        broken.check(s)
    bad_axes = dict(spec.axes_to_perm)
    bad_axes["conv1.weight"] = ("P_stem",)
    with pytest.raises(DMMError, match="dimensions"):
        PermutationSpec(bad_axes).check(s)


# ---- PLeaS and CAT ---------------------------------------------------------------------------

X = torch.randn(24, 1, 16, 16, generator=torch.Generator().manual_seed(5))


def test_pleas_on_model_and_permuted_copy_returns_the_model():
    m = _trained_like(1)
    a = m.state_dict()
    spec = spec_for(m)
    b = apply_permutation(spec, random_permutation(spec, a, torch.Generator().manual_seed(4)), a)
    out = merge_states([a, b], "pleas", model=m, inputs=X, ridge=1e-10)
    for k, v in a.items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(out[k], v, atol=1e-4, rtol=1e-4)


def test_pleas_least_squares_lowers_feature_mismatch_against_averaging():
    from dmm.merging.pleas import aligned_states, layer_mismatch
    m = _trained_like(0)
    states = [_trained_like(0).state_dict(), _trained_like(3).state_dict()]
    aligned = aligned_states(states, m, weights=[0.5, 0.5], seed=0)
    avg = merge_states(aligned, "average", model=m)
    ls = merge_states(states, "pleas", model=m, inputs=X, ridge=1e-8)
    e_avg = layer_mismatch(aligned, avg, m, X, [1, 1])
    e_ls = layer_mismatch(aligned, ls, m, X, [1, 1])
    assert sum(e_ls.values()) < 0.5 * sum(e_avg.values())
    assert all(e_ls[n] <= e_avg[n] + 1e-9 for n in e_avg)


def test_pleas_synthesizes_its_own_inputs_when_none_given():
    m = _trained_like(0)
    out = merge_states([m.state_dict(), _trained_like(2).state_dict()], "pleas", model=m,
                       n_inputs=8, input_shape=(1, 16, 16))
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_cat_without_conflict_equals_task_arithmetic():
    m = _trained_like(0)
    base = tiny_model(9).state_dict()
    states = [_trained_like(s).state_dict() for s in (1, 2, 3)]
    ex = [X[:8], X[8:16], X[16:]]
    ta = merge_states(states, "task_arithmetic", model=m, base=base, scale=0.8)
    cat = merge_states(states, "cat", model=m, base=base, scale=0.8, exemplars=ex, lam=1e12,
                       ratio_ln=0, ratio_bias=0)
    for k in ta:
        torch.testing.assert_close(cat[k], ta[k], atol=1e-6, rtol=0)
    trimmed = merge_states(states, "cat", model=m, base=base, scale=0.8, exemplars=ex, lam=0.0)
    assert any(not torch.allclose(trimmed[k], ta[k]) for k in ta)


@pytest.mark.parametrize("method, params", [
    ("pleas", {"inputs": X, "ridge": 1e-10}),
    ("cat", {"exemplars": None}),
])
@pytest.mark.parametrize("k", [1, 3])
def test_feature_methods_return_identical_models(method, params, k):
    m = _trained_like(0)
    s = m.state_dict()
    p = dict(params)
    if method == "cat":
        p["exemplars"] = [X[:8]] * k
    out = merge_states([s] * k, method, model=m, base=tiny_model(7).state_dict(), **p)
    for key, v in s.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(out[key], v, atol=1e-4, rtol=1e-4)


def test_bn_reset_recomputes_statistics_only():
    m = _trained_like(0)
    states = [_trained_like(s).state_dict() for s in (1, 2)]
    plain = merge_states(states, "rebasin", model=m)
    reset = merge_states(states, "rebasin", model=m, bn_reset=True)
    assert torch.equal(reset["conv1.weight"], plain["conv1.weight"])
    assert not torch.allclose(reset["bn1.running_var"], plain["bn1.running_var"])
    assert torch.isfinite(reset["bn1.running_var"]).all()


# ---- the seed and the input shape reach the method (merge_states forwards by signature) ----

def test_rebasin_seed_changes_the_merge_of_independent_models_and_repeats_bitwise():
    # Prepare: three models from independent inits (weight matching has no unique optimum)
    m = _trained_like(0)
    states = [_trained_like(s).state_dict() for s in (3, 4, 5)]
    # Execute
    a0 = merge_states(states, "rebasin", model=m, seed=0)
    a0_again = merge_states(states, "rebasin", model=m, seed=0)
    a1 = merge_states(states, "rebasin", model=m, seed=1)
    # Assert: one seed is bitwise repeatable, another seed gives another merge
    assert all(torch.equal(a0[k], a0_again[k]) for k in a0)
    assert any(not torch.equal(a0[k], a1[k]) for k in a0 if a0[k].is_floating_point())


def test_rebasin_matcher_order_follows_the_seed():
    from dmm.permute import weight_matching

    # Prepare
    m = _trained_like(0)
    spec = spec_for(m)
    a, b = _trained_like(3).state_dict(), _trained_like(4).state_dict()
    # Execute: the matcher visits the permutations in a random order drawn from the generator;
    # one sweep (max_iter=1) from the identity shows the order in its result
    by_seed = {s: weight_matching(spec, a, b, generator=torch.Generator().manual_seed(s),
                                  max_iter=1) for s in range(4)}
    # Assert
    same = all(torch.equal(by_seed[0][n], by_seed[0][n]) for n in by_seed[0])
    assert same and any(not torch.equal(by_seed[0][n], by_seed[s][n])
                        for s in (1, 2, 3) for n in by_seed[0])


def test_merge_states_forwards_seed_and_input_shape_to_a_method_that_declares_them():
    from dmm.merging import MergeMethod, register
    from dmm.merging.average import average_merge
    from dmm.merging.registry import _REGISTRY, method_params

    # Prepare: a method that records what it receives
    seen: dict = {}

    def spy(states, *, weights, model, seed, input_shape, scale=1.0):
        seen.update(seed=seed, input_shape=input_shape, scale=scale)
        return average_merge(states, weights=weights, model=model)

    register(MergeMethod(name="spy", pretty_name="spy", paper="https://example.org",
                         bn_handling="pooled", fn=spy))
    try:
        m = _trained_like(0)
        # Execute
        merge_states([m.state_dict()] * 2, "spy", model=m, seed=11, input_shape=(1, 16, 16),
                     scale=0.5)
        # Assert: provided names are not user parameters; the method got the run's values
        assert method_params(get_method("spy")) == ["scale"]
        assert seen == {"seed": 11, "input_shape": (1, 16, 16), "scale": 0.5}
    finally:
        _REGISTRY.pop("spy", None)


@pytest.mark.parametrize("name", ["bn_reset", "pixel_range"])
def test_register_refuses_a_keyword_that_merge_states_reserves(name):
    from dmm.merging import MergeMethod, register
    from dmm.merging.registry import _REGISTRY

    # Prepare
    ns: dict = {}
    exec(f"def fn(states, *, weights, model, {name}=None):\n    return states[0]", ns)
    # Execute / Assert
    with pytest.raises(DMMError, match=f"{name}.*reserves"):
        register(MergeMethod(name="bad", pretty_name="bad", paper="https://example.org",
                             bn_handling="none", fn=ns["fn"]))
    assert "bad" not in _REGISTRY


def test_builtin_methods_declare_the_seed_they_use():
    from dmm.merging.registry import method_params, provided_params

    # Assert: the stochastic methods take the run's seed, and no method offers it as a param
    for name in ("rebasin", "pleas", "cat"):
        assert "seed" in provided_params(get_method(name))
    for name in ("pleas", "cat"):
        assert "input_shape" in provided_params(get_method(name))
    assert all("seed" not in method_params(get_method(n)) for n in available_methods())


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"scale": 3.0}),
                                           ("ties", {"density": 0.2}), ("cat", {}),
                                           ("average", {})])
def test_task_vectors_are_taken_against_the_start_w0(method, params):
    """Merging the pretrained start W_0 with itself K times returns W_0: every task vector
    W_k - W_0 is zero, whatever the method's coefficient, trimming or projection (the bench's
    rows from W_0 pass W_0 as the base)."""
    # Prepare
    model = tiny_model(3)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    merged = merge_states([w0] * 4, method, model=model, base=w0, weights=[1, 2, 3, 4], seed=0,
                          input_shape=(1, 16, 16), **params)
    # Assert
    for k, v in w0.items():
        if v.is_floating_point():
            assert torch.allclose(merged[k].float(), v.float(), atol=1e-6), k
