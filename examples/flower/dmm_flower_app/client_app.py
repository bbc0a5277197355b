"""ClientApp: each SuperNode trains a dmm model on its Dirichlet partition of the data set; the
data set, split and training come from the run config (`[tool.flwr.app.config]`)."""

from dmm.flower.client import make_client_app

app = make_client_app()
