"""dmm on Flower (flwr 1.41, Message API): a strategy that pools BatchNorm statistics and runs
DMM on the server, a ClientApp that trains dmm models on a dmm partition, and the simulation
engine behind `dmm train --engine flower`.

Flower is an optional extra: `pip install 'dmm[flower]'`. Importing `dmm.flower.strategy`,
`.client` or `.simulation` without it raises a one-line DMMError saying so.
"""

from __future__ import annotations

import os

from dmm.errors import DMMError

# Flower and Ray phone home unless told not to; these machines (and many sites) are offline.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "RAY_USAGE_STATS_ENABLED": "0"}


def require_flower() -> None:
    """Set the offline environment and check that flwr is importable."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        raise DMMError("the Flower engine needs flwr: pip install 'dmm[flower]' "
                       f"(flwr[simulation]==1.41.0); import failed: {e}") from None
