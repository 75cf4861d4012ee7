"""Priors for simulation-based inference: a user's ``torch.distributions.Distribution`` as it is, its box, and
the prior truncated to the highest-probability region of a posterior at one observation.

- :func:`check_prior` refuses what cannot be a prior (no ``sample`` or ``log_prob``).
- :func:`prior_box` finds the box of a uniform prior (torch's ``Uniform``, ``Independent(Uniform)``, sbi's
  ``BoxUniform``), so no posterior mass can leak outside it (``data.bounds``).
- :func:`draw` draws ``n`` parameters as rows (n, D), seeded without touching the caller's random state.
- :class:`TruncatedPrior` is p(θ) restricted to H = {θ : log q(θ | x_o) ≥ τ}, τ the ``quantile`` of log q over
  the posterior's own samples (H holds 1 − quantile of q's mass), drawn exactly by rejection: candidates from
  the prior restricted to the box around H (uniform or truncated-normal directly when the prior factorizes),
  kept when the exact log q(θ | x_o) reaches τ. This is the proposal of truncated sequential NPE (TSNPE,
  Deistler et al. 2022): the posterior under it equals the true one wherever the true one has its mass, so
  pairs of every round train one posterior with the plain loss, no correction term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, Uniform

from flows.errors import FlowsError

__all__ = ["check_prior", "prior_box", "draw", "TruncatedPrior"]


def check_prior(prior: Any) -> None:
    """A clear error unless ``prior`` can ``sample`` and evaluate ``log_prob`` (any torch Distribution can)."""
    missing = [m for m in ("sample", "log_prob") if not callable(getattr(prior, m, None))]
    if missing:
        raise FlowsError(
            f"the prior must be a distribution with sample() and log_prob() (a torch.distributions.Distribution, "
            f"such as sbi's BoxUniform or a MultivariateNormal); {type(prior).__name__} has no {' or '.join(missing)}"
        )


def _base(prior: Any) -> Any:
    while isinstance(prior, Independent):
        prior = prior.base_dist
    return prior


def prior_box(prior: Any, dim: int) -> tuple[Tensor, Tensor] | None:
    """(low, high) of a uniform prior on a box of ``dim`` parameters, else None."""
    base = _base(prior)
    if not isinstance(base, Uniform):
        return None
    low = base.low.detach().float().cpu().reshape(-1).expand(dim).clone()
    high = base.high.detach().float().cpu().reshape(-1).expand(dim).clone()
    return low, high


def _normal(prior: Any, dim: int) -> tuple[Tensor, Tensor] | None:
    """(loc, scale) of a prior that is independent normal in each parameter, else None."""
    base = _base(prior)
    if isinstance(base, Normal):
        loc, scale = base.loc, base.scale
    elif isinstance(prior, MultivariateNormal):
        cov = prior.covariance_matrix
        if not torch.equal(cov, torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))):
            return None
        loc, scale = prior.loc, cov.diagonal(dim1=-2, dim2=-1).sqrt()
    else:
        return None
    return loc.detach().double().cpu().reshape(-1).expand(dim), scale.detach().double().cpu().reshape(-1).expand(dim)


def draw(prior: Distribution, n: int, seed: int) -> Tensor:
    """``n`` parameters from ``prior`` as float32 rows (n, D), seeded by ``seed`` (the global RNG is restored)."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the caller's states come back
        torch.manual_seed(seed)
        theta = prior.sample((n,))
    theta = torch.as_tensor(theta, device="cpu").detach()
    return theta.reshape(n, -1).float()


