"""The report's numbers as tables: finished trials grouped into arms (one table row each), the claims
checked between arms, mismatch-metric correlations, and their markdown / CSV text.

Pure Python on the row dicts ``sweep_results.summarize`` returns and the parent run's tags: no MLflow,
no torch, no matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from encmm.orchestrator import evidence
from encmm.trainables.config import ConfigError

GROUP_KEYS = ("student.remedy", "kd.alpha", "kd.beta", "student.width")
LABEL_PREFIX = {"student.remedy": "", "kd.alpha": "α=", "kd.beta": "β=", "student.width": "width "}
MISMATCH_KEYS = ("diag/svd_rank_p99/0.99", "diag/pca_rank_p99/0.99", "diag/sep_ratio_90", "diag/feat_mse")
REMEDY_ORDER = ("none", "lift", "widelast", "uniformwide")
ARM_ORDER = ("ce", "logit_kd", "feat_proj", "feat_pool", "lift", "widelast", "uniformwide", "feat_equal", "logit_equal")
DEFAULT_CLAIMS = (("lift", "none"), ("widelast", "none"), ("widelast", "uniformwide"))  # a > b
CLAIM_COLUMNS = (
    "claim",
    "a",
    "b",
    "expect",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "welch_df",
    "p",
    "verdict",
)  # claims.csv


@dataclass
class Group:
    """The finished trials of one table row."""

    base: str  # the arm name; the remedy for a sweep without arms
    context: tuple[tuple[str, str], ...]  # (key, value) of the settings that vary (see group_trials)
    trials: list[dict]

    @property
    def label(self) -> str:
        return " ".join([self.base, *(f"{LABEL_PREFIX[k]}{v}" for k, v in self.context)])

    @property
    def remedy(self) -> str:
        return str(self.trials[0].get("student.remedy"))

    @property
    def alpha(self) -> str:
        return str(self.trials[0].get("kd.alpha"))

    @property
    def legend(self) -> str:
        """The label with kd.alpha always in it (figures)."""
        return self.legend_without("")

    def legend_without(self, key: str) -> str:
        """``legend`` less the setting ``key`` (the one a figure puts on its x axis)."""
        shown = [(k, v) for k, v in self.context if k != key]
        alpha = [] if any(k == "kd.alpha" for k, _ in shown) else [f"α={self.alpha}"]
        return " ".join([self.base, *alpha, *(f"{LABEL_PREFIX[k]}{v}" for k, v in shown)])


@dataclass(frozen=True)
class Claim:
    name: str
    a: str
    b: str
    expect: evidence.Expect


# ---------------------------------------------------------------------------------------------- tags
def read_claims(tags: dict, sweep: str) -> list[Claim] | None:
    """The claims of tag ``encmm.claims`` (JSON list of {name, a, b, expect}); None when the tag is absent."""
    text = tags.get("encmm.claims")
    if text is None:
        return None
    try:
        claims = [Claim(str(c["name"]), str(c["a"]), str(c["b"]), c["expect"]) for c in json.loads(text)]
        for claim in claims:
            if claim.expect not in ("greater", "less"):
                raise ValueError(f"claim {claim.name!r}: expect {claim.expect!r}")
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"sweep {sweep}: tag encmm.claims is not a JSON list of {{name, a, b, expect: greater|less}}: {exc}"
        ) from None
    return claims


def read_arm_order(tags: dict) -> list[str] | None:
    """The sweep's declared arm order (tag ``encmm.arms``, a JSON list of names), when the sweep wrote one."""
    try:
        order = json.loads(tags["encmm.arms"])
    except (KeyError, ValueError):
        return None
    return [str(name) for name in order] if isinstance(order, list) else None


# ------------------------------------------------------------------------------------------- grouping
def as_number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _sort_key(text: str) -> tuple:
    value = as_number(text)
    return (1, 0.0, text) if math.isnan(value) else (0, value, text)


