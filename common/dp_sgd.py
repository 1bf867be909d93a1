"""Per-patient DP-SGD at a site: Poisson batches, Opacus' per-image clipping and
noise, and the accountant's ledger.

Opacus does the differential-privacy work: `GradSampleModule` computes each
image's own gradient (hooks on the layers), `DPOptimizer` clips each to
`max_grad_norm` C, sums them, adds Gaussian noise of std z*C and divides by the
expected batch size, and its `RDPAccountant` / `PRVAccountant` turns the steps
into (epsilon, delta). What is written here is what Opacus' `PrivacyEngine`
would do with a DataLoader, for tensors that are already on the device:

- **Poisson sampling**, the sampling the accountant assumes: in every step each
  usable training image joins the batch independently with probability
  q = batch_size / N (N = the site's usable images). Batch sizes vary and can
  be 0; every step runs, so the number of steps is fixed in advance
  (`train.local_steps`, else local_epochs * ceil(N / batch_size)).
- **Secret randomness.** Amplification by subsampling needs a sample nobody
  else can reproduce, and the noise must be unknown. Both come from a generator
  seeded from the operating system (`secrets`), never from `train.seed`, which
  is in the config and the model card. DP-SGD runs are therefore not
  bit-for-bit repeatable. The noise uses Opacus' `secure_mode` sampling (a
  defence against floating-point attacks on the Gaussian).
- **A ledger** of (round, z, q, steps) rows, one per local training, that the
  site keeps across rounds (`client.site.accountant`); epsilon is the
  accountant's over every row.

The unit of privacy is one training image (its fixed augmented views are one
item). Each item's loss depends only on that item, the received model and the
frozen teacher's features of that item; `common.config.validate` refuses the
settings that would make it depend on other patients (docs/security.md).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from common.config import PrivacyConfig
from common.errors import ModelError

log = logging.getLogger(__name__)

NEIGHBOURING = "add-or-remove-one-training-image"
SAMPLING = "Poisson, rate q = batch_size / usable images, secret (OS entropy)"


@dataclass(frozen=True)
class DPSGD:
    """The DP-SGD settings of a site's local training."""

    noise_multiplier: float  # z: noise std over the clipping norm
    max_grad_norm: float  # C: each image's gradient is clipped to this L2 norm
    delta: float  # delta at which epsilon is reported
    accountant: str = "rdp"  # rdp | prv (Opacus' accountants)
    # None: the sample and the noise are seeded from the OS (always, at a site);
    # tests set it to make a run repeatable
    seed: int | None = None

    @classmethod
    def from_config(cls, p: PrivacyConfig) -> DPSGD | None:
        """The settings of `privacy.dp_sgd_*`, or None when DP-SGD is off."""
        if not p.dp_sgd:
            return None
        return cls(
            p.dp_sgd_noise_multiplier,
            p.dp_sgd_max_grad_norm,
            p.dp_sgd_delta,
            p.dp_sgd_accountant,
        )


@dataclass
class Ledger:
    """Every DP-SGD local training a site ran in this run: (round, z, q, steps)."""

    rows: list[tuple[int, float, float, int]] = field(default_factory=list)
    round: int = 0  # the round the next row is recorded under

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record one local training of `steps` steps at rate q with multiplier z."""
        self.rows.append(
            (self.round, float(noise_multiplier), float(sample_rate), int(steps))
        )

    @property
    def steps(self) -> int:
        """Steps over all rows (all rounds the site trained in)."""
        return sum(r[3] for r in self.rows)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon at `delta` of every step in the ledger, from Opacus' accountant."""
        return epsilon(
            [(z, q, steps) for _, z, q, steps in self.rows], delta, accountant
        )


def epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of Poisson-sampled Gaussian steps [(z, q, steps)], Opacus' accountant."""
    from opacus.accountants import create_accountant

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    # Opacus' accountants keep exactly this list ((z, q, steps) per setting) and
    # compose it when asked; it is what `acc.step()` would have built.
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The noise multiplier that spends `target_epsilon` in `steps` steps at rate q."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def sample_rate(usable: int, batch_size: int) -> float:
    """q: the chance that one image joins one step's batch."""
    return min(1.0, batch_size / max(usable, 1))


