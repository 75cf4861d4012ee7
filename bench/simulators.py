"""Simulators, priors and reference posteriors for the posterior-estimation benchmark (bench/posterior.py).

Four tasks as sbibm defines them (Lueckmann et al. 2021), written here in numpy with explicit generators:

- two_moons: θ ~ U(-1, 1)²; a ~ U(-π/2, π/2), r ~ N(0.1, 0.01²), p = (r cos a + 0.25, r sin a),
  x = p + (-|θ1 + θ2| / √2, (θ2 - θ1) / √2). Bimodal, crescent-shaped posterior. Reference, exact: draw the
  noise p, solve x - p = g(θ) for θ (two preimages when the first coordinate is ≤ 0, one picked at random; none
  otherwise), keep the solutions inside the prior box.
- gaussian_linear: θ ~ N(0, 0.1 I₁₀), x | θ ~ N(θ, 0.1 I₁₀). Reference: the closed-form Gaussian posterior.
- slcp: θ ~ U(-3, 3)⁵; x = 4 iid 2-D Gaussian draws with mean (θ1, θ2), standard deviations θ3², θ4², correlation
  tanh(θ5) (1e-6 added to the variances, as sbibm does); x is the 4 draws flattened (8-D). The likelihood is closed
  form and symmetric under θ3 → -θ3 and θ4 → -θ4: four modes. Reference: sequential Monte Carlo, likelihood
  tempered from the prior to the posterior (adaptive temperatures at half effective sample size, resampling,
  Metropolis moves oriented per mode, then two exact kernels: the mean redrawn from its Gaussian conditional and
  fair sign flips of θ3, θ4), 10,000 particles. Without the sign flips, tempering alone lets the modes' masses
  drift (up to 0.72/0.09/0.11/0.09 on spiked posteriors); with them, on the benchmark's 10 observations, C2ST
  against an independent sampler (the mean integrated out in closed form, SIR over θ3..θ5) is 0.49-0.53, as
  between two reference draws (0.48-0.52).
- gaussian_mixture: θ ~ U(-10, 10)², x | θ ~ 0.5 N(θ, I) + 0.5 N(θ, 0.01 I). Reference, exact: the posterior is
  that mixture centred at x, truncated to the box: rejection from the untruncated mixture.

``c2st`` is sbibm's classifier two-sample test (an MLP, 5-fold cross-validated accuracy; 0.5 = indistinguishable).

    python bench/simulators.py                         # the reference sanity checks (~15 min, one thread)
    python bench/simulators.py --tasks slcp --observations 3
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray
Generator = np.random.Generator


@dataclass(frozen=True)
class Task:
    """A simulation-based inference task: prior, simulator, reference posterior sampler.

    ``bounds`` is the box of a uniform prior ([lo, hi] per parameter) or None; ``gaussian_prior`` is (mean,
    variance) of an isotropic normal prior or None. ``reference(x_obs, n, rng)`` samples the posterior of one
    observation ``x_obs`` of shape (x_dim,). ``context_shape`` is (M, d) when x is M i.i.d. trials of d numbers
    (stored flattened, x_dim = M d), else None."""

    name: str
    theta_dim: int
    x_dim: int
    bounds: list[list[float]] | None
    prior: Callable[[int, Generator], Array]
    simulate: Callable[[Array, Generator], Array]
    reference: Callable[[Array, int, Generator], Array]
    gaussian_prior: tuple[float, float] | None = None
    context_shape: tuple[int, int] | None = None


# ------------------------------------------------------------------ helpers
def _box_prior(lo: float, hi: float, dim: int) -> Callable[[int, Generator], Array]:
    return lambda n, rng: rng.uniform(lo, hi, size=(n, dim))


def _in_box(theta: Array, lo: float, hi: float) -> Array:
    return np.all((theta >= lo) & (theta <= hi), axis=1)


def _rejection(propose: Callable[[int], Array], n: int) -> Array:
    """n rows from ``propose(m)``, which returns m candidates of which the rejected ones are NaN rows."""
    kept, total, batch = [], 0, max(2 * n, 1000)
    while total < n:
        cand = propose(batch)
        cand = cand[~np.isnan(cand).any(axis=1)]
        kept.append(cand)
        total += len(cand)
        if len(cand) < batch // 10:  # low acceptance: bigger batches
            batch = min(batch * 4, 4_000_000)
    return np.concatenate(kept)[:n]


# ------------------------------------------------------------------ two moons
def _moon_noise(n: int, rng: Generator) -> Array:
    a = rng.uniform(-math.pi / 2, math.pi / 2, size=n)
    r = rng.normal(0.1, 0.01, size=n)
    return np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], axis=1)


def two_moons_simulate(theta: Array, rng: Generator) -> Array:
    shift = np.stack([-np.abs(theta[:, 0] + theta[:, 1]), theta[:, 1] - theta[:, 0]], axis=1) / math.sqrt(2)
    return _moon_noise(len(theta), rng) + shift


def two_moons_reference(x_obs: Array, n: int, rng: Generator) -> Array:
    """Exact: u = x - p = (-|s| / √2, d / √2) with s = θ1 + θ2, d = θ2 - θ1 (a map of unit |Jacobian| on each
    half-plane), so a noise draw gives θ with probability ∝ p(x | θ), sign of s a fair coin; out-of-box rejected."""

    def propose(m: int) -> Array:
        u = x_obs[None, :] - _moon_noise(m, rng)
        s = -math.sqrt(2) * u[:, 0] * rng.choice([-1.0, 1.0], size=m)
        d = math.sqrt(2) * u[:, 1]
        theta = np.stack([(s - d) / 2, (s + d) / 2], axis=1)
        theta[(u[:, 0] > 0) | ~_in_box(theta, -1, 1)] = np.nan
        return theta

    return _rejection(propose, n)


# ------------------------------------------------------------------ gaussian linear
GL_DIM, GL_PRIOR_VAR, GL_NOISE_VAR = 10, 0.1, 0.1


def gaussian_linear_simulate(theta: Array, rng: Generator) -> Array:
    return theta + math.sqrt(GL_NOISE_VAR) * rng.normal(size=theta.shape)


def gaussian_linear_reference(x_obs: Array, n: int, rng: Generator) -> Array:
    var = 1 / (1 / GL_PRIOR_VAR + 1 / GL_NOISE_VAR)
    mean = var * x_obs / GL_NOISE_VAR
    return mean + math.sqrt(var) * rng.normal(size=(n, len(x_obs)))


# ------------------------------------------------------------------ SLCP
SLCP_DRAWS, SLCP_EPS, SLCP_BOUND = 4, 1e-6, 3.0


def _slcp_cov(theta: Array) -> tuple[Array, Array, Array]:
    """(var1, cov12, var2) of the 2-D Gaussian for each row of θ."""
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, np.tanh(theta[:, 4])
    return s1**2 + SLCP_EPS, rho * s1 * s2, s2**2 + SLCP_EPS


def slcp_simulate(theta: Array, rng: Generator) -> Array:
    a, b, c = _slcp_cov(theta)
    l11 = np.sqrt(a)
    l21 = b / l11
    l22 = np.sqrt(np.maximum(c - l21**2, 0.0))
    z = rng.normal(size=(len(theta), SLCP_DRAWS, 2))
    x0 = theta[:, None, 0] + l11[:, None] * z[..., 0]
    x1 = theta[:, None, 1] + l21[:, None] * z[..., 0] + l22[:, None] * z[..., 1]
    return np.stack([x0, x1], axis=-1).reshape(len(theta), 2 * SLCP_DRAWS)


def slcp_log_likelihood(theta: Array, x_obs: Array) -> Array:
    a, b, c = _slcp_cov(theta)
    det = a * c - b**2
    diff = x_obs.reshape(SLCP_DRAWS, 2)[None] - theta[:, None, :2]
    quad = (c[:, None] * diff[..., 0] ** 2 - 2 * b[:, None] * diff[..., 0] * diff[..., 1]) + a[:, None] * diff[
        ..., 1
    ] ** 2
    return -0.5 * (quad / det[:, None]).sum(1) - SLCP_DRAWS * (0.5 * np.log(det) + math.log(2 * math.pi))


def slcp_exact_moves(x_obs: Array) -> Callable[[Array, float, Generator], Array]:
    """Two kernels that leave prior × likelihood^β invariant exactly, for the SMC below: the mean (θ1, θ2) redrawn
    from its conditional, N(x̄, S / (4β)) on the box (an independence proposal, kept when inside the box), which
    undoes the funnel between θ1, θ2 and θ3, θ4; then the signs of θ3 and θ4 flipped by fair coins (the
    likelihood depends on their squares only, the prior is symmetric), which keeps the four modes' masses equal
    where many tempering steps would let them drift."""
    xbar = x_obs.reshape(SLCP_DRAWS, 2).mean(0)

    def move(theta: Array, beta: float, rng: Generator) -> Array:
        a, b, c = (v / (SLCP_DRAWS * beta) for v in _slcp_cov(theta))
        l11 = np.sqrt(a)
        l21 = b / l11
        l22 = np.sqrt(np.maximum(c - l21**2, 0.0))
        z = rng.normal(size=(len(theta), 2))
        mean = np.stack([xbar[0] + l11 * z[:, 0], xbar[1] + l21 * z[:, 0] + l22 * z[:, 1]], axis=1)
        theta = theta.copy()
        inside = _in_box(mean, -SLCP_BOUND, SLCP_BOUND)
        theta[inside, :2] = mean[inside]
        theta[:, 2:4] *= rng.choice([-1.0, 1.0], size=(len(theta), 2))
        return theta

    return move


def slcp_reference(x_obs: Array, n: int, rng: Generator, particles: int = 10_000, exact_moves: bool = True) -> Array:
    theta = smc(
        lambda t: slcp_log_likelihood(t, x_obs),
        np.full(5, -SLCP_BOUND),
        np.full(5, SLCP_BOUND),
        max(particles, n),
        rng,
        sign_dims=[2, 3],
        exact_move=slcp_exact_moves(x_obs) if exact_moves else None,
    )
    return theta[rng.permutation(len(theta))[:n]]


# ------------------------------------------------------------------ SMC (for SLCP's reference)
def _next_beta(loglik: Array, beta: float, ess_fraction: float) -> float:
    """The largest next temperature whose incremental weights keep the effective sample size ≥ the fraction."""

    def ess(b: float) -> float:
        logw = (b - beta) * loglik
        w = np.exp(logw - logw.max())
        return w.sum() ** 2 / (w**2).sum() / len(w)

    if ess(1.0) >= ess_fraction:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(mid) >= ess_fraction else (lo, mid)
    return lo if lo > beta else hi


def _systematic(weights: Array, rng: Generator) -> Array:
    cum = np.cumsum(weights / weights.sum())
    cum[-1] = 1.0
    return np.searchsorted(cum, (rng.random() + np.arange(len(weights))) / len(weights))


def _metropolis(
    theta: Array, ll: Array, beta: float, loglik, lo: Array, hi: Array, scale: float, rng: Generator, sign_dims
) -> tuple[Array, Array, float]:
    """One random-walk Metropolis move of every particle targeting prior × likelihood^β in the box. The proposal
    covariance is the particles' covariance with the ``sign_dims`` folded to |θ|, its sign-dims rows mirrored
    by each particle's own signs (so every mode gets its own orientation); the Hastings ratio corrects for it."""
    folded = theta.copy()
    folded[:, sign_dims] = np.abs(folded[:, sign_dims])
    chol = np.linalg.cholesky(np.cov(folded.T) + 1e-12 * np.eye(theta.shape[1]))
    inv = np.linalg.inv(chol)

    def signs(t: Array) -> Array:
        out = np.ones_like(t)
        out[:, sign_dims] = np.where(t[:, sign_dims] < 0, -1.0, 1.0)
        return out

    step = scale * rng.normal(size=theta.shape) @ chol.T
    step *= signs(theta)
    prop = theta + step
    inside = np.all((prop >= lo) & (prop <= hi), axis=1)
    prop_ll = np.full(len(theta), -np.inf)
    prop_ll[inside] = loglik(prop[inside])
    log_q_fwd = -0.5 * (((step * signs(theta)) @ inv.T) ** 2).sum(1)
    log_q_rev = -0.5 * (((step * signs(prop)) @ inv.T) ** 2).sum(1)
    log_alpha = beta * (prop_ll - ll) + log_q_rev - log_q_fwd
    accept = inside & (np.log(rng.random(len(theta))) < log_alpha)
    theta, ll = np.where(accept[:, None], prop, theta), np.where(accept, prop_ll, ll)
    return theta, ll, float(accept.mean())


