"""Image-quality and uncertainty metrics against a reference volume x_ref.

Point estimates: :func:`psnr`, :func:`ssim` (2D or 3D, Gaussian window, own implementation).
Gaussian predictive N(μ_i, σ_i²) per voxel:

* :func:`gaussian_log_likelihood` — mean_i log N(x_ref,i; μ_i, σ_i²);
* :func:`coverage` — fraction of voxels inside the central interval μ ± Φ⁻¹((1+ℓ)/2)σ, per level ℓ;
* :func:`calibration_error` — mean over levels of |coverage(ℓ) − ℓ|;
* :func:`spearman` — rank correlation of σ with |x_ref − μ|;
* :func:`crps_gaussian` — mean continuous ranked probability score,
  CRPS(N(μ, σ²), x) = σ [ t(2Φ(t) − 1) + 2φ(t) − 1/√π ], t = (x − μ)/σ (lower is better);
* :class:`PatchCovariance` / :func:`patch_log_likelihood` — log-likelihood of non-overlapping
  p×p (×p) patches under the joint Gaussian with sample covariance of zero-mean posterior
  samples (the TMLR 2023 linearised-DIP paper's test log-likelihood), accumulated as a stream.

Arrays may be numpy or torch; results are Python floats (or dicts of floats).

Example::

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(32, 32))
    >>> round(psnr(x, x + 0.01, data_range=1.0), 1)
    40.0
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dipuq.errors import DipuqError
from dipuq.maps.calibration import interval_multiplier, log_density

__all__ = [
    "psnr", "ssim", "gaussian_log_likelihood", "log_likelihood", "coverage", "calibration_error", "spearman",
    "crps_gaussian", "PatchCovariance", "patch_log_likelihood", "uncertainty_metrics", "DEFAULT_LEVELS",
]

DEFAULT_LEVELS = (0.5, 0.9, 0.95)
CALIBRATION_LEVELS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


def _t(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _same(*arrs) -> list[torch.Tensor]:
    ts = [_t(a) for a in arrs]
    shape = ts[0].shape
    for t in ts[1:]:
        if t.shape != shape:
            if t.numel() == ts[0].numel():
                continue
            raise DipuqError(f"metric inputs have different shapes {tuple(shape)} and {tuple(t.shape)}")
    return [t.reshape(shape) for t in ts]


def psnr(x, ref, data_range: float | None = None) -> float:
    """10 log10(R² / MSE) with R = ``data_range`` (default max(ref) − min(ref))."""
    x, ref = _same(x, ref)
    mse = float((x - ref).pow(2).mean())
    R = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    if mse == 0:
        return math.inf
    return 10 * math.log10(R * R / mse)


def _gauss_filter(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian filter ('valid' region) of a (1, 1, *spatial) tensor."""
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    w = w / w.sum()
    nd = x.ndim - 2
    conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d
    for ax in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + ax] = w.numel()
        x = conv(x, w.reshape(shape))
    return x