def _varying(rows: list[dict], keys) -> list[str]:
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def describe_unreported(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Trials left out of the table (not FINISHED, or FINISHED without final metrics), one line each."""
    left_out = [r for r in rows if r["status"] != "FINISHED" or r.get("best/val/acc1") is None]
    lines = []
    for r in left_out:
        state = {"RUNNING": "still running", "FINISHED": "finished but logged no final metrics"}.get(
            r["status"], r["status"].lower()
        )
        lines.append(f"trial {r['trial']} ({r['run_id'][:8]}) is {state}: not in the table")
    return left_out, lines


def group_trials(done: list[dict], declared: list[str] | None = None) -> list[Group]:
    """Finished trials -> table rows, ordered.

    With arms (``row["arm"]``): one group per arm, split further only by a setting that varies inside
    the arm. Without: one group per remedy, split by every setting of ``GROUP_KEYS`` the sweep varies.
    Order: ``declared`` (the sweep's arm order), else ``ARM_ORDER`` / ``REMEDY_ORDER``, then any other
    name alphabetically; inside a name by the varying settings, numerically.
    """
    with_arms = any(r.get("arm") is not None for r in done)
    bases: dict[str, list[dict]] = {}
    for row in done:
        bases.setdefault(str(row["arm"] if with_arms else row.get("student.remedy")), []).append(row)
    sweep_keys = _varying(done, GROUP_KEYS[1:])
    groups = []
    for base, rows in bases.items():
        keys = _varying(rows, GROUP_KEYS) if with_arms else sweep_keys
        split: dict[tuple, list[dict]] = {}
        for row in rows:
            split.setdefault(tuple((k, str(row.get(k))) for k in keys), []).append(row)
        groups += [Group(base, context, trials) for context, trials in split.items()]
    order = list(declared or (ARM_ORDER if with_arms else REMEDY_ORDER))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(groups, key=lambda g: (rank.get(g.base, len(order)), g.base, [_sort_key(v) for _, v in g.context]))


def best_trial(group: Group) -> dict:
    return max(group.trials, key=lambda t: t["best/val/acc1"])


def default_claims(groups: list[Group]) -> list[Claim]:
    """lift > none, widelast > none, widelast > uniformwide: the pairs whose two names both ran."""
    present = {g.base for g in groups}
    return [Claim(f"{a} > {b}", a, b, "greater") for a, b in DEFAULT_CLAIMS if a in present and b in present]


def _matching(groups: list[Group], base: str, context: tuple) -> Group | None:
    """The group of ``base`` in ``context``; an arm that varies nothing stands for every context."""
    mine = [g for g in groups if g.base == base]
    return next((g for g in mine if g.context == context), None) or next((g for g in mine if not g.context), None)


def _text(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def evaluate_claims(claims: list[Claim], groups: list[Group]) -> list[dict]:
    """One row per claim and setting it can be checked in (each context of its arms; () if none varies)."""
    rows = []
    for claim in claims:
        contexts = list(dict.fromkeys(g.context for g in groups if g.base in (claim.a, claim.b) and g.context))
        for context in contexts or [()]:
            ga, gb = _matching(groups, claim.a, context), _matching(groups, claim.b, context)
            top1 = [[t.get("best/val/acc1") for t in g.trials] if g else [] for g in (ga, gb)]
            d = evidence.welch_difference(*top1)
            where = " ".join(f"{LABEL_PREFIX[k]}{v}" for k, v in context if k != "student.remedy")
            rows.append(
                {
                    "claim": f"{claim.name} ({where})" if where else claim.name,
                    "a": ga.label if ga else claim.a,
                    "b": gb.label if gb else claim.b,
                    "expect": claim.expect,
                    "n_a": d.n_a,
                    "n_b": d.n_b,
                    "mean_a": evidence.estimate(top1[0]).mean,
                    "mean_b": evidence.estimate(top1[1]).mean,
                    "diff": d.diff,
                    "diff_ci_low": d.ci_low,
                    "diff_ci_high": d.ci_high,
                    "welch_df": d.df,
                    "p": d.p,
                    "verdict": evidence.claim_verdict(d, claim.expect),
                }
            )
    return rows


def mismatch_correlations(done: list[dict]) -> list[dict]:
    """Spearman rho (and p) of each diag metric against best val top-1, one point per finished trial."""
    rows = []
    for metric in MISMATCH_KEYS:
        c = evidence.spearman([t.get(metric) for t in done], [t.get("best/val/acc1") for t in done])
        rows.append({"metric": metric, "n": c.n, "spearman_rho": c.rho, "p": c.p})
    return rows


def table_row(group: Group, gflops: float | None) -> dict:
    trials = group.trials
    first = trials[0]
    row = {
        "arm": group.label,
        "remedy": group.remedy,
        "kd.alpha": first.get("kd.alpha"),
        "kd.beta": first.get("kd.beta"),
        "width": first.get("student.width"),
        "n": len(trials),
    }
    for name, key in (("top1_best", "best/val/acc1"), ("top1_last", "val/acc1")):
        e = evidence.estimate(t.get(key) for t in trials)
        row.update(
            {f"{name}_mean": e.mean, f"{name}_sd": e.sd, f"{name}_ci_low": e.ci_low, f"{name}_ci_high": e.ci_high}
        )
    row.update({"params_inference": first.get("params_inference"), "gflops": gflops})
    for metric in MISMATCH_KEYS:
        row[metric.removeprefix("diag/")] = evidence.estimate(t.get(metric) for t in trials).mean
    return row


# ------------------------------------------------------------------------------------------ formatting
def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_gflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"  # 4 significant digits: 1.258 (DeiT-Tiny) or 0.0009594


def fmt_estimate(row: dict, name: str) -> str:
    """``mean [low, high]`` (95% CI); one trial: ``value (n=1)``, never a spread of 0."""
    mean, low, high = row[f"{name}_mean"], row[f"{name}_ci_low"], row[f"{name}_ci_high"]
    if mean is None:
        return "-"
    return f"{mean:.2f} (n=1)" if low is None else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def fmt_p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def p_phrase(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(rows: list[dict], title: str) -> str:
    head = [
        "arm",
        "remedy",
        "kd.alpha",
        "kd.beta",
        "width",
        "n",
        "top-1 best (95% CI)",
        "top-1 last (95% CI)",
        "params (inf.)",
        "GFLOPs/img",
        "SVD rank p99",
        "PCA rank p99",
        "SEP d/D 90%",
        "feat MSE",
    ]
    cells = [
        [
            r["arm"],
            r["remedy"],
            str(r["kd.alpha"]),
            str(r["kd.beta"]),
            str(r["width"]),
            str(r["n"]),
            fmt_estimate(r, "top1_best"),
            fmt_estimate(r, "top1_last"),
            fmt(r["params_inference"]),
            fmt_gflops(r["gflops"]),
            fmt(r["svd_rank_p99/0.99"], 1),
            fmt(r["pca_rank_p99/0.99"], 1),
            fmt(r["sep_ratio_90"], 3),
            fmt(r["feat_mse"], 4),
        ]
        for r in rows
    ]
    return "\n".join([f"## {title}", "", *markdown_table(head, cells)]) + "\n"


def format_claims(claims: list[dict], source: str) -> str:
    cells = [
        [
            c["claim"],
            c["a"],
            c["b"],
            _text(c["diff"], sign=True)
            + (
                ""
                if c["diff_ci_low"] is None
                else f" [{_text(c['diff_ci_low'], sign=True)}, {_text(c['diff_ci_high'], sign=True)}]"
            ),
            fmt_p(c["p"]),
            c["verdict"],
        ]
        for c in claims
    ]
    lines = [f"### Claims ({source}): best top-1 difference a - b, Welch 95% CI and two-sided p", ""]
    head = ["claim", "a", "b", "diff [95% CI]", "p", "verdict"]
    lines += markdown_table(head, cells) if cells else ["no claim to check"]
    return "\n".join(lines) + "\n"


def format_correlations(correlations: list[dict]) -> str:
    cells = [[c["metric"], str(c["n"]), _text(c["spearman_rho"]), fmt_p(c["p"])] for c in correlations]
    return (
        "\n".join(
            [
                "### Mismatch metric vs best top-1 across finished trials (Spearman)",
                "",
                *markdown_table(["metric", "n", "Spearman ρ", "p"], cells),
            ]
        )
        + "\n"
    )


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path
