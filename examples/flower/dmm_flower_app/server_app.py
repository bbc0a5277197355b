"""ServerApp: FedAvg with BatchNorm statistics pooled, then DMM on the server after the last
round; the final model is saved as a dmm checkpoint (`out`) and evaluated."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dmm.flower.server import server_main

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
