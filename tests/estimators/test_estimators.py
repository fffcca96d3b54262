"""Weight estimators on an analytic mixture of isotropic Gaussians (closed-form eps_i and posterior).

Source i's data is N(mu_i, s_i^2 I) in d = 16 dims. With a DDPM alpha_bar schedule and the VE view
x~ = x / sqrt(abar), sigma = sqrt((1 - abar) / abar):
    x~ | i ~ N(mu_i, (s_i^2 + sigma^2) I),   eps_i = sigma (x~ - mu_i) / (s_i^2 + sigma^2),
    p(i | x) = softmax_i(log lambda_i + log N(x~; mu_i, (s_i^2 + sigma^2) I)).
Samplers (pure torch): DDPM ancestral steps on VP latents (what DDPMScheduler does on strided
timesteps; the same step as Euler-ancestral in the VE view) and Euler-Maruyama on the VE reverse SDE.
Each step mixes the per-source eps with the estimator's weights, as the composed denoiser will.
"""
import math

import pytest
import torch

from prompt_cdm.estimators import (
    ESTIMATORS, ClassifierEstimator, FixedEstimator, ItoEstimator, MixOutput, RatioEstimator,
    UniformEstimator, classifier_loss, get_estimator, ito_terms, mix_step, ratio_loss)

torch.set_num_threads(1)
D = 16
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM (Ho et al. 2020) schedule
ABAR = torch.cumprod(1 - BETAS, 0)


def schedule(K):
    """K strided timesteps 999..0 and the abar of each step's input and output ([K], [K])."""
    ts = torch.linspace(999, 0, K).round().long()
    a = ABAR[ts]
    a_next = torch.cat([a[1:], a.new_ones(1)])  # the last step lands on clean data (abar = 1)
    return ts, a, a_next


def sig(a):
    return math.sqrt((1 - a) / a)


class Mixture:
    def __init__(self, mus, ss, lambdas):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)                # [n x d]
        self.ss = torch.as_tensor(ss, dtype=torch.float64)                  # [n]
        self.lam = torch.as_tensor(lambdas, dtype=torch.float64)            # [n]

    @property
    def n(self):
        return len(self.ss)

    def eps(self, xt, sigma):
        """Exact eps_i at VE samples xt [B x d]: [n x B x d]."""
        v = self.ss ** 2 + sigma ** 2
        return sigma * (xt[None] - self.mus[:, None]) / v[:, None, None]

    def log_q(self, xt, sigma):
        """log N(xt; mu_i, (s_i^2 + sigma^2) I) [B x n]."""
        v = self.ss ** 2 + sigma ** 2
        sq = ((xt[None] - self.mus[:, None]) ** 2).sum(-1)
        return (-0.5 * sq / v[:, None] - 0.5 * D * torch.log(2 * math.pi * v)[:, None]).t()

    def posterior(self, xt, sigma):
        return torch.softmax(self.log_q(xt, sigma) + self.lam.log(), dim=-1)


TWO = Mixture([[1.0] * D, [-1.0] * D], [1.0, 1.0], [0.7, 0.3])
THREE = Mixture(torch.randn(3, D, generator=torch.Generator().manual_seed(1)), [0.5, 1.0, 0.8],
                [0.5, 0.3, 0.2])


