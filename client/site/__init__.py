"""Everything a hospital does with its own data, kept off the wire.

One job per module:

- `teacher`: whether the teacher is needed, the site's device and CPU
  threads (`site_threads`: the node config's `num-threads`), its build;
- `prepared`: `PreparedSite` (student tensors + teacher features) and the
  handshake's `site_info`;
- `cache`: `SiteCache`, the per-process cache, and `site_cache`, its one
  instance;
- `carry`: the optimiser state a site keeps across rounds;
- `control`: the SCAFFOLD control variate a site keeps across rounds;
- `accountant`: the DP-SGD ledger a site keeps across rounds (privacy.dp_sgd);
- `round`: `train_round` / `evaluate_round` and the per-round helpers;
- `calibration`: the sums a site sends to calibrate the final model.

The ClientApp handlers (client/app.py) look a site up with
`site_cache.site(cfg, node_config)` and call the round functions on it.
"""

from client.site.accountant import load_ledger, save_ledger
from client.site.cache import SiteCache, site_cache
from client.site.calibration import calibration_stats, threshold_stats
from client.site.carry import load_carry, save_carry
from client.site.prepared import PreparedSite, prepare_site, site_info
from client.site.round import (
    evaluate_round,
    hash_name,
    head_stats,
    site_seed,
    train_round,
)
from client.site.teacher import site_device, site_threads, uses_teacher

__all__ = [
    "PreparedSite",
    "SiteCache",
    "calibration_stats",
    "evaluate_round",
    "hash_name",
    "head_stats",
    "load_carry",
    "load_ledger",
    "prepare_site",
    "save_carry",
    "save_ledger",
    "site_cache",
    "site_device",
    "site_info",
    "site_seed",
    "site_threads",
    "threshold_stats",
    "train_round",
    "uses_teacher",
]
