"""The site's per-process cache: what a ClientApp process keeps between messages.

Flower builds the ClientApp once per process (a Ray actor, the in-process
engine, a SuperNode's app process) and every message of every run that
process serves goes through `site_cache`, the one `SiteCache` instance here. It
holds derived, read-only values only (parsed configs, the decoded dataset,
the frozen teacher, prepared sites): dropping any entry and rebuilding it
gives identical values, so the cache never changes a result. State that must
persist on a site across rounds (its local head, its own model, its
optimiser state) lives in Flower's `context.state`, never here.

Each kind of entry is bounded; when a kind is full, its least recently used
entry is dropped (the harness runs many experiments in one process).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

from client.site.prepared import PreparedSite, prepare_site
from client.site.teacher import build_teacher, site_device
from common.config import ExperimentConfig, config_from_yaml_text
from common.data.experiment import base_image_size, dataset_for
from common.data.types import Dataset
from common.models.teacher import FrozenTeacher

V = TypeVar("V")


class _Lru(Generic[V]):
    """A bounded memo: the least recently used entry goes first when full.

    Written by hand (an OrderedDict) because `functools.lru_cache` memoises a
    module-level function; these entries belong to the `SiteCache` holding
    them, which tests and the harness clear as one.
    """

    def __init__(self, kind: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"SiteCache({kind}={size}): a size must be >= 1")
        self.size = size
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The entry for `key`, built (and the oldest dropped when full) on a miss."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = build()
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()


class SiteCache:
    """Per-process memo of configs, datasets, teachers and prepared sites.

    Sizes are per kind (least recently used dropped first when full): a few
    configs and datasets, two teachers (they are the largest), and up to 256
    prepared sites (one per simulated node and experiment).
    """

    def __init__(
        self, configs: int = 8, datasets: int = 4, teachers: int = 2, sites: int = 256
    ) -> None:
        self._configs: _Lru[ExperimentConfig] = _Lru("configs", configs)
        self._datasets: _Lru[Dataset] = _Lru("datasets", datasets)
        self._teachers: _Lru[FrozenTeacher] = _Lru("teachers", teachers)
        self._sites: _Lru[PreparedSite] = _Lru("sites", sites)

    def config(self, text: str) -> ExperimentConfig:
        """The experiment config parsed from the server's YAML text."""
        return self._configs.get(text, lambda: config_from_yaml_text(text))

    def dataset(self, cfg: ExperimentConfig) -> Dataset:
        """The experiment's whole dataset, decoded once (`dataset_for`)."""
        d = cfg.data
        key = (
            d.source,
            base_image_size(cfg),
            d.cache_dir,
            cfg.train.seed,
            d.val_fraction,
            d.test_fraction,
        )
        return self._datasets.get(key, lambda: dataset_for(cfg))

    def teacher(self, cfg: ExperimentConfig) -> FrozenTeacher:
        """The frozen teacher of `cfg.teacher` on this process's device."""
        t, device = cfg.teacher, site_device(cfg)
        key = (t.arch, t.weights, t.image_size, str(device))
        return self._teachers.get(key, lambda: build_teacher(cfg, device))

    def site(
        self, cfg: ExperimentConfig, node_config: Mapping[str, Any]
    ) -> PreparedSite:
        """The prepared site for (experiment, node), built once per process."""
        key = (cfg.to_yaml(), repr(sorted(dict(node_config).items())))
        return self._sites.get(
            key,
            lambda: prepare_site(
                cfg, node_config, self.dataset, lambda: self.teacher(cfg)
            ),
        )

    def sizes(self) -> dict[str, int]:
        """How many entries of each kind are held now."""
        return {
            "configs": len(self._configs),
            "datasets": len(self._datasets),
            "teachers": len(self._teachers),
            "sites": len(self._sites),
        }

    def clear(self) -> None:
        """Forget everything, as a fresh process would (tests, harness)."""
        for memo in (self._configs, self._datasets, self._teachers, self._sites):
            memo.clear()


site_cache = SiteCache()
"""The per-process cache every ClientApp handler goes through."""