def run(mixture, est, K, B, sampler="ddpm", seed=0):
    """Sample B points with K steps, mixing eps_i by est's weights; return (x0 [B x d], mean abs
    error of est's weights against the exact posterior over steps, images and sources)."""
    g = torch.Generator().manual_seed(seed)
    ts, a, a_next = schedule(K)
    est.reset(mixture.n, B)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)  # VP latents at t = 999
    if sampler == "em":
        x = x * math.sqrt(1 + sig(a[0]) ** 2)  # VE samples
    err = 0.0
    for k in range(K):
        s, sn = sig(a[k]), sig(a_next[k])
        xt = x * math.sqrt(1 + s * s) if sampler == "ddpm" else x
        est.set_state(k, K, ts[k], s, sn)
        e = mixture.eps(xt, s)
        out = mix_step(est, x, None, e)
        err += (out.weights.double() - mixture.posterior(xt, s)).abs().mean().item() / K
        z = torch.randn(B, D, generator=g, dtype=torch.float64)
        if sampler == "ddpm":  # DDPM posterior step on strided timesteps (DDIM eta = 1)
            at, ap = a[k].item(), a_next[k].item()
            x0 = (x - math.sqrt(1 - at) * out.eps) / math.sqrt(at)
            var = (1 - ap) / (1 - at) * (1 - at / ap)
            x_next = math.sqrt(ap) * x0 + math.sqrt(1 - ap - var) * out.eps + math.sqrt(var) * z
        else:  # Euler-Maruyama on the VE reverse SDE: drift (s^2 - sn^2) grad log q, noise var same
            x_next = x - (s * s - sn * sn) / s * out.eps + math.sqrt(s * s - sn * sn) * z
        est.observe(x, x_next, e, active=out.active)
        x = x_next
    return x, err


def ito(mixture, space="vp", **kw):
    return ItoEstimator(lambdas=mixture.lam.tolist(), stochastic=True, space=space, **kw)


class FlippedIto(ItoEstimator):
    """The quadratic term with the wrong sign: the test must be able to fail."""

    def increment(self, xt_prev, xt_next, eps_rows):
        quad, lin = ito_terms(xt_prev, xt_next, eps_rows, self.sigma, self.sigma_next)
        return -quad + lin


# --- (a) the Itô estimator tracks the exact posterior --------------------------------------------

def test_ito_tracks_exact_posterior_and_improves_with_steps():
    """Measured (seed 0, 500 samples): about 0.020 / 0.011 / 0.005 at 25 / 50 / 200 steps (DESIGN:
    0.02 at 25, 0.007 at 200). Bounds ~2.5x the measurement; seed-to-seed spread is ~3%."""
    errs = {K: run(TWO, ito(TWO), K, 500)[1] for K in (25, 50, 200)}
    assert errs[25] < 0.05 and errs[50] < 0.03 and errs[200] < 0.015, errs
    assert errs[200] < errs[50] < errs[25], errs


def test_ito_euler_maruyama_three_unequal_sources():
    """Euler-Maruyama (the Laplacians cancel exactly), 3 sources of different spread, VE input."""
    _, err = run(THREE, ito(THREE, space="ve"), 50, 400, sampler="em")
    assert err < 0.03, err


def test_ito_with_flipped_quadratic_sign_is_wrong():
    _, good = run(TWO, ito(TWO), 50, 500)
    _, bad = run(TWO, FlippedIto(lambdas=[0.7, 0.3], stochastic=True), 50, 500)
    assert bad > 0.15 and bad > 8 * good, (bad, good)  # measured 0.26 vs 0.011


def test_ito_starts_at_the_prior_and_freezes_dropped_sources():
    est = ito(THREE)
    est.reset(3, 2)
    x = torch.zeros(2, D)
    assert torch.allclose(est.weights(x), torch.tensor([[0.5, 0.3, 0.2]] * 2))
    est.set_state(0, 10, 999, 2.0, 1.0)
    e = torch.randn(3, 2, D, generator=torch.Generator().manual_seed(0))
    active = torch.tensor([[True, False, True], [True, True, True]])
    est.observe(x, x + 0.1, e, active=active)
    assert est.ll[0, 1] == 0 and est.ll[1, 1] != 0 and est.ll[0, 0] != 0


# --- (b) learned routers given the exact answer reproduce the exact posterior ------------------