def ssim(x, ref, data_range: float | None = None, sigma: float = 1.5, radius: int = 5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window (σ = 1.5, 11 taps).

    Works on 2D images and 3D volumes (3D Gaussian window); the mean is over the 'valid' region.
    """
    x, ref = _same(x, ref)
    if x.ndim not in (2, 3):
        raise DipuqError(f"ssim needs a 2D image or 3D volume, got shape {tuple(x.shape)}")
    if min(x.shape) < 2 * radius + 1:
        raise DipuqError(f"ssim window ({2 * radius + 1}) is larger than the image {tuple(x.shape)}")
    R = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    c1, c2 = (k1 * R) ** 2, (k2 * R) ** 2
    a, b = x[None, None], ref[None, None]
    mu_a, mu_b = _gauss_filter(a, sigma, radius), _gauss_filter(b, sigma, radius)
    saa = _gauss_filter(a * a, sigma, radius) - mu_a**2
    sbb = _gauss_filter(b * b, sigma, radius) - mu_b**2
    sab = _gauss_filter(a * b, sigma, radius) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def gaussian_log_likelihood(ref, mean, std, eps: float = 1e-12) -> float:
    """Mean over voxels of log N(ref_i; mean_i, std_i²) (std floored at ``eps``)."""
    ref, mean, std = _same(ref, mean, std)
    var = std.clamp(min=eps).pow(2)
    return float((-0.5 * (ref - mean).pow(2) / var - 0.5 * torch.log(2 * math.pi * var)).mean())


def _normal_quantile(q: float) -> float:
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)))


def log_likelihood(ref, mean, std, df: float | None = None, eps: float = 1e-12) -> float:
    """Mean over voxels of the predictive log density at ref: Gaussian (``df`` None) or the
    Student-t of ``df`` degrees of freedom with standard deviation std (the calibrated maps' shape)."""
    if df is None:
        return gaussian_log_likelihood(ref, mean, std, eps)
    ref, mean, std = _same(ref, mean, std)
    r = (ref - mean).reshape(-1).numpy()
    return float(np.mean(log_density(r, std.clamp(min=eps).pow(2).reshape(-1).numpy(), df)))


def coverage(ref, mean, std, levels=DEFAULT_LEVELS, df: float | None = None) -> dict[float, float]:
    """Empirical coverage of the central intervals mean ± k(ℓ)·std, for each level ℓ, where k(ℓ) is
    Φ⁻¹((1+ℓ)/2) (Gaussian, ``df`` None) or the Student-t quantile scaled to unit variance."""
    ref, mean, std = _same(ref, mean, std)
    az = (ref - mean).abs()
    out = {}
    for lv in levels:
        if not 0 < lv < 1:
            raise DipuqError(f"coverage level must be in (0, 1), got {lv}")
        k = _normal_quantile(0.5 + lv / 2) if df is None else interval_multiplier(lv, df)
        out[float(lv)] = float((az <= k * std).double().mean())
    return out


def calibration_error(ref, mean, std, levels=CALIBRATION_LEVELS, df: float | None = None) -> float:
    """Mean over levels ℓ of |coverage(ℓ) − ℓ| (0 = perfectly calibrated; default ℓ = 0.05..0.95)."""
    cov = coverage(ref, mean, std, levels, df)
    return float(np.mean([abs(c - lv) for lv, c in cov.items()]))


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties averaged."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(x.numpy()), dtype=torch.float64)


def spearman(a, b) -> float:
    """Spearman rank correlation of two arrays (ties get average ranks)."""
    a, b = _same(a, b)
    ra, rb = _rank(a.reshape(-1)), _rank(b.reshape(-1))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def crps_gaussian(ref, mean, std, eps: float = 1e-12) -> float:
    """Mean CRPS of N(mean, std²) at ref (closed form; reduces to |ref − mean| as std → 0)."""
    ref, mean, std = _same(ref, mean, std)
    s = std.clamp(min=eps)
    t = (ref - mean) / s
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return float((s * (t * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean())


class PatchCovariance:
    """Streaming second moments of non-overlapping patches of zero-mean image samples.

    For each patch P (p×p in 2D, p×p×p in 3D; edge remainders dropped) it keeps Σ_k x_k,P x_k,Pᵀ
    in float64. Memory is n_patches · (p^ndim)² numbers: e.g. a 128³ volume with p = 4 gives
    32768 patches of 64 voxels = 134 M numbers; use ``max_patches`` to keep a fixed random subset.
    """

    def __init__(self, shape, patch: int = 8, max_patches: int | None = None,
                 generator: torch.Generator | None = None):
        self.shape = tuple(shape)
        self.patch = int(patch)
        if any(s < self.patch for s in self.shape):
            raise DipuqError(f"patch size {patch} is larger than the image {self.shape}")
        self.grid = tuple(s // self.patch for s in self.shape)
        n = math.prod(self.grid)
        idx = torch.arange(n)
        if max_patches is not None and max_patches < n:
            idx = torch.randperm(n, generator=generator)[:max_patches].sort().values
        self.index = idx
        P = self.patch ** len(self.shape)
        self.n = 0
        self.S = torch.zeros(len(idx), P, P, dtype=torch.float64)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(b, *shape) -> (b, n_patches_kept, P)."""
        x = _t(x)
        b, p, nd = x.shape[0], self.patch, len(self.shape)
        crop = x[(slice(None),) + tuple(slice(0, g * p) for g in self.grid)]
        if nd == 2:
            gy, gx = self.grid
            t = crop.reshape(b, gy, p, gx, p).permute(0, 1, 3, 2, 4).reshape(b, gy * gx, p * p)
        else:
            gz, gy, gx = self.grid
            t = crop.reshape(b, gz, p, gy, p, gx, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, gz * gy * gx, p**3)
        return t[:, self.index]

    def update(self, samples) -> PatchCovariance:
        x = _t(samples)
        if tuple(x.shape) == self.shape:
            x = x[None]
        t = self.patches(x)  # shape: (b, n_patches, P)
        self.S += torch.einsum("bnp,bnq->npq", t, t)
        self.n += x.shape[0]
        return self

    def merge(self, other: PatchCovariance) -> PatchCovariance:
        if other.S.shape != self.S.shape or not torch.equal(other.index, self.index):
            raise DipuqError("cannot merge patch covariances of different layouts")
        self.S += other.S
        self.n += other.n
        return self

    def covariance(self) -> torch.Tensor:
        if self.n < 1:
            raise DipuqError("patch covariance needs at least one sample")
        return self.S / self.n


def patch_log_likelihood(ref, mean, cov: PatchCovariance, jitter: float = 1e-6) -> float:
    """Mean over patches of log N(ref_P; mean_P, Σ_P + jitter·I) / P (per-voxel units).

    ``jitter`` (an absolute variance) keeps Σ_P positive definite when there are fewer samples
    than voxels per patch.
    """
    ref, mean = _same(ref, mean)
    if tuple(ref.shape) != cov.shape:
        raise DipuqError(f"reference shape {tuple(ref.shape)} does not match patch layout {cov.shape}")
    r = cov.patches((ref - mean)[None])[0]  # shape: (n_patches, P)
    S = cov.covariance()
    P = S.shape[-1]
    S = S + jitter * torch.eye(P, dtype=S.dtype)
    L, info = torch.linalg.cholesky_ex(S)
    if (info != 0).any():
        raise DipuqError("patch covariance is not positive definite: increase jitter or the number of samples")
    a = torch.linalg.solve_triangular(L, r[..., None], upper=False)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    ll = -0.5 * (a.pow(2).sum(-1) + logdet + P * math.log(2 * math.pi))
    return float((ll / P).mean())


def uncertainty_metrics(ref, mean, std, levels=DEFAULT_LEVELS, data_range: float | None = None, *,
                        mask=None, df: float | None = None) -> dict:
    """All voxel-wise metrics in one dict (PSNR, SSIM, log-likelihood, coverage, calibration, ...).

    ``mask`` (boolean, image shape) restricts every metric but SSIM (a windowed image measure,
    computed on the whole image) to the voxels it marks, e.g. the region every projection angle
    sees; ``df`` gives the Student-t interval shape of calibrated maps (log-likelihood, coverage
    and calibration error use it; CRPS stays Gaussian).
    """
    ref_t, mean_t, std_t = _same(ref, mean, std)
    out = {}
    if ref_t.ndim in (2, 3) and min(ref_t.shape) >= 11:
        out["ssim"] = ssim(mean_t, ref_t, data_range)
    if mask is not None:
        keep = torch.as_tensor(np.asarray(mask, dtype=bool).reshape(tuple(ref_t.shape)))
        if not keep.any():
            raise DipuqError("the metrics mask selects no voxel")
        ref_t, mean_t, std_t = ref_t[keep], mean_t[keep], std_t[keep]
    out = {"psnr": psnr(mean_t, ref_t, data_range), **out}
    out["log_likelihood"] = log_likelihood(ref_t, mean_t, std_t, df)
    for lv, c in coverage(ref_t, mean_t, std_t, levels, df).items():
        out[f"coverage_{round(lv * 100)}"] = c
    out["calibration_error"] = calibration_error(ref_t, mean_t, std_t, df=df)
    out["spearman_std_abs_error"] = spearman(std_t, (ref_t - mean_t).abs())
    out["crps"] = crps_gaussian(ref_t, mean_t, std_t)
    return out