def smc(
    loglik: Callable[[Array], Array],
    lo: Array,
    hi: Array,
    particles: int,
    rng: Generator,
    sign_dims: list[int] | None = None,
    exact_move: Callable[[Array, float, Generator], Array] | None = None,
    ess_fraction: float = 0.5,
    final_moves: int = 30,
) -> Array:
    """Equal-weight samples of U(lo, hi) × exp(loglik) by likelihood tempering: at each temperature β, resample
    (systematic), then move every particle by Metropolis steps (each followed by ``exact_move``, a kernel that
    leaves U × exp(β loglik) invariant, if given) until ~99% have moved; ``final_moves`` more at β = 1."""
    sign_dims = sign_dims or []
    theta = rng.uniform(lo, hi, size=(particles, len(lo)))
    ll, beta, scale = loglik(theta), 0.0, 2.38 / math.sqrt(len(lo))
    while beta < 1.0:
        new_beta = _next_beta(ll, beta, ess_fraction)
        logw = (new_beta - beta) * ll
        idx = _systematic(np.exp(logw - logw.max()), rng)
        theta, ll, beta = theta[idx], ll[idx], new_beta
        moves, stay = 0, 1.0
        while (stay > 0.01 and moves < 100) or (beta == 1.0 and moves < final_moves):
            theta, ll, acc = _metropolis(theta, ll, beta, loglik, lo, hi, scale, rng, sign_dims)
            if exact_move is not None:
                theta = exact_move(theta, beta, rng)
                ll = loglik(theta)
            scale *= 1.25 if acc > 0.4 else 0.8 if acc < 0.15 else 1.0
            stay *= 1 - acc
            moves += 1
    return theta