def trajectory_points(mixture, sigma, B=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(mixture.lam, B, replacement=True, generator=g)
    x0 = mixture.mus[comp] + mixture.ss[comp, None] * torch.randn(B, D, generator=g,
                                                                  dtype=torch.float64)
    return x0 + sigma * torch.randn(B, D, generator=g, dtype=torch.float64)  # VE samples


def vp_to_sigma(t):
    return sig(ABAR[int(t)].item())


@pytest.mark.parametrize("t", [999, 600, 300, 100, 20, 0])
def test_classifier_and_ratio_with_exact_scores_give_exact_posterior(t):
    m, s = THREE, vp_to_sigma(t)
    xt = trajectory_points(m, s)
    x = xt / math.sqrt(1 + s * s)  # the VP latents a router sees
    pi = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)  # unbalanced classifier training

    def classifier_logits(x, t):  # log p_train(i | x) + const: includes the training frequencies
        xt = x * math.sqrt(1 + vp_to_sigma(t) ** 2)
        return m.log_q(xt, vp_to_sigma(t)) + pi.log() + 5.0

    def log_ratios(x, t):  # h_i = log q_i / q_ref, reference N(0, (4 + sigma^2) I)
        s = vp_to_sigma(t)
        xt = x * math.sqrt(1 + s * s)
        log_ref = -0.5 * (xt ** 2).sum(-1) / (4 + s * s) - 0.5 * D * math.log(2 * math.pi * (4 + s * s))
        return m.log_q(xt, s) - log_ref[:, None]

    exact = m.posterior(xt, s)
    for est in (ClassifierEstimator(classifier_logits, lambdas=m.lam, train_prior=pi),
                RatioEstimator(log_ratios, lambdas=m.lam)):
        est.reset(3, len(x))
        est.set_state(0, 1, t)
        w = est.weights(x)
        assert w.shape == (64, 3)
        assert torch.allclose(w.double(), exact, atol=1e-5), est.name


def test_router_checks_score_shape_and_reset():
    est = get_estimator("ratio", score_fn=lambda x, t: torch.zeros(len(x), 2))
    with pytest.raises(RuntimeError, match="reset"):
        est.weights(torch.zeros(4, D))
    est.reset(3, 4)
    with pytest.raises(ValueError, match=r"\[N x n\]"):
        est.weights(torch.zeros(4, D))
    with pytest.raises(TypeError, match="callable"):
        ClassifierEstimator(score_fn=None)


def test_ratio_loss_optimum_is_the_log_density_ratio():
    """Fit h(x) = a x^2 + b x + c with the logistic loss: p = N(1, 0.5^2), ref = N(0, 1), so
    log p/ref = -1.5 x^2 + 4 x - 2 + log 2."""
    g = torch.Generator().manual_seed(0)
    xs, xr = 1 + 0.5 * torch.randn(20000, generator=g), torch.randn(20000, generator=g)
    theta = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def h(x):
        return theta[0] * x * x + theta[1] * x + theta[2]

    def closure():
        opt.zero_grad()
        loss = ratio_loss(h(xs), h(xr))
        loss.backward()
        return loss

    opt.step(closure)
    want = torch.tensor([-1.5, 4.0, -2 + math.log(2)])
    assert torch.allclose(theta.detach(), want, atol=0.15), theta


