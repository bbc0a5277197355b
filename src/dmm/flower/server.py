"""The ServerApp body of `examples/flower` (`flwr run`): federated rounds with `DMMFedAvg`
(BatchNorm statistics pooled), DMM on the server after the last round, the final model saved
as a dmm checkpoint and evaluated on the data set's test split.

Run config keys (`[tool.flwr.app.config]`): those of `dmm.flower.client.RUN_CONFIG_DEFAULTS`
(the data set, split and training), and
- `dmm-preset`: `default` | `paper` | `none` (no DMM; the pooled-BN FedAvg model);
- `dmm-config`: DMMConfig overrides, as a JSON object or the path of a JSON file, e.g.
  `{"inversion": {"n_images": 256}}`;
- `dmm-every`: also run DMM every N rounds (0: after the last round only);
- `pool-bn`: pool BatchNorm statistics (Eq. 3-4) instead of averaging them (default true);
- `out`: the checkpoint to write (default `flower-dmm.safetensors`), with `.json` beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dmm.flower import require_flower

require_flower()

from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from dmm.errors import DMMError  # noqa: E402

log = logging.getLogger(__name__)


def server_main(grid: Grid, context: Context, run_config: dict | None = None) -> dict:
    """Run the federation and DMM; returns the summary it also writes beside the checkpoint."""
    from dmm import checkpoint
    from dmm.evaluate import evaluate
    from dmm.federated import FederatedConfig
    from dmm.flower.client import cached_dataset, task_from_run_config
    from dmm.flower.strategy import DMMFedAvg
    from dmm.io import provenance, write_json
    from dmm.models import create
    from dmm.pipeline import preset, with_overrides
    from dmm.statedict import state_of

    rc = dict(context.run_config if run_config is None else run_config)
    task = task_from_run_config(rc)  # also rejects unknown keys, before any client is asked
    cfg = FederatedConfig.from_dict(task.federated)
    # the data set's description (shape, classes, normalization, test split); a `party`
    # description file holds no sample: then the server sees no data and evaluates nothing
    data = cached_dataset(task.dataset, task.data_root, task.n_train, task.n_test)
    name = str(rc.get("dmm-preset", "default"))
    dmm_cfg = None if name == "none" else preset(name)
    if dmm_cfg is not None and rc.get("dmm-config"):
        raw = str(rc["dmm-config"]).strip()
        try:  # inline JSON, or the path of a JSON file (flwr's --run-config has no nesting)
            overrides = json.loads(raw if raw.startswith("{") else Path(raw).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DMMError(f"run config dmm-config: not JSON nor a JSON file ({e})") from e
        dmm_cfg = with_overrides(dmm_cfg, overrides, "run config dmm-config")
    if dmm_cfg is not None:
        dmm_cfg.seed = cfg.seed
    torch.manual_seed(cfg.seed)
    template = create(task.arch, **task.arch_kwargs)
    strategy = DMMFedAvg(template, regime=cfg.regime, pool_bn=bool(rc.get("pool-bn", True)),
                         dmm=dmm_cfg, dmm_every=int(rc.get("dmm-every", 0)), seed=cfg.seed,
                         fraction_train=cfg.participation, min_available_nodes=task.clients,
                         refine_kwargs={"input_shape": tuple(data.input_shape),
                                        "pixel_range": data.pixel_range})
    strategy.start(grid, ArrayRecord(state_of(template)), num_rounds=cfg.rounds)
    final = strategy.global_state()
    summary = {"run_config": rc, "history": strategy.history, "failures": strategy.failures,
               "dmm": strategy.dmm_reports, "provenance": provenance()}
    if final is not None:
        if len(data.y_test):
            model = create(task.arch, **task.arch_kwargs)
            model.load_state_dict(final)
            ev = evaluate(model, data.x_test, data.y_test, data.normalize,
                          num_classes=data.num_classes)
            summary["accuracy"] = ev.accuracy
        out = str(rc.get("out", "flower-dmm.safetensors"))
        checkpoint.save(out, final, **checkpoint.data_meta(task.arch, task.arch_kwargs, data,
                                                           task.dataset),
                        n_samples=int(sum(strategy.n_samples.values())),
                        regime=f"flower-{cfg.regime}" + ("" if dmm_cfg is None else "+dmm"))
        write_json(Path(out).with_suffix(".json"), summary)
        log.warning("dmm flower: accuracy %s, wrote %s",
                    f"{100 * summary['accuracy']:.2f}%" if "accuracy" in summary else "not "
                    "measured (no test split on the server)", out)
    return summary
