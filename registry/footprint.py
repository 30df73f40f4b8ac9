"""What loads really took, and what admission books: a model's effective VRAM per GPU product.

A model's footprint is learned from its instances: each gives one sample, what its load took,
kept per (model, GPU product). `observed` is the p95 of the recent samples once there are at
least `min_samples`; the effective size is the declared one, the observed one, or the larger of
the two (the default, so a declared size stays a floor), as `source` says. Under `observed`, a
learned size never takes the effective one below `declared x (1 - max_shrink)`: samples can be
wrong, and a size too small is the promise that ends in an out-of-memory error.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from gpu import GpuDevice
from registry.model import CatalogModel

RECENT_SAMPLES = 20  # observed is the p95 of this many newest samples
DEFAULT_MAX_SHRINK = 0.5
# A learned size this far below the declared one is told to operators: a catalog that books
# too much wastes GPUs, and samples that small may also be wrong.
BELOW_DECLARED = 0.7


class VramSource(enum.StrEnum):
    MAX = "max"
    DECLARED = "declared"
    OBSERVED = "observed"


def product(device: GpuDevice) -> str:
    """The GPU product a device belongs to: a MIG slice counts as its parent's product."""
    return product_of(device.name)


def product_of(device_name: str) -> str:
    """The GPU product of a device by its name (`H200 MIG 3` is an `H200`)."""
    return device_name.partition(" MIG ")[0]


@dataclass(frozen=True, slots=True)
class Observed:
    p95_mib: int | None  # None: no footprint sample (only load times)
    recent: int  # samples the p95 is taken over (at most RECENT_SAMPLES)
    reload_s: float | None = None  # the median of the newest load times, once there are some


# Without a load time learned, a load is estimated at this many seconds per GiB it books.
ESTIMATED_S_PER_GIB = 1.0


def reload_estimate(effective_mib: int) -> float:
    return round(effective_mib / 1024 * ESTIMATED_S_PER_GIB, 3)


def shrink_floor(declared_mib: int, max_shrink: float) -> int:
    """The least a model may book under `observed`: its declared size less `max_shrink`."""
    return math.ceil(declared_mib * (1 - max_shrink))


@dataclass
class Footprints:
    source: VramSource = VramSource.MAX
    min_samples: int = 3
    max_shrink: float = DEFAULT_MAX_SHRINK
    _by_model: dict[str, dict[str, Observed]] = field(default_factory=dict)

    def set_model(self, name: str, by_product: dict[str, Observed]) -> bool:
        """Take a model's observations; True when that changed anything."""
        if self._by_model.get(name, {}) == by_product:
            return False
        if by_product:
            self._by_model[name] = dict(by_product)
        else:
            self._by_model.pop(name, None)
        return True

    def observed(self, name: str, gpu_product: str) -> int | None:
        """The learned size on this product, once there are enough samples."""
        found = self._by_model.get(name, {}).get(gpu_product)
        if found is None or found.p95_mib is None or found.recent < self.min_samples:
            return None
        return found.p95_mib

    def reload_s(self, name: str, gpu_product: str) -> float | None:
        """How long its loads took on this product (median of the newest), once any did."""
        found = self._by_model.get(name, {}).get(gpu_product)
        return None if found is None else found.reload_s

    def effective_under(
        self,
        model: CatalogModel,
        gpu_product: str,
        source: VramSource,
        min_samples: int,
        max_shrink: float = DEFAULT_MAX_SHRINK,
    ) -> int:
        """What another host, with its own policy, books for `model` on `gpu_product`."""
        if source is VramSource.DECLARED or not model.learn:
            return model.vram
        found = self._by_model.get(model.name, {}).get(gpu_product)
        if found is None or found.p95_mib is None or found.recent < min_samples:
            return model.vram
        if source is VramSource.OBSERVED:
            return max(found.p95_mib, shrink_floor(model.vram, max_shrink))
        return max(model.vram, found.p95_mib)

    def effective(self, model: CatalogModel, gpu_product: str) -> int:
        """What admission books for `model` on a device of `gpu_product`. A model that does
        not learn (a server that preallocates most of a GPU) books what it declares."""
        return self.effective_under(
            model, gpu_product, self.source, self.min_samples, self.max_shrink
        )

    def below_declared(self, model: CatalogModel, gpu_product: str) -> bool:
        """Whether what its loads take is more than 30% below what the model declares."""
        observed = self.observed(model.name, gpu_product)
        return observed is not None and observed < BELOW_DECLARED * model.vram

    def learned(self, model: CatalogModel) -> bool:
        """Whether the model's effective size may differ from its declared one somewhere."""
        if self.source is VramSource.DECLARED or not model.learn:
            return False
        observed = self._by_model.get(model.name, {}).values()
        return any(o.p95_mib is not None and o.recent >= self.min_samples for o in observed)

    def models(self) -> list[str]:
        return list(self._by_model)

    def of_model(self, name: str) -> dict[str, Observed]:
        return dict(self._by_model.get(name, {}))