def test_classifier_loss_fit_plus_train_prior_gives_posterior():
    """Unbalanced training (3:1) of a linear 2-way classifier on N(-1, 1) vs N(1, 1); with
    train_prior the estimator recovers the posterior under the user's lambda = (0.5, 0.5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([-1 + torch.randn(15000, generator=g), 1 + torch.randn(5000, generator=g)])
    y = torch.cat([torch.zeros(15000), torch.ones(5000)]).long()
    theta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def logits(x, t=None):
        return torch.stack([theta[0] * x + theta[1], torch.zeros_like(x)], dim=-1)

    def closure():
        opt.zero_grad()
        loss = classifier_loss(logits(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(theta.detach(), torch.tensor([-2.0, math.log(3)]), atol=0.1), theta
    est = ClassifierEstimator(lambda x, t: logits(x).detach(), lambdas=[0.5, 0.5],
                              train_prior=[0.75, 0.25])
    grid = torch.linspace(-2, 2, 9)
    est.reset(2, len(grid))
    want = torch.sigmoid(-2 * grid)  # p(0 | x) for equal priors
    assert torch.allclose(est.weights(grid)[:, 0], want, atol=0.03)


# --- (c) weights matter: exact posterior weights sample the mixture, constant ones do not --------

def test_exact_posterior_weights_reproduce_lambda_and_constant_weights_do_not():
    """Equal spreads, mu = +-2 (|mu_1 - mu_2| = 16): a sample 'lands' in component i when its
    squared distance to mu_i is < 40 (chi^2_16 99.9% quantile 39.3). Constant weights w mix the
    two scores into the score of N(sum_i w_i mu_i, s^2 I) at every sigma (equal spreads), so
    (0.5, 0.5) samples sit at the midpoint (squared distance ~ 80 from both) and (0.7, 0.3) samples
    all sit nearest component 0."""
    m = Mixture([[2.0] * D, [-2.0] * D], [1.0, 1.0], [0.7, 0.3])

    def log_post(x, t):
        s = vp_to_sigma(t)
        return m.log_q(x * math.sqrt(1 + s * s), s)

    def landed(x0):
        d2 = ((x0[:, None] - m.mus[None]) ** 2).sum(-1)  # [B x n]
        return d2.min(-1).values < 40, d2.argmin(-1)

    exact = ClassifierEstimator(log_post, lambdas=[0.7, 0.3])
    x0, _ = run(m, exact, 100, 2000, seed=0)
    ok, comp = landed(x0)
    assert ok.float().mean() > 0.97
    assert abs((comp == 0).double().mean().item() - 0.7) < 0.05  # binomial sd 0.01

    x0, _ = run(m, UniformEstimator(), 100, 2000, seed=0)
    assert landed(x0)[0].float().mean() < 0.05
    x0, _ = run(m, FixedEstimator([0.7, 0.3]), 100, 2000, seed=0)
    assert (landed(x0)[1] == 0).double().mean() > 0.95


# --- (d) the Itô estimator refuses deterministic samplers ---------------------------------------

def test_ito_refuses_deterministic_sampler():
    with pytest.raises(ValueError, match="stochastic sampler.*DDPMScheduler"):
        ItoEstimator(stochastic=False)
    with pytest.raises(ValueError, match="stochastic sampler"):
        get_estimator("ito", scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="say which sampler"):
        ItoEstimator()
    with pytest.raises(ValueError, match="unknown scheduler"):
        ItoEstimator(scheduler="MyScheduler")
    with pytest.raises(ValueError, match="contradicts"):
        ItoEstimator(scheduler="EulerDiscreteScheduler", stochastic=True)
    assert ItoEstimator(scheduler="EulerAncestralDiscreteScheduler").name == "ito"
    assert ItoEstimator(scheduler="MyScheduler", stochastic=True).name == "ito"


def test_ito_observe_needs_sigmas_in_reverse_order():
    est = ItoEstimator(stochastic=True)
    est.reset(2, 1)
    e, x = torch.zeros(2, 1, D), torch.zeros(1, D)
    with pytest.raises(RuntimeError, match="set_state"):
        est.observe(x, x, e)
    est.set_state(0, 2, 10, 1.0, 2.0)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        est.observe(x, x, e)


# --- (e) registry, constant estimators, mix_step ---------------------------------------------

def test_registry_lists_names():
    assert set(ESTIMATORS) == {"uniform", "fixed", "classifier", "ratio", "ito", "path"}
    with pytest.raises(ValueError, match="classifier, fixed, ito, path, ratio, uniform"):
        get_estimator("superdiff")
    assert isinstance(get_estimator("fixed", lambdas=[1, 3]), FixedEstimator)


def test_constant_estimators_and_their_errors():
    est = get_estimator("fixed", lambdas=[1.0, 3.0])
    est.reset(2, 3)
    assert torch.allclose(est.weights(torch.zeros(3, D)), torch.tensor([[0.25, 0.75]] * 3))
    with pytest.raises(ValueError, match="2 lambdas for 3 sources"):
        est.reset(3, 3)
    u = get_estimator("uniform")
    u.reset(4, 1)
    assert torch.allclose(u.weights(torch.zeros(1, D)), torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="uniform takes no lambdas"):
        get_estimator("uniform", lambdas=[1, 2])
    with pytest.raises(ValueError, match="fixed needs lambdas"):
        FixedEstimator(None)
    with pytest.raises(ValueError, match="fixed needs lambdas"):  # by name too: not a TypeError
        get_estimator("fixed")
    with pytest.raises(ValueError, match="non-negative"):
        FixedEstimator([1.0, -1.0])


def test_mix_step_shared_and_per_source_unconditional_rows():
    g = torch.Generator().manual_seed(0)
    e, u = torch.randn(3, 2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    est = FixedEstimator([0.5, 0.5, 0.0])
    est.reset(3, 2)
    out = mix_step(est, u, u, e, 4.0)
    assert isinstance(out, MixOutput) and out.active.all()
    assert torch.allclose(out.eps, u + 4.0 * (0.5 * e[0] + 0.5 * e[1] - u))
    u_rows = torch.randn(3, 2, 4, 2, 2, generator=g)  # per-source unconditional rows (2n rows)
    out = mix_step(est, u, u_rows, e, 4.0)
    want = sum(0.5 * (u_rows[i] + 4.0 * (e[i] - u_rows[i])) for i in range(2))
    assert torch.allclose(out.eps, want, atol=1e-5)
    # sparse routing drops the zero-weight source after warm-up; same result as dense (parity)
    est.set_state(3, 4)
    sparse = mix_step(est, u, u, e, 4.0, sparse_eps=0.01, warmup_frac=0.5)
    assert sparse.active.tolist() == [[True, True, False]] * 2
    assert torch.equal(sparse.eps, mix_step(est, u, u, e, 4.0).eps)


# --- watching: an estimator attributes a trajectory it does not steer --------------------------

def test_watched_estimator_mixes_with_drive_and_records_the_watcher():
    from prompt_cdm.estimators import WatchedEstimator

    watcher = ItoEstimator(stochastic=True, space="ve")  # uniform prior: only the trajectory speaks
    est = WatchedEstimator(FixedEstimator([0.0, 1.0, 0.0]), watcher)
    x, _ = run(THREE, est, 50, 200, sampler="em")
    # the drive mixed: every sample was drawn by source 1 alone
    d = ((x[:, None] - THREE.mus[None]) ** 2).sum(-1)  # [B x n] squared distance to each mean
    assert (d.argmin(1) == 1).float().mean() > 0.95
    tr = est.watched_trace()
    assert tr.shape == (50, 200, 3)
    assert torch.allclose(tr[0], torch.full((200, 3), 1 / 3))  # the watcher starts at its own prior
    # the watcher's evidence finds the source that drew the samples, without ever steering them
    assert tr[-1, :, 1].mean() > 0.9 and est.watched_credit().shape == (200, 3)
    # the mixing prior (user lambdas, a prompt prior) goes to the estimator that mixes
    est.log_prior = torch.log(torch.tensor([[0.5, 0.5, 0.0]] * 200))
    assert torch.equal(est.drive.log_prior, est.log_prior) and est.watch.log_prior is not est.log_prior
    with pytest.raises(TypeError, match="watch must be a WeightEstimator"):
        WatchedEstimator(FixedEstimator([1.0]), "ito")


# --- the path likelihood: exact in discrete time ------------------------------------------------

def _kernel_loglik(mixture, K, B, sampler, seed=0):
    """Independent reference: draw a trajectory with the exact mixture posterior, and sum each source's
    Gaussian transition log-density of every step, written in the sampler's own coordinates (VP for
    DDPM, VE for Euler-Maruyama). Returns (the path estimator's weights at the end, the reference's)."""
    from prompt_cdm.estimators import PathEstimator

    est = PathEstimator(lambdas=mixture.lam.tolist(), stochastic=True,
                        space="vp" if sampler == "ddpm" else "ve",
                        sampler="ancestral" if sampler == "ddpm" else "euler-maruyama")
    g = torch.Generator().manual_seed(seed)
    ts, a, a_next = schedule(K)
    est.reset(mixture.n, B)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    if sampler == "em":
        x = x * math.sqrt(1 + sig(a[0]) ** 2)
    ll = torch.zeros(B, mixture.n, dtype=torch.float64)
    for k in range(K):
        s, sn = sig(a[k]), sig(a_next[k])
        xt = x * math.sqrt(1 + s * s) if sampler == "ddpm" else x
        est.set_state(k, K, ts[k], s, sn)
        e = mixture.eps(xt, s)  # [n x B x d]
        w = mixture.posterior(xt, s)  # drive with the exact marginal posterior (any drive will do)
        eps = (w.t()[..., None] * e).sum(0)
        z = torch.randn(B, D, generator=g, dtype=torch.float64)
        if sampler == "ddpm":
            at, ap = a[k].item(), a_next[k].item()
            var = (1 - ap) / (1 - at) * (1 - at / ap)
            mean = lambda ep: (math.sqrt(ap) * (x - math.sqrt(1 - at) * ep) / math.sqrt(at)  # noqa: E731
                               + math.sqrt(1 - ap - var) * ep)
        else:
            var = s * s - sn * sn
            mean = lambda ep: x - (s * s - sn * sn) / s * ep  # noqa: E731
        x_next = mean(eps) + math.sqrt(var) * z
        if var > 0:
            ll += torch.stack([-((x_next - mean(e[i])) ** 2).sum(-1) / (2 * var) for i in range(mixture.n)], -1)
        est.observe(x, x_next, e)
        x = x_next
    ref = torch.softmax(ll + mixture.lam.log(), -1)
    return est.weights(x).double(), ref


@pytest.mark.parametrize("sampler", ["ddpm", "em"])
def test_path_weights_equal_the_kernels_exact_trajectory_likelihood(sampler):
    got, want = _kernel_loglik(THREE, 25, 64, sampler)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    assert (want.max(-1).values > 0.99).float().mean() > 0.5  # the check is not vacuous: the paths decide


def test_path_watcher_finds_the_drawing_source_and_refuses_deterministic_samplers():
    from prompt_cdm.estimators import PathEstimator, WatchedEstimator

    est = WatchedEstimator(FixedEstimator([0.0, 0.0, 1.0]), PathEstimator(stochastic=True, space="ve",
                                                                          sampler="euler-maruyama"))
    assert est.observes_guided
    run(THREE, est, 25, 200, sampler="em")
    assert est.watched_trace()[-1, :, 2].mean() > 0.99
    with pytest.raises(ValueError, match="path: the path likelihood needs a stochastic sampler"):
        get_estimator("path", scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="path: say which kernel"):
        PathEstimator(scheduler="MySDEScheduler", stochastic=True)
    with pytest.raises(ValueError, match="sampler must be one of"):
        PathEstimator(stochastic=True, sampler="heun")
    assert PathEstimator(scheduler="DDPMScheduler").sampler == "ancestral"


def test_path_tracks_the_marginal_posterior_at_coarse_steps_and_samples_the_mixture():
    """Measured (DDPM, 500 samples, mean of seeds 0-2), mean abs error against the exact p(i | x_t):
    THREE at 10 / 25 steps path 0.0084 / 0.0052 vs ito 0.061 / 0.023. Bounds ~2.5x the path's figures.
    Mixing with path weights on mu = +-2, lambda (0.7, 0.3), 25 steps: every sample lands, 71.3% in 0."""
    from prompt_cdm.estimators import PathEstimator

    def path(m):
        return PathEstimator(lambdas=m.lam.tolist(), stochastic=True)

    assert run(THREE, path(THREE), 10, 500)[1] < 0.02
    assert run(THREE, path(THREE), 25, 500)[1] < 0.013
    m = Mixture([[2.0] * D, [-2.0] * D], [1.0, 1.0], [0.7, 0.3])
    x0, _ = run(m, path(m), 25, 2000, seed=0)
    d2 = ((x0[:, None] - m.mus[None]) ** 2).sum(-1)
    assert (d2.min(-1).values < 40).float().mean() > 0.97
    assert abs((d2.argmin(-1) == 0).double().mean().item() - 0.7) < 0.05  # binomial sd 0.01