# ------------------------------------------------------------------ gaussian mixture
GM_BOUND, GM_SCALES = 10.0, (1.0, 0.1)


def gaussian_mixture_simulate(theta: Array, rng: Generator) -> Array:
    scale = np.where(rng.random(len(theta)) < 0.5, *GM_SCALES)
    return theta + scale[:, None] * rng.normal(size=theta.shape)


def gaussian_mixture_reference(x_obs: Array, n: int, rng: Generator) -> Array:
    """Exact: p(θ | x) ∝ 0.5 N(θ; x, I) + 0.5 N(θ; x, 0.01 I) on the box; the untruncated mixture, out-of-box
    draws rejected (the truncation reweights the components by their mass in the box, as it should)."""

    def propose(m: int) -> Array:
        theta = gaussian_mixture_simulate(np.repeat(x_obs[None], m, axis=0), rng)
        theta[~_in_box(theta, -GM_BOUND, GM_BOUND)] = np.nan
        return theta

    return _rejection(propose, n)


# ------------------------------------------------------------------ registry
TASKS: dict[str, Task] = {
    "two_moons": Task(
        "two_moons", 2, 2, [[-1.0, 1.0]] * 2, _box_prior(-1, 1, 2), two_moons_simulate, two_moons_reference
    ),
    "gaussian_linear": Task(
        "gaussian_linear",
        GL_DIM,
        GL_DIM,
        None,
        lambda n, rng: math.sqrt(GL_PRIOR_VAR) * rng.normal(size=(n, GL_DIM)),
        gaussian_linear_simulate,
        gaussian_linear_reference,
        gaussian_prior=(0.0, GL_PRIOR_VAR),
    ),
    "slcp": Task(
        "slcp",
        5,
        2 * SLCP_DRAWS,
        [[-SLCP_BOUND, SLCP_BOUND]] * 5,
        _box_prior(-SLCP_BOUND, SLCP_BOUND, 5),
        slcp_simulate,
        slcp_reference,
        context_shape=(SLCP_DRAWS, 2),
    ),
    "gaussian_mixture": Task(
        "gaussian_mixture",
        2,
        2,
        [[-GM_BOUND, GM_BOUND]] * 2,
        _box_prior(-GM_BOUND, GM_BOUND, 2),
        gaussian_mixture_simulate,
        gaussian_mixture_reference,
    ),
}