def planned_steps(usable: int, batch_size: int, epochs: int, local_steps: int) -> int:
    """Steps of one local training: local_steps, else epochs of N / batch_size."""
    if local_steps > 0:
        return local_steps
    return epochs * math.ceil(usable / batch_size)


def poisson_batches(
    pool: torch.Tensor, q: float, steps: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of `pool`, each item in each independently with chance q."""
    for _ in range(steps):
        yield pool[torch.rand(len(pool), generator=gen) < q]


def secret_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device`, seeded from the OS unless a (test) seed is given."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def check_model(model: nn.Module, arch: str | None = None) -> None:
    """Raise ModelError naming the layers Opacus cannot train image by image."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    kinds = sorted({type(e).__name__ for e in errors})
    first = str(errors[0]).split(".")[0]
    what = f"student.arch={arch}" if arch else f"the student ({type(model).__name__})"
    raise ModelError(
        f"{what} cannot train with privacy.dp_sgd: {len(errors)} "
        f"layer(s) fail Opacus' check ({', '.join(kinds)}: {first}); use "
        "fedkd_cnn_small or fedkd_cnn_tiny (GroupNorm)"
    )


class PrivateSteps:
    """Opacus' per-image clipping and noise around a model and its optimiser.

    Used as a context manager: on entry the modules' layers get Opacus' hooks
    (`GradSampleModule`) and `optimizer` is wrapped in a `DPOptimizer`; on exit
    the hooks are removed, so the modules are plain again. The modules are
    called as usual in between; their layers record each image's gradient.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        dp: DPSGD,
        expected_batch_size: int,
        device: torch.device,
    ) -> None:
        self.modules = nn.ModuleList(modules)
        self.optimizer = optimizer
        self.dp = dp
        self.expected_batch_size = expected_batch_size
        self.noise_gen = secret_generator(
            None if dp.seed is None else dp.seed + 1, device
        )
        self._inplace: list[nn.Module] = []
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> PrivateSteps:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self._warnings.__enter__()
        # torch's note that the first layer's hook sees no input gradient (the
        # images need none); Opacus reads that layer's output gradient instead
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )

        # In-place activations (ReLU(inplace=True)) overwrite the output a
        # layer's backward hook needs; Opacus refuses them at the first step.
        # Turning them off changes memory only, never a value.
        for m in self.modules.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
                self._inplace.append(m)
        # loss_reduction="mean": our losses are means over the batch, so Opacus
        # multiplies by the batch size to get each image's own gradient.
        self.gsm = GradSampleModule(self.modules, loss_reduction="mean")
        self.dp_optimizer = DPOptimizer(
            self.optimizer,
            noise_multiplier=self.dp.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self.noise_gen,
            secure_mode=True,
        )
        return self

    def zero_grad(self) -> None:
        """Clear gradients and per-image gradients."""
        self.dp_optimizer.zero_grad(set_to_none=True)

    def empty_batch(self) -> None:
        """A step whose batch drew no image: no gradient, only the noise."""
        for p in self.dp_optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def step(self, public_grad: Callable[[], None] | None = None) -> None:
        """Clip each image's gradient, sum, add noise, scale; then step.

        `public_grad` adds the gradient of a term that depends on no training
        image (FedProx's proximal term) after the noise; Opacus would drop it,
        since it builds the step from the per-image gradients only.
        """
        if self.dp_optimizer.pre_step():  # clip, sum, noise, / expected batch
            if public_grad is not None:
                public_grad()
            self.dp_optimizer.original_optimizer.step()

    def __exit__(self, *exc) -> None:
        self.gsm.cleanup()  # removes the hooks and Opacus' attributes
        for p in self.dp_optimizer.params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        for m in self._inplace:
            m.inplace = True
        self._warnings.__exit__(*exc)


__all__ = [
    "DPSGD",
    "NEIGHBOURING",
    "SAMPLING",
    "Ledger",
    "PrivateSteps",
    "check_model",
    "epsilon",
    "noise_for_epsilon",
    "planned_steps",
    "poisson_batches",
    "sample_rate",
    "secret_generator",
]
