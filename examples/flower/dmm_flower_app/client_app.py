"""ClientApp: each SuperNode trains a dmm model on its Dirichlet partition of the data set."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dmm.flower.client import handle_query, handle_train, task_from_run_config

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(task_from_run_config(context.run_config), msg, context)
