"""Client training and the federated baselines (FedAvg, FedProx, FedBN) plus one-shot training."""

from dmm.federated.client import TrainConfig, train_local
from dmm.federated.rounds import REGIMES, FederatedConfig, FederatedResult, run_federated

__all__ = ["REGIMES", "FederatedConfig", "FederatedResult", "TrainConfig", "run_federated",
           "train_local"]
