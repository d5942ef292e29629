"""Every structure at matched budgets, on MNIST and on planted structures: error and fit time.

(Over 600 lines: the datasets, orderings, summary and plot of one experiment.)

Structures (each at the largest configuration within the dataset's budget; the
best over a small set of grids ``K`` is kept, and every row names its
configuration and exact parameter count):

- ``global`` (LoRA), ``diagonal`` (MELoRA, best ``N``), ``block`` (Localized
  LoRA, best ``K``; uniform rank and the budget-optimal per-block ranks);
- ``hybrid`` (blocks plus a global term, the block part taking about half the
  budget) and ``BLAST`` (shared bases), fitted by their iterative algorithms;
- permuted layouts of the block structure: ``strided`` (Monarch: index ``t`` to
  group ``t mod K``), ``image patches`` (the pixel columns of the MNIST data
  matrix grouped into 2-D tiles instead of row stripes), the data-driven
  ``cluster`` ordering (:func:`~blocklowrank.permutations.cluster_permutation`
  of the rows and of the columns) and, for the diagonal structure, the
  ``cocluster`` ordering; on the data matrix also the rows sorted by digit label
  (an oracle ordering, as a reference for what an ordering could gain).

Datasets:

- ``MNIST digits``: the first ``n_digits`` test digits (200 by default: the
  hybrid's exact SVD steps and a k-means per digit for the data-driven orderings
  bound the time; the study has the paper's structures on all 10,000 and BLAST
  on 2,000), each 28 x 28 matrix approximated on its own at the paper's budget
  224 (errors averaged over the digits; stacks are fitted in batch). With
  ``n_cluster_digits`` below ``n_digits`` the per-digit orderings run on the
  first ``n_cluster_digits`` only and are compared with the natural order on
  those same digits.
- ``MNIST data matrix``: the first ``n_rows`` test digits as rows, the 784
  pixels as columns, budget that of global rank 16.
- planted structures (:func:`blocklowrank.testing.generators.planted_matrix`, 10% noise)
  at 64 x 64 (budget 1024 = global rank 8) and 256 x 256 (budget 8192 = global
  rank 16): global, diagonal (N=4), block (2 x 2) and shared-basis (2 x 2)
  structures with ranks that spend the budget (BLAST: the largest rank that
  fits), and the diagonal structure with its rows and columns shuffled (a hidden
  ordering that a data-driven ordering could recover).

Errors are relative Frobenius errors ``||X - X_hat|| / ||X||`` (on a stack, the
mean over the matrices). The errors of the SVD-based structures come from block
spectra (exact by Eckart-Young) and are checked against the timed fit
(:func:`~blocklowrank.approximate`); the iterative ones are the fits'
own errors. Fit times are wall-clock times of one fit of the chosen
configuration (for a stack: the whole stack), with BLAS held to one thread
(OpenBLAS with two threads on a loaded two-core machine is erratic); the time
to compute a data-driven ordering is reported separately.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .._engine import block_spectra
from .._extras import pyplot_agg
from .._io import atomic_write_csv, save_figure
from ..budget import match_budget
from ..datasets import load_mnist_split
from ..layout import BlockLayout
from ..permutations import cluster_permutation, cocluster_permutations, image_patch_permutation, strided_permutation
from ..structures import approximate, fit_hybrid, fit_shared_basis, get_structure
from ..testing.generators import planted_matrix

DIGIT_BUDGET = 224
N_DIGITS = 200
N_CLUSTER_DIGITS = None  # per-digit orderings on all the digits
N_ROWS = 1000
DATA_RANK = 16  # the data matrix's budget is that of global rank 16
SYNTHETIC_SIZES = (64, 256)
NOISE = 0.1
SEED = 0

#: Tiles (height, width) of a 28 x 28 image giving K equal groups of pixels.
PATCH_TILES = {2: (14, 28), 4: (14, 14), 8: (7, 14), 16: (7, 7)}
#: Column groupings compared on the data matrix: row stripes vs tiles at these K.
PATCH_K = (4, 16)

#: Row order of the output (structure, ordering, allocation) and the label shown.
ROW_LABELS = {
    ("global", "natural", "uniform"): "global (LoRA)",
    ("diagonal", "natural", "uniform"): "diagonal (MELoRA)",
    ("block", "natural", "uniform"): "block, uniform",
    ("block", "natural", "optimal"): "block, optimal ranks",
    ("hybrid", "natural", "uniform"): "hybrid (blocks + global)",
    ("BLAST", "natural", "uniform"): "BLAST (shared bases)",
    ("block", "strided", "uniform"): "block, strided (Monarch)",
    ("block", "strided", "optimal"): "block, strided, optimal",
    ("block", "stripes@4", "uniform"): "block K=4, row stripes",
    ("block", "patches@4", "uniform"): "block K=4, 14x14 image patches",
    ("block", "stripes@4", "optimal"): "block K=4, row stripes, optimal",
    ("block", "patches@4", "optimal"): "block K=4, 14x14 patches, optimal",
    ("block", "stripes@16", "uniform"): "block K=16, row stripes",
    ("block", "patches@16", "uniform"): "block K=16, 7x7 image patches",
    ("block", "stripes@16", "optimal"): "block K=16, row stripes, optimal",
    ("block", "patches@16", "optimal"): "block K=16, 7x7 patches, optimal",
    ("block", "cluster", "uniform"): "block, cluster order",
    ("block", "cluster", "optimal"): "block, cluster order, optimal",
    ("diagonal", "cocluster", "uniform"): "diagonal, cocluster order",
    ("block", "label", "uniform"): "block, rows by label (oracle)",
    ("block", "label", "optimal"): "block, rows by label, optimal",
    # the natural order on the digits that get per-digit orderings (like-for-like)
    ("block", "natural-subset", "uniform"): "block, uniform (same digits)",
    ("block", "natural-subset", "optimal"): "block, optimal (same digits)",
    ("diagonal", "natural-subset", "uniform"): "diagonal (same digits)",
}

#: Row groups of the figure (separated by lines).
GROUP_OF = {}
for _key, _lab in ROW_LABELS.items():
    GROUP_OF[_lab] = (
        "paper"
        if _key[0] in ("global", "diagonal", "block") and _key[1] == "natural"
        else "beyond"
        if _key[1] == "natural"
        else {"stripes": "patches", "cocluster": "cluster"}.get(_key[1].split("@")[0], _key[1].split("@")[0])
    )

FIELDS = (
    "dataset",
    "shape",
    "n_matrices",
    "budget",
    "structure",
    "ordering",
    "allocation",
    "label",
    "config",
    "n_params",
    "error",
    "error_median",
    "error_p10",
    "error_p90",
    "fit_seconds",
    "fit_ms_per_matrix",
    "ordering_seconds",
    "passes",
    "check",
)


def _say(progress, msg):
    if progress:
        print(msg, flush=True)


# ---------------------------------------------------------------------------- datasets
def _planted(d, budget, seed):
    """Planted structures spending ``budget`` on a d x d matrix, plus a shuffled diagonal."""
    r_glob = budget // (2 * d)  # global rank whose count is the budget
    sb = budget // (2 * d + 4)  # largest BLAST rank of a 2 x 2 grid within the budget
    specs = [
        ("global", dict(structure="global", rank=r_glob)),
        ("diagonal", dict(structure="diagonal", n_blocks=4, rank=r_glob)),  # 2 d r = budget
        ("block", dict(structure="block", n_blocks=2, rank=r_glob // 2)),  # 2 * 2 d r = budget
        ("shared_basis", dict(structure="shared_basis", n_blocks=2, rank=sb)),
    ]
    out = []
    for t, (name, kw) in enumerate(specs):
        X, info = planted_matrix((d, d), noise=NOISE, random_state=seed + t, **kw)
        r = info.layout.uniform_rank
        desc = {
            "global": f"rank {r}",
            "diagonal": f"4 diagonal blocks of rank {r}",
            "block": f"2x2 blocks of rank {r}",
            "shared_basis": f"2x2 shared bases, rank {r}",
        }[name]
        out.append((f"planted {name} {d}x{d}", X, f"{desc} + {NOISE:.0%} noise"))
        if name == "diagonal":
            rng = np.random.default_rng(seed + 100)
            Xs = X[rng.permutation(d)][:, rng.permutation(d)]
            out.append(
                (f"planted diagonal, shuffled {d}x{d}", Xs, f"{desc} + {NOISE:.0%} noise, rows and columns shuffled")
            )
    return out


# ---------------------------------------------------------------------------- helpers
def _layout(method, shape, K):
    return get_structure(method).layout(shape, K)


def _uniform_rank(method, shape, K, budget):
    try:
        recs = match_budget(shape, budget, methods=[method], n_blocks=[K])
    except ValueError:
        return None, None
    return (recs[0]["rank"], recs[0]["n_params"]) if recs else (None, None)


def _stats(e):
    e = np.atleast_1d(np.asarray(e, dtype=np.float64))
    return dict(
        error=float(e.mean()),
        error_median=float(np.median(e)),
        error_p10=float(np.percentile(e, 10)),
        error_p90=float(np.percentile(e, 90)),
    )


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _spectral_rows(X, budget, method, ks, ordering, allocations=("uniform", "optimal")):
    """Best K for the uniform rank and for the optimal allocation, from block spectra.

    ``X`` is a stack (N, m, n) already in the ordering's coordinates. Returns a list
    of row dicts with the per-matrix errors under ``errors`` and the best
    configuration's fit timed with :func:`approximate` (whose error is recorded in
    ``check`` as the largest difference from the spectral error).
    """
    shape = X.shape[-2:]
    best = {}
    for K in ks:
        if K > min(shape):
            continue
        lay = _layout(method, shape, K)
        sp = block_spectra(X, lay)
        if "uniform" in allocations:
            r, n_params = _uniform_rank(method, shape, K, budget)
            if r is not None:
                e = sp.error(r)
                if "uniform" not in best or e.mean() < best["uniform"]["errors"].mean():
                    best["uniform"] = dict(K=K, r=r, errors=e, n_params=n_params)
        if "optimal" in allocations and budget <= lay.full_rank_params:
            R, _ = sp.allocate(budget)
            e = sp.error(R)
            if "optimal" not in best or e.mean() < best["optimal"]["errors"].mean():
                best["optimal"] = dict(K=K, errors=e, n_params=int(np.max(sp.n_params(R))))
    rows = []
    for alloc in allocations:
        if alloc not in best:
            continue
        b = best[alloc]
        K = b["K"]
        name = "N" if method == "diagonal" else "K"
        if alloc == "uniform":
            cfg = f"{name}={K} r={b['r']}" if method != "global" else f"r={b['r']}"
            res, secs = _timed(lambda: approximate(X, _layout(method, shape, K).with_ranks(b["r"])))
        else:
            cfg = f"{name}={K}, per-block ranks within {budget}"
            res, secs = _timed(lambda: approximate(X, _layout(method, shape, K), budget=budget))
        _ = res.reconstruction
        check = float(np.max(np.abs(np.asarray(res.error) - b["errors"])))
        rows.append(
            dict(
                structure=method,
                ordering=ordering,
                allocation=alloc,
                config=cfg,
                n_params=b["n_params"],
                errors=b["errors"],
                fit_seconds=secs,
                check=check,
            )
        )
    return rows


def _global_row(X, budget):
    shape = X.shape[-2:]
    r, n_params = _uniform_rank("global", shape, 1, budget)
    res, secs = _timed(lambda: approximate(X, BlockLayout.global_(shape, r)))
    _ = res.reconstruction
    return dict(
        structure="global",
        ordering="natural",
        allocation="uniform",
        config=f"r={r}",
        n_params=n_params,
        errors=np.asarray(res.error),
        fit_seconds=secs,
        check=0.0,
    )


def _blast_row(X, budget, ks, n_jobs):
    shape = X.shape[-2:]
    recs = match_budget(shape, budget, methods=["shared_basis"], n_blocks=[k for k in ks if k <= min(shape)])
    best = None
    for rec in recs:
        res, secs = _timed(lambda: fit_shared_basis(X, rec["n_blocks"], rec["rank"], n_jobs=n_jobs))
        if best is None or res.error.mean() < best[0].error.mean():
            best = (res, secs, rec)
    res, secs, rec = best
    tried = ", ".join(f"K={r['n_blocks']}" for r in recs)
    return dict(
        structure="BLAST",
        ordering="natural",
        allocation="uniform",
        config=f"K={rec['n_blocks']} r={rec['rank']} (best of {tried})",
        n_params=rec["n_params"],
        errors=np.asarray(res.error),
        fit_seconds=secs,
        passes=float(np.mean(res.n_iter)),
        check=0.0,
    )


def _hybrid_row(X, budget, ks, fit_options):
    """Hybrid: for every K in ks, the configuration whose block part is closest to half the budget."""
    shape = X.shape[-2:]
    try:
        recs = match_budget(shape, budget, methods=["hybrid"], n_blocks=[k for k in ks if k <= min(shape)])
    except ValueError:
        return None
    cands = {}
    for rec in recs:
        share = (rec["n_params"] - rec["global_rank"] * sum(shape)) / budget
        if rec["n_blocks"] not in cands or abs(share - 0.5) < cands[rec["n_blocks"]][0]:
            cands[rec["n_blocks"]] = (abs(share - 0.5), rec)
    best = None
    for _, rec in cands.values():
        lay = BlockLayout.block(shape, rec["n_blocks"], rank=rec["rank"])
        res, secs = _timed(lambda: fit_hybrid(X, lay, rec["global_rank"], **fit_options))
        if best is None or np.mean(res.error) < np.mean(best[0].error):
            best = (res, secs, rec)
    if best is None:
        return None
    res, secs, rec = best
    tried = ", ".join(f"K={c['n_blocks']} r={c['rank']}+g{c['global_rank']}" for _, c in cands.values())
    return dict(
        structure="hybrid",
        ordering="natural",
        allocation="uniform",
        config=f"K={rec['n_blocks']} r={rec['rank']} + global r={rec['global_rank']} (best of {tried})",
        n_params=rec["n_params"],
        errors=np.asarray(res.error),
        fit_seconds=secs,
        passes=float(np.mean(res.n_iter)),
        check=0.0,
    )


def _permute_each(X, perms):
    """Stack with every matrix t reordered by its own (row_perm, col_perm)."""
    return np.stack([x[rp][:, cp] for x, (rp, cp) in zip(X, perms)])


# ---------------------------------------------------------------------------- per dataset
def _structures_of(
    name,
    X,
    budget,
    *,
    ks,
    blast_ks,
    hybrid_ks,
    note,
    orderings,
    n_jobs,
    fit_options,
    progress,
    n_ordering=None,
    labels=None,
    image_shape=None,
):
    """All rows of one dataset. X: stack (N, m, n) (N = 1 for a single matrix)."""
    t0 = time.perf_counter()
    shape = X.shape[-2:]
    rows = [_global_row(X, budget)]
    rows += _spectral_rows(X, budget, "diagonal", ks, "natural", allocations=("uniform",))
    rows += _spectral_rows(X, budget, "block", ks, "natural")
    hy = _hybrid_row(X, budget, hybrid_ks, fit_options)
    if hy is not None:
        rows.append(hy)
    rows.append(_blast_row(X, budget, blast_ks, n_jobs))
    m, n = shape
    for ordering in orderings:
        if ordering == "strided":
            rows += _ordered_block_rows(
                X, budget, ks, "strided", lambda K: (strided_permutation(m, K), strided_permutation(n, K))
            )
        elif ordering == "patches":
            # row stripes (the natural pixel order) against 2-D tiles, at the same K (at K=2
            # both are the image's halves, so K=4 and K=16 are compared)
            h, w = image_shape
            for K in PATCH_K:
                tile = PATCH_TILES[K]
                cp = image_patch_permutation(h, w, tile)
                for tag, perm in ((f"stripes@{K}", np.arange(n)), (f"patches@{K}", cp)):
                    new = _ordered_block_rows(X, budget, [K], tag, lambda K, perm=perm: (np.arange(m), perm))
                    for r in new:
                        r["config"] += (
                            f", {tile[0]}x{tile[1]} tiles"
                            if tag.startswith("patches")
                            else f", stripes of {h * w // K} pixels ({h / K:g} image rows)"
                        )
                    rows += new
        elif ordering == "label":
            rp = np.argsort(labels, kind="stable")
            rows += _ordered_block_rows(X, budget, ks, "label", lambda K: (rp, np.arange(n)))
        elif ordering == "cluster":
            rows += _cluster_rows(X, budget, ks, n_ordering)
    for r in rows:
        r["dataset"] = name
        r["shape"] = f"{m}x{n}"
        r["n_matrices"] = int(np.size(r["errors"]))
        r["budget"] = budget
        r["note"] = note
    _say(progress, f"  {name}: {len(rows)} rows ({time.perf_counter() - t0:.1f} s)")
    return rows


def _ordered_block_rows(X, budget, ks, ordering, perms_for):
    """Block rows (uniform, optimal) under one shared ordering per K; the best K is kept."""
    out = []
    for K in ks:
        if K > min(X.shape[-2:]):
            continue
        rp, cp = perms_for(K)
        Xp = X[:, rp][:, :, cp]
        rows = _spectral_rows(Xp, budget, "block", [K], ordering)
        for r in rows:
            r["config"] += " (rows and columns reordered)" if ordering == "strided" else ""
        out += rows
    return _best_per_allocation(out)


def _best_per_allocation(rows):
    best = {}
    for r in rows:
        key = (r["structure"], r["allocation"])
        if key not in best or np.mean(r["errors"]) < np.mean(best[key]["errors"]):
            best[key] = r
    return list(best.values())


def _cluster_rows(X, budget, ks, n_ordering):
    """Data-driven orderings (k-means on singular coordinates), computed per matrix.

    With ``n_ordering`` below the stack size only the first ``n_ordering`` matrices
    get them (a k-means per matrix) and the natural order on those same matrices is
    added for comparison.
    """
    N = X.shape[0]
    sub = X[: min(N, n_ordering)] if n_ordering else X
    out = []
    t_order = 0.0
    for K in ks:
        if K > min(X.shape[-2:]):
            continue
        t0 = time.perf_counter()
        perms = [(cluster_permutation(x, K, axis=0), cluster_permutation(x, K, axis=1)) for x in sub]
        t_order_K = time.perf_counter() - t0
        rows = _spectral_rows(_permute_each(sub, perms), budget, "block", [K], "cluster")
        for r in rows:
            r["ordering_seconds"] = t_order_K
        out += rows
        t0 = time.perf_counter()
        coperms = [cocluster_permutations(x, K) for x in sub]
        t_co = time.perf_counter() - t0
        rows = _spectral_rows(
            _permute_each(sub, coperms), budget, "diagonal", [K], "cocluster", allocations=("uniform",)
        )
        for r in rows:
            r["ordering_seconds"] = t_co
        out += rows
        t_order += t_order_K + t_co
    out = _best_per_allocation(out)
    if sub.shape[0] < N:  # like-for-like: the natural order on the same matrices
        out += _spectral_rows(sub, budget, "block", ks, "natural-subset")
        out += _spectral_rows(sub, budget, "diagonal", ks, "natural-subset", allocations=("uniform",))
    return out


# ---------------------------------------------------------------------------- the experiment
def compute_structures(
    images, labels, *, n_digits=N_DIGITS, n_cluster_digits=N_CLUSTER_DIGITS, n_rows=N_ROWS,
    synthetic_sizes=SYNTHETIC_SIZES, hybrid_max_iter=None, seed=SEED, n_jobs=-1, progress=True,
):  # fmt: skip
    """Rows (one per dataset and structure) with errors, configurations and fit times.

    Parameters
    ----------
    images, labels : MNIST test images (N, 28, 28) and labels.
    n_digits : int
        Digits of the per-digit dataset (the first ones).
    n_cluster_digits : int
        Of those, how many get per-digit data-driven orderings.
    n_rows : int
        Digits (rows) of the data matrix (0: no data matrix).
    synthetic_sizes : sequence of int
        Sides of the planted matrices (empty: none).
    hybrid_max_iter : int, optional
        Cap on the hybrid's alternations (default: its own, 100).

    Returns
    -------
    dict with ``rows`` (list of dict, see ``FIELDS``; ``errors`` holds the
    per-matrix errors) and ``seconds``.
    """
    t0 = time.perf_counter()
    fit_options = {} if hybrid_max_iter is None else {"max_iter": int(hybrid_max_iter)}
    images = np.asarray(images)
    labels = np.asarray(labels)
    rows = []
    with threadpool_limits(limits=1), warnings.catch_warnings():
        # k-means on the rows of a digit: empty rows are duplicate points (fewer distinct clusters)
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        if n_digits:
            D = images[:n_digits].astype(np.float64)
            rows += _structures_of(
                f"MNIST digits ({D.shape[0]} x 28x28)",
                D,
                DIGIT_BUDGET,
                ks=(2, 3, 4, 7),
                blast_ks=(2, 4, 7),
                hybrid_ks=(2, 3),
                note="each digit on its own",
                orderings=("strided", "cluster"),
                n_jobs=n_jobs,
                fit_options=fit_options,
                progress=progress,
                n_ordering=n_cluster_digits,
            )
        if n_rows:
            A = (images[:n_rows].reshape(n_rows, -1).astype(np.float64) / 255.0)[None]
            budget = DATA_RANK * (A.shape[1] + A.shape[2])
            rows += _structures_of(
                f"MNIST data matrix ({n_rows}x784)",
                A,
                budget,
                ks=(2, 4, 8, 16),
                blast_ks=(2, 4, 8),
                hybrid_ks=(2,),
                note="digits as rows, pixels as columns",
                orderings=("strided", "patches", "cluster", "label"),
                n_jobs=n_jobs,
                fit_options=fit_options,
                progress=progress,
                labels=labels[:n_rows],
                image_shape=(28, 28),
            )
        for d in synthetic_sizes:
            budget = 2 * d * (8 if d <= 64 else 16)  # global rank 8 (64 x 64) or 16 (256 x 256)
            for name, X, note in _planted(d, budget, seed):
                rows += _structures_of(
                    name,
                    X[None],
                    budget,
                    ks=(2, 4, 8),
                    blast_ks=(2, 4, 8),
                    hybrid_ks=(2, 4) if d <= 64 else (2,),
                    note=note,
                    orderings=("strided", "cluster"),
                    n_jobs=n_jobs,
                    fit_options=fit_options,
                    progress=progress,
                )
    order = {k: t for t, k in enumerate(ROW_LABELS)}
    for r in rows:
        key = (r["structure"], r["ordering"], r["allocation"])
        r["label"] = ROW_LABELS[key]
        r.update(_stats(r["errors"]))
        r["fit_ms_per_matrix"] = 1e3 * r["fit_seconds"] / r["n_matrices"]
        r.setdefault("ordering_seconds", 0.0)
        r.setdefault("passes", None)
        r["_order"] = order[key]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    rows.sort(key=lambda r: (datasets.index(r["dataset"]), r["_order"]))
    return dict(rows=rows, datasets=datasets, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------- reporting
#: A change of the error below this fraction counts as "about the same" in the verdict.
SAME = 0.01


def ordering_verdict(result):
    """Does the data-driven ordering lower the error at equal budget? Lines per dataset.

    On the same matrices and at the same budget: the best block layout (uniform
    ranks, and budget-optimal ranks) under the cluster ordering against the best
    under the natural order, the cocluster diagonal against the natural diagonal,
    and the lowest error of any ordered layout against the lowest of any
    natural-order block or diagonal layout. A change within 1% counts as the same.

    Returns
    -------
    lines : list of str
    counts : dict
        ``{"lower": int, "same": int, "higher": int}`` over the first three kinds
        of comparison.
    best : list of (dataset, natural best, ordered best)
    """
    lines, best = [], []
    counts = {"lower": 0, "same": 0, "higher": 0}
    by = {(r["dataset"], r["structure"], r["ordering"], r["allocation"]): r for r in result["rows"]}

    def verdict(a, b):
        rel = (b - a) / a if a > 0 else 0.0
        return "same" if abs(rel) <= SAME else ("lower" if rel < 0 else "higher"), rel

    for ds in result["datasets"]:
        nat = "natural-subset" if (ds, "block", "natural-subset", "uniform") in by else "natural"
        parts = []
        for struct, ordk, alloc in (
            ("block", "cluster", "uniform"),
            ("block", "cluster", "optimal"),
            ("diagonal", "cocluster", "uniform"),
        ):
            a, b = by.get((ds, struct, nat, alloc)), by.get((ds, struct, ordk, alloc))
            if a is None or b is None:
                continue
            v, rel = verdict(a["error"], b["error"])
            counts[v] += 1
            what = f"{struct} {alloc}" if struct == "block" else "diagonal"
            parts.append(f"{what} {a['error']:.4f} -> {b['error']:.4f} ({rel:+.0%}, {v})")
        if not parts:
            continue
        nat_best = min(
            r["error"] for k, r in by.items() if k[0] == ds and k[2] == nat and k[1] in ("block", "diagonal")
        )
        ord_best = min(r["error"] for k, r in by.items() if k[0] == ds and k[2] in ("cluster", "cocluster"))
        best.append((ds, nat_best, ord_best))
        v, rel = verdict(nat_best, ord_best)
        n = by[(ds, "block", "cluster", "uniform")]["n_matrices"]
        lines.append(
            f"    {ds} [{n} matri{'ces' if n > 1 else 'x'}]: "
            + "; ".join(parts)
            + f". Best layout: {nat_best:.4f} natural vs {ord_best:.4f} ordered ({v})."
        )
    return lines, counts, best


def summarize_structures(result):
    rows = result["rows"]
    lines = ["Structures at matched budgets (relative Frobenius error; mean over the matrices of a stack):"]
    for ds in result["datasets"]:
        rs = [r for r in rows if r["dataset"] == ds]
        best = min(rs, key=lambda r: r["error"])
        lines.append(f"  {ds}, budget {rs[0]['budget']} ({rs[0]['note']}):")
        for r in rs:
            mark = "  <- lowest" if r is best else ""
            extra = f", ordering {r['ordering_seconds']:.2f} s" if r["ordering_seconds"] else ""
            lines.append(
                f"    {r['label']:<32} {r['error']:.4f}  {r['n_params']:>6} params  "
                f"{r['fit_seconds']:7.3f} s{extra}   [{r['config']}]{mark}"
            )
    vlines, counts, best = ordering_verdict(result)
    total = sum(counts.values())
    lower = [ds for ds, nb, o in best if o < nb * (1 - SAME)]
    higher = [ds for ds, nb, o in best if o > nb * (1 + SAME)]
    answer = "Yes" if counts["lower"] == total else "No" if counts["lower"] == 0 else "Not in general"
    lines.append(
        f"Does the data-driven ordering lower the error at equal budget? {answer}. Same matrices, same budget, "
        f"cluster/cocluster order vs natural order: lower in {counts['lower']}, about the same (within "
        f"{SAME:.0%}) in {counts['same']}, higher in {counts['higher']} of {total} comparisons."
    )
    lines.append(
        f"  The best layout of a dataset gets lower with an ordering on {len(lower)} of {len(best)} datasets "
        f"({', '.join(lower) or 'none'}) and higher on {len(higher)} ({', '.join(higher) or 'none'})."
    )
    lines += _hidden_order_line(result)
    lines += vlines
    return lines


def _hidden_order_line(result):
    """Whether the ordering recovers a shuffled planted diagonal (error near the unshuffled one)."""
    by = {(r["dataset"], r["structure"], r["ordering"], r["allocation"]): r for r in result["rows"]}
    out = []
    for ds in result["datasets"]:
        if ", shuffled" not in ds:
            continue
        plain = ds.replace(", shuffled", "")
        ref = by.get((plain, "diagonal", "natural", "uniform"))
        got = [r["error"] for k, r in by.items() if k[0] == ds and k[2] in ("cluster", "cocluster")]
        if ref is None or not got:
            continue
        ok = min(got) <= 1.5 * ref["error"]
        out.append(
            f"  Hidden ordering ({ds}): the unshuffled diagonal fits to {ref['error']:.4f}; after shuffling, "
            f"the best ordered layout reaches {min(got):.4f}: the ordering "
            f"{'recovers' if ok else 'does not recover'} the planted blocks."
        )
    return out


def write_structures(result, out_dir):
    path = Path(out_dir) / "structures.csv"
    rows = []
    for r in result["rows"]:
        row = dict(r)
        for k in ("error", "error_median", "error_p10", "error_p90", "check"):
            row[k] = f"{r[k]:.6g}"
        for k in ("fit_seconds", "ordering_seconds", "fit_ms_per_matrix"):
            row[k] = f"{r[k]:.4g}"
        row["passes"] = "" if r["passes"] is None else f"{r['passes']:.1f}"
        rows.append(row)
    atomic_write_csv(path, rows, FIELDS, extrasaction="ignore")
    return path


def plot_structures(result, path):
    """Heatmap of error (structure x dataset; colour: error relative to the column's best) and fit times."""
    plt = pyplot_agg()
    rows = result["rows"]
    datasets = result["datasets"]
    labels = [lab for lab in ROW_LABELS.values() if any(r["label"] == lab for r in rows)]
    E = np.full((len(labels), len(datasets)), np.nan)
    T = np.full((len(labels), len(datasets)), np.nan)
    for r in rows:
        i, j = labels.index(r["label"]), datasets.index(r["dataset"])
        E[i, j] = r["error"]
        T[i, j] = r["fit_seconds"] + r["ordering_seconds"]
    rel = E / np.nanmin(E, axis=0, keepdims=True)
    fig, (ax1, ax2) = plt.subplots(
        1,
        2,
        figsize=(19, 0.42 * len(labels) + 3.2),
        constrained_layout=True,
        gridspec_kw=dict(width_ratios=[len(datasets), 4.5]),
    )
    im = ax1.imshow(np.log2(rel), cmap="RdYlGn_r", vmin=0, vmax=3, aspect="auto")
    ax1.set_facecolor("#eeeeee")  # grey: not applicable to that dataset
    groups = [GROUP_OF.get(lab, "") for lab in labels]
    for i in range(1, len(labels)):
        if groups[i] != groups[i - 1]:
            ax1.axhline(i - 0.5, color="k", lw=1.2)
            ax2.axhline(i - 0.5, color="k", lw=0.8)
    for i in range(len(labels)):
        for j in range(len(datasets)):
            if np.isfinite(E[i, j]):
                best = rel[i, j] <= 1 + 1e-9
                ax1.text(
                    j,
                    i,
                    f"{E[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    fontweight="bold" if best else "normal",
                )
    short = [
        d.replace("planted ", "").replace("MNIST ", "MNIST\n").replace(", shuffled", "\nshuffled").replace(" (", "\n(")
        for d in datasets
    ]
    ax1.set_xticks(range(len(datasets)), short, fontsize=7)
    ax1.set_yticks(range(len(labels)), labels, fontsize=8)
    ax1.set_title(
        "Relative error at matched budgets (bold: lowest of the column; "
        "colour: error / column's lowest, log scale; grey: not applicable)",
        fontsize=9,
    )
    cb = fig.colorbar(im, ax=ax1, fraction=0.025, pad=0.01)
    cb.set_ticks([0, 1, 2, 3], labels=["1x", "2x", "4x", ">=8x"])
    med = np.nanmedian(T, axis=1)
    lo, hi = np.nanmin(T, axis=1), np.nanmax(T, axis=1)
    y = np.arange(len(labels))
    ax2.barh(y, med, color="#888", height=0.6)
    ax2.errorbar(med, y, xerr=[med - lo, hi - med], fmt="none", ecolor="k", lw=0.8, capsize=2)
    ax2.set_xscale("log")
    ax2.set_yticks(y, [])
    ax2.set_ylim(len(labels) - 0.5, -0.5)
    ax2.set_xlabel("fit time, s (median over datasets; bars: min-max)\nincl. computing the ordering")
    ax2.set_title("Fit time (BLAS on one thread)", fontsize=9)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def run_structures(
    out_dir,
    *,
    progress=True,
    data=None,
    n_digits=N_DIGITS,
    n_cluster_digits=N_CLUSTER_DIGITS,
    n_rows=N_ROWS,
    synthetic_sizes=SYNTHETIC_SIZES,
    hybrid_max_iter=None,
):
    """Load MNIST, compare every structure, write structures.csv and figure_structures.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_split("test") if data is None else data
    _say(progress, "structures: every structure at matched budgets")
    result = compute_structures(
        images,
        labels,
        n_digits=n_digits,
        n_cluster_digits=n_cluster_digits,
        n_rows=n_rows,
        synthetic_sizes=synthetic_sizes,
        hybrid_max_iter=hybrid_max_iter,
        progress=progress,
    )
    paths = [write_structures(result, out_dir), plot_structures(result, out_dir / "figure_structures.png")]
    if progress:
        print("\n".join(summarize_structures(result)))
        print(f"  (computed in {result['seconds']:.1f} s)")
    return paths


__all__ = [
    "compute_structures",
    "summarize_structures",
    "ordering_verdict",
    "write_structures",
    "plot_structures",
    "run_structures",
]