class TruncatedPrior:
    """The prior restricted to the highest-probability region of ``flow`` at ``x_obs``.

    Args:
        prior: the prior (a torch Distribution).
        flow: a posterior estimate (:class:`flows.Flow` conditional on x).
        x_obs: the observation (one context of the flow).
        quantile: H holds 1 − quantile of the posterior's mass (sbi's TSNPE uses 1e-4 with more samples).
        samples: posterior samples that set τ and the box.
        margin: the box around the samples in H is widened by this share of its width on each side.
        seed: for the posterior samples.
        state: a saved :meth:`state` (``tau``, ``low``, ``high``): nothing is recomputed.
    """

    def __init__(
        self,
        prior: Distribution,
        flow: Any,
        x_obs: Any,
        quantile: float = 1e-3,
        samples: int = 10_000,
        margin: float = 0.25,
        seed: int = 0,
        state: dict[str, Any] | None = None,
    ):
        self.prior, self.flow, self.x_obs = prior, flow, x_obs
        self.dim = flow.dim
        if state is None:
            state = self._fit(quantile, samples, margin, seed)
        self.tau = float(state["tau"])
        self.low = torch.tensor(state["low"], dtype=torch.float64, device="cpu")
        self.high = torch.tensor(state["high"], dtype=torch.float64, device="cpu")
        self.quantile = float(state.get("quantile", quantile))

    def _fit(self, quantile: float, samples: int, margin: float, seed: int) -> dict[str, Any]:
        gen = torch.Generator(self.flow.device).manual_seed(seed)
        theta = self.flow.sample(samples, context=self.x_obs, generator=gen).reshape(samples, -1)
        lq = self.flow.log_prob(theta, context=self.x_obs, generator=gen).cpu()  # seeded (an augmented flow's draws)
        ok = torch.isfinite(lq)
        tau = float(torch.quantile(lq[ok], quantile))
        inside = theta.cpu().double()[ok & (lq >= tau)]
        lo, hi = inside.min(0).values, inside.max(0).values
        pad = (hi - lo) * margin
        lo, hi = lo - pad, hi + pad
        box = prior_box(self.prior, self.dim)
        if box is not None:
            lo, hi = torch.maximum(lo, box[0].double()), torch.minimum(hi, box[1].double())
        return {"tau": tau, "low": lo.tolist(), "high": hi.tolist(), "quantile": quantile}

    def state(self) -> dict[str, Any]:
        """What defines the region (JSON): τ, the box, the quantile."""
        return {"tau": self.tau, "low": self.low.tolist(), "high": self.high.tolist(), "quantile": self.quantile}

    def _candidates(self, n: int, gen: torch.Generator) -> Tensor:
        """Draws of the prior restricted to the box: ``n`` of them, or those of ``n`` prior draws inside it."""
        lo, hi = self.low, self.high
        u = torch.rand(n, self.dim, generator=gen, dtype=torch.float64, device="cpu")
        if prior_box(self.prior, self.dim) is not None:
            return lo + u * (hi - lo)
        normal = _normal(self.prior, self.dim)
        if normal is not None:  # a truncated normal in each parameter, by the inverse CDF
            loc, scale = normal
            a, b = torch.special.ndtr((lo - loc) / scale), torch.special.ndtr((hi - loc) / scale)
            p = (a + u * (b - a)).clamp(1e-300, 1 - 1e-16)
            return loc + scale * torch.special.ndtri(p)
        seed = int(torch.randint(2**62, (1,), generator=gen, device="cpu"))
        theta = draw(self.prior, n, seed).double()
        return theta[((theta > lo) & (theta < hi)).all(1)]

    @torch.no_grad()
    def sample(self, n: int, seed: int, max_candidates: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """``n`` parameters (n, D) float32 from the truncated prior, and what it took (candidates, acceptance)."""
        gen = torch.Generator("cpu").manual_seed(seed)
        cap = max_candidates or max(1_000_000, 1000 * n)
        kept, tried, batch = [], 0, max(2 * n, 256)
        while sum(len(k) for k in kept) < n:
            if tried >= cap:
                got = sum(len(k) for k in kept)
                raise FlowsError(
                    f"the truncated prior accepted {got} of {tried:,} candidates ({n} wanted): the posterior's "
                    "highest-probability region is a tiny part of the prior's box. Use more simulations in the first "
                    "round (fewer rounds), or a larger quantile."
                )
            theta = self._candidates(batch, gen)
            tried += batch
            if not len(theta):
                continue
            lq = self.flow.log_prob(theta.float(), context=self.x_obs, generator=gen).cpu()
            kept.append(theta[torch.isfinite(lq) & (lq >= self.tau)])
            rate = max(sum(len(k) for k in kept) / tried, 1e-4)
            batch = min(max(int(1.2 * (n - sum(len(k) for k in kept)) / rate), 256), 200_000)
        theta = torch.cat(kept)[:n].float()
        return theta, {"candidates": tried, "acceptance": sum(len(k) for k in kept) / tried}