def observations(task: Task, k: int, seed: int) -> list[tuple[Array, Array]]:
    """k (θ_true, x_obs) pairs from the prior and the simulator; pair i depends on (seed, i) only, so the first
    pairs are the same whatever k."""
    pairs = []
    for i in range(k):
        rng = np.random.default_rng([seed, i])
        theta = task.prior(1, rng)
        pairs.append((theta[0], task.simulate(theta, rng)[0]))
    return pairs


class TorchSimulator:
    """A task's simulator as a batched callable of torch θ (n, D) → x (n, x_dim) float32, as ``flows.infer`` and
    sbi's loops call it: the noise comes from a generator seeded by numpy's global random state (which
    ``flows.infer`` seeds per batch) or, given ``seed``, by that seed and a call counter."""

    def __init__(self, task: Task, seed: int | list[int] | None = None):
        self.task, self.seed, self.calls = task, seed, 0

    def __call__(self, theta: Any) -> Any:
        import torch

        if self.seed is None:
            rng = np.random.default_rng(np.random.randint(2**31))
        else:
            rng = np.random.default_rng([*np.atleast_1d(self.seed).tolist(), self.calls])
        self.calls += 1
        x = self.task.simulate(torch.as_tensor(theta).detach().cpu().double().numpy(), rng)
        return torch.from_numpy(x.astype(np.float32))


