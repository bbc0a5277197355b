import numpy as np
import pytest
import torch

from conftest import tiny_model
from dmm.bn import aggregate_bn_buffers
from dmm.data import dirichlet_partition
from dmm.federated import FederatedConfig, TrainConfig, run_federated, train_local
from dmm.federated.aggregate import fedavg, fedbn_global
from dmm.federated.rounds import _generator

FAST = dict(local_iters=2, batch_size=16, bf16=False)


def test_fedavg_of_identical_models_is_that_model():
    m = tiny_model()
    m.train()
    m(torch.randn(8, 1, 16, 16))
    s = m.state_dict()
    out = fedavg([s, s, s], [5, 10, 20])
    for k in s:
        assert out[k].dtype == s[k].dtype
        torch.testing.assert_close(out[k], s[k], rtol=0, atol=1e-7)


def test_one_round_with_one_client_equals_local_training(tiny_data):
    part = dirichlet_partition(tiny_data.y_train.numpy(), 1, 0.5, seed=0)
    cfg = FederatedConfig(regime="fedavg", rounds=1, seed=0, train=TrainConfig(**FAST))
    res = run_federated(tiny_model, tiny_data, part, cfg, progress=False)

    torch.manual_seed(0)
    m = tiny_model(seed=0)
    train_local(m, tiny_data.x_train, tiny_data.y_train, tiny_data.normalize, cfg.train,
                generator=_generator(0, 1, 0))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(res.global_state[k], v, rtol=0, atol=1e-6)


def test_federated_runs_are_deterministic_and_regimes_differ(tiny_data):
    part = dirichlet_partition(tiny_data.y_train.numpy(), 3, 0.5, seed=0, min_size=5)
    runs = {}
    for regime in ("fedavg", "fedprox", "fedbn", "oneshot"):
        cfg = FederatedConfig(regime=regime, rounds=2, seed=1,
                              train=TrainConfig(**FAST, prox_mu=0.1 if regime == "fedprox" else 0))
        runs[regime] = run_federated(tiny_model, tiny_data, part, cfg, progress=False)
    again = run_federated(tiny_model, tiny_data, part,
                          FederatedConfig(regime="fedavg", rounds=2, seed=1,
                                          train=TrainConfig(**FAST)), progress=False)
    for k, v in runs["fedavg"].global_state.items():
        assert torch.equal(v, again.global_state[k])
    assert runs["oneshot"].global_state is None and len(runs["oneshot"].client_states) == 3
    w = "conv1.weight"
    assert not torch.equal(runs["fedavg"].global_state[w], runs["fedprox"].global_state[w])
    # FedBN clients keep their own BN layers: they differ between clients after training
    fb = runs["fedbn"]
    assert not torch.equal(fb.client_states[0]["bn1.weight"], fb.client_states[1]["bn1.weight"])


def test_a_given_start_is_every_clients_start(tiny_data):
    """`init_state` (a pretrained W_0) replaces the seeded initialization: it is the init of
    the result, the one-shot clients move away from it, and independent one-shot inits
    cannot share it."""
    from dmm.errors import DMMError

    # Prepare
    part = dirichlet_partition(tiny_data.y_train.numpy(), 3, 0.5, seed=0, min_size=5)
    w0 = tiny_model(9).state_dict()
    # Execute
    res = run_federated(tiny_model, tiny_data, part,
                        FederatedConfig(regime="oneshot", rounds=1, seed=1,
                                        train=TrainConfig(**FAST)),
                        progress=False, init_state=w0)
    # Assert
    assert all(torch.equal(res.init_state[k], w0[k]) for k in w0)
    assert not torch.equal(res.client_states[0]["conv1.weight"], w0["conv1.weight"])
    with pytest.raises(DMMError, match="independent initializations"):
        run_federated(tiny_model, tiny_data, part,
                      FederatedConfig(regime="oneshot", rounds=1, seed=1,
                                      oneshot_init="independent", train=TrainConfig(**FAST)),
                      progress=False, init_state=w0)


def test_fedbn_global_pools_statistics_of_identical_models_to_themselves():
    m = tiny_model()
    m.train()
    m(torch.randn(8, 1, 16, 16))
    s = m.state_dict()
    out = fedbn_global([s, s], [3, 7], m)
    torch.testing.assert_close(out["bn1.running_var"], s["bn1.running_var"])
    assert int(out["bn1.num_batches_tracked"]) == 2 * int(s["bn1.num_batches_tracked"])
    agg = aggregate_bn_buffers([s, s], m)
    torch.testing.assert_close(agg["bn1.running_mean"], s["bn1.running_mean"])
    assert np.isclose(float(agg["bn1.running_var"].sum()), float(s["bn1.running_var"].sum()))


@pytest.mark.parametrize("kw, needle", [
    ({"rounds": 0}, "rounds must be >= 1"), ({"regime": "fedsgd"}, "unknown regime"),
    ({"participation": 1.5}, "participation"), ({"regime": "fedprox"}, "mu > 0"),
    ({"seed": "0"}, "seed must be an integer"),
])
def test_federated_config_rejects_a_bad_setting_when_made(kw, needle):
    from dmm.errors import DMMError
    from dmm.federated import FederatedConfig

    with pytest.raises(DMMError, match=needle):
        FederatedConfig(**kw)