def simulations(task: Task, n: int, seed: int | list[int]) -> tuple[Array, Array]:
    """n (θ, x) training pairs."""
    rng = np.random.default_rng(seed)
    theta = task.prior(n, rng)
    return theta, task.simulate(theta, rng)


# ------------------------------------------------------------------ metric
def c2st(a: Array, b: Array, seed: int = 0, folds: int = 5) -> float:
    """sbibm's classifier two-sample test: an MLP (two hidden layers of 10 × D) told a from b, standardized by a's
    mean and std; mean accuracy over stratified shuffled folds. 0.5: indistinguishable; 1: disjoint."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    mean, std = a.mean(0), a.std(0)
    std = np.where(std > 0, std, 1.0)
    data = np.concatenate([(a - mean) / std, (b - mean) / std]).astype(np.float64)
    target = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    width = 10 * a.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(width, width),
        max_iter=1000,
        solver="adam",
        early_stopping=True,
        n_iter_no_change=50,
        random_state=seed,
    )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, data, target, cv=cv, scoring="accuracy").mean())


# ------------------------------------------------------------------ sanity checks (python bench/simulators.py)
OBSERVATION_SEED = 1000  # the benchmark's observations: observations(task, k, OBSERVATION_SEED)


def _sir(log_target: Callable[[Array], Array], proposal: Array, log_q: Array, n: int, rng: Generator):
    """Sampling-importance-resampling: (n draws, effective sample size of the weights)."""
    logw = log_target(proposal) - log_q
    w = np.exp(logw - logw.max())
    w /= w.sum()
    return proposal[rng.choice(len(proposal), size=n, p=w)], float(1 / (w**2).sum())


def _two_moons_log_likelihood(theta: Array, x_obs: Array) -> Array:
    """log p(x | θ): the noise p = x - g(θ) is polar around (0.25, 0): r ~ N(0.1, 0.01²), angle ~ U(-π/2, π/2)."""
    shift = np.stack([-np.abs(theta[:, 0] + theta[:, 1]), theta[:, 1] - theta[:, 0]], axis=1) / math.sqrt(2)
    v = x_obs[None] - shift - np.array([0.25, 0.0])
    r = np.hypot(v[:, 0], v[:, 1])
    log_r = -0.5 * ((r - 0.1) / 0.01) ** 2 - math.log(0.01 * math.sqrt(2 * math.pi))
    return np.where(v[:, 0] > 0, log_r - math.log(math.pi) - np.log(r), -np.inf)


def _bvn_box(mean: Array, a: Array, b: Array, c: Array, lo: float, hi: float, nodes: int = 48) -> Array:
    """P(N(mean, [[a, b], [b, c]]) ∈ [lo, hi]²) per row: Gauss-Legendre over the first coordinate (within 9 sd)."""
    from scipy.special import ndtr

    sd1 = np.sqrt(a)
    left, right = np.maximum(lo, mean[:, 0] - 9 * sd1), np.minimum(hi, mean[:, 0] + 9 * sd1)
    width = np.maximum(right - left, 0.0)
    u, wts = np.polynomial.legendre.leggauss(nodes)
    x1 = left[:, None] + (u[None] + 1) / 2 * width[:, None]
    dens = np.exp(-0.5 * ((x1 - mean[:, :1]) / sd1[:, None]) ** 2) / (sd1[:, None] * math.sqrt(2 * math.pi))
    m2 = mean[:, 1:] + (b / a)[:, None] * (x1 - mean[:, :1])
    sd2 = np.sqrt(np.maximum(c - b**2 / a, 1e-300))[:, None]
    inner = ndtr((hi - m2) / sd2) - ndtr((lo - m2) / sd2)
    return (dens * inner * wts[None] * width[:, None] / 2).sum(1)


def _slcp_phi_proposal(pilot: Array | None, draws: int, rng: Generator) -> tuple[Array, Array]:
    """(draws, log density) over (θ3, θ4, θ5): 30% the uniform prior (defensive: every region covered), 70% one
    Gaussian per sign quadrant of (θ3, θ4) fitted to ``pilot`` samples with its covariance doubled."""
    volume = (2 * SLCP_BOUND) ** 3
    if pilot is None:
        return rng.uniform(-SLCP_BOUND, SLCP_BOUND, size=(draws, 3)), np.full(draws, -math.log(volume))
    phi = pilot[:, 2:]
    quadrant = 2 * (phi[:, 0] > 0) + (phi[:, 1] > 0)
    parts = [(np.mean(quadrant == q), phi[quadrant == q]) for q in range(4) if np.sum(quadrant == q) > 10]
    comps = [(0.3, None, None)] + [(0.7 * w / sum(w for w, _ in parts), p.mean(0), 2 * np.cov(p.T)) for w, p in parts]
    counts = rng.multinomial(draws, [w for w, _, _ in comps])
    out = [rng.uniform(-SLCP_BOUND, SLCP_BOUND, size=(counts[0], 3))]
    out += [rng.multivariate_normal(m, c, size=k) for (_, m, c), k in zip(comps[1:], counts[1:], strict=True)]
    x = np.concatenate(out)
    logs = [np.full(len(x), math.log(0.3 / volume))]
    for w, m, c in comps[1:]:
        diff = np.linalg.solve(np.linalg.cholesky(c), (x - m).T)
        logs.append(math.log(w) - 0.5 * (diff**2).sum(0) - 0.5 * np.linalg.slogdet(2 * math.pi * c)[1])
    return x, np.logaddexp.reduce(np.stack(logs), axis=0)


def slcp_marginal_sir(x_obs: Array, n: int, rng: Generator, pilot: Array | None = None, draws: int = 1_000_000):
    """An independent SLCP sampler for checking the SMC: the mean (θ1, θ2) integrated out in closed form (the
    likelihood at x̄, times |S|^½, times the box probability of N(x̄, S/4), up to a constant), importance
    sampling-resampling over (θ3, θ4, θ5) from ``_slcp_phi_proposal`` (the weights make it right whatever the
    pilot), then the mean drawn from N(x̄, S/4) on the box. Returns (samples, effective sample size)."""
    xs = x_obs.reshape(SLCP_DRAWS, 2)
    xbar = xs.mean(0)

    def log_marginal(phi: Array) -> Array:
        theta = np.concatenate([np.repeat(xbar[None], len(phi), 0), phi], axis=1)
        a, b, c = _slcp_cov(theta)
        box = _bvn_box(theta[:, :2], a / SLCP_DRAWS, b / SLCP_DRAWS, c / SLCP_DRAWS, -SLCP_BOUND, SLCP_BOUND)
        inside = _in_box(phi, -SLCP_BOUND, SLCP_BOUND)
        value = slcp_log_likelihood(theta, x_obs) + 0.5 * np.log(a * c - b**2) + np.log(np.maximum(box, 1e-300))
        return np.where(inside, value, -np.inf)

    phi, log_q = _slcp_phi_proposal(pilot, draws, rng)
    logm = np.concatenate([log_marginal(p) for p in np.array_split(phi, max(1, draws // 100_000))])
    phi, ess = _sir(lambda _: logm, phi, log_q, n, rng)
    theta = np.concatenate([np.zeros((n, 2)), phi], axis=1)
    todo = np.arange(n)
    while len(todo):  # the mean from its conditional on the box, by rejection
        a, b, c = (v / SLCP_DRAWS for v in _slcp_cov(theta[todo]))
        z = rng.normal(size=(len(todo), 2))
        l11 = np.sqrt(a)
        l21 = b / l11
        mean = xbar + np.stack([l11 * z[:, 0], l21 * z[:, 0] + np.sqrt(np.maximum(c - l21**2, 0)) * z[:, 1]], 1)
        ok = _in_box(mean, -SLCP_BOUND, SLCP_BOUND)
        theta[todo[ok], :2] = mean[ok]
        todo = todo[~ok]
    return theta, ess


def _independent(task: Task, x_obs: Array, n: int, rng: Generator, pilot: Array) -> tuple[Array, float | None]:
    """(samples, ESS or None when exact) of a sampler sharing no code path with the task's reference: SIR on the
    closed-form likelihood (two_moons, gaussian_mixture; slcp with the mean integrated out), rejection from the
    prior (gaussian_linear)."""
    if task.name == "two_moons":
        prop = rng.uniform(-1, 1, size=(4_000_000, 2))
        return _sir(lambda t: _two_moons_log_likelihood(t, x_obs), prop, np.zeros(len(prop)), n, rng)
    if task.name == "gaussian_mixture":  # proposal N(x_obs, 3² I); target: the mixture likelihood on the box
        prop = x_obs + 3 * rng.normal(size=(2_000_000, 2))
        log_q = -0.5 * ((prop - x_obs) ** 2).sum(1) / 9
        d2 = ((prop - x_obs) ** 2).sum(1)
        log_t = np.logaddexp(-0.5 * d2 + math.log(0.5), -0.5 * d2 / 0.01 + math.log(0.5 / 0.01))
        return _sir(lambda t: np.where(_in_box(t, -GM_BOUND, GM_BOUND), log_t, -np.inf), prop, log_q, n, rng)
    if task.name == "gaussian_linear":  # exact: rejection from the prior, accepted with probability exp(-|x-θ|²/2σ²)

        def propose(m: int) -> Array:
            theta = math.sqrt(GL_PRIOR_VAR) * rng.normal(size=(m, GL_DIM))
            theta[rng.random(m) >= np.exp(-0.5 * ((theta - x_obs) ** 2).sum(1) / GL_NOISE_VAR)] = np.nan
            return theta

        return _rejection(propose, n), None
    return slcp_marginal_sir(x_obs, n, rng, pilot)


def checks(k: int = 10, n: int = 2000) -> None:
    """Per task and observation: C2ST of two independent reference draws, of the reference against an independent
    sampler (``_independent``; an SIR's ESS shown) and against itself shifted by 3 sd; for SLCP the four sign
    modes' masses, and the same without the sign-flip kernel (tempering alone)."""
    for task in TASKS.values():
        for i, (_, x_obs) in enumerate(observations(task, k, OBSERVATION_SEED)):
            start = time.perf_counter()
            ref = task.reference(x_obs, n, np.random.default_rng([1, i]))
            seconds = time.perf_counter() - start
            ref2 = task.reference(x_obs, n, np.random.default_rng([2, i]))
            other, ess = _independent(task, x_obs, n, np.random.default_rng([3, i]), ref)
            how = "exact" if ess is None else f"SIR, ESS {ess:.0f}"
            line = f"{task.name} obs {i}: reference {seconds:.1f} s; C2ST ref/ref' {c2st(ref, ref2):.3f}, "
            line += (
                f"ref/independent {c2st(ref, other):.3f} ({how}), ref/shifted {c2st(ref, ref2 + 3 * ref.std(0)):.3f}"
            )
            if task.name == "slcp":
                plain = slcp_reference(x_obs, n, np.random.default_rng([4, i]), exact_moves=False)
                line += f"; mode masses {_quadrants(ref)} (tempering alone {_quadrants(plain)}"
                line += f", C2ST against ref {c2st(ref, plain):.3f})"
            print(line, flush=True)


def _quadrants(theta: Array) -> str:
    q = np.bincount(2 * (theta[:, 2] > 0) + (theta[:, 3] > 0), minlength=4) / len(theta)
    return "/".join(f"{v:.2f}" for v in q)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The reference sanity checks (see checks()).")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--observations", type=int, default=10)
    args = parser.parse_args()
    TASKS = {name: TASKS[name] for name in args.tasks.split(",")}
    checks(args.observations)
