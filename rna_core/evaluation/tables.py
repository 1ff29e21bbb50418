"""Paper-style Markdown tables: rows model x method, columns Natural, FGSM, PGD20, CW, MIFGSM,
DeepFool, AutoAttack (the RNA paper's Table 1 layout), one table per protocol.

The paper's "CW" column is CW-L2 as its script ran it (``cw_l2``). Attacks beyond the paper's
columns (``cw_inf``, ``eot_pgd``, ``autoattack_rand``, ``apgd_ce`` and any registered later)
follow as extra columns. A cell is the accuracy in percent, averaged over trials ("-" when not
evaluated). An attack evaluated at a non-default eps gets its own column, labelled with that eps.

Each protocol has three tables: one inference draw (the paper's number), worst-of-R (right under
all R draws) and vote-of-R (the plurality of R draws is right); rows written before R existed
have only the first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from ..attacks.registry import attack_spec
from ..errors import ConfigError
from ..units import to_pixels
from .protocols import PROTOCOLS
from .results import ResultRow

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Natural", "natural"),
    ("FGSM", "fgsm"),
    ("PGD20", "pgd20"),
    ("CW", "cw_l2"),
    ("MIFGSM", "mifgsm"),
    ("DeepFool", "deepfool"),
    ("AutoAttack", "autoattack"),
)
EXTRA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("CW-inf", "cw_inf"),
    ("EOT-PGD", "eot_pgd"),
    ("AutoAttack-rand", "autoattack_rand"),
    ("APGD-CE", "apgd_ce"),
)
SCORE_TITLES = {"one": "one inference draw", "worst": "worst-of-{R}", "vote": "vote-of-{R}"}
_LABELS = dict((a, label) for label, a in PAPER_COLUMNS + EXTRA_COLUMNS)
_ORDER = [a for _, a in PAPER_COLUMNS + EXTRA_COLUMNS]


def _default_eps(attack: str) -> float | None:
    try:
        eps = attack_spec(attack).defaults.get("eps")
    except ConfigError:  # an attack no longer (or not yet) registered in this process
        return None
    return to_pixels(eps)


def _eps_key(eps: float | None) -> float | None:
    return None if eps is None or (isinstance(eps, float) and math.isnan(eps)) else round(float(eps), 6)


def _column_label(attack: str, eps: float | None) -> str:
    label = _LABELS.get(attack, attack)
    default = _default_eps(attack)
    if eps is not None and attack != "natural" and default is not None and eps != default:
        label += f" (eps {eps:g})"
    return label


def _columns(rows: list[ResultRow]) -> list[tuple[str, float | None]]:
    """(attack, eps) columns: the paper's seven always, then the extra attacks present."""
    present = {(r.attack, _eps_key(r.eps)) for r in rows}
    order = _ORDER + sorted({a for a, _ in present} - set(_ORDER))
    cols: list[tuple[str, float | None]] = []
    for attack in order:
        eps_values = {e for a, e in present if a == attack}
        if attack in dict(PAPER_COLUMNS).values():  # the paper's columns always, at the paper's eps
            eps_values.add(0.0 if attack == "natural" else _default_eps(attack))
        default = 0.0 if attack == "natural" else _default_eps(attack)
        cols.extend((attack, e) for e in sorted(eps_values, key=lambda e: (e != default, e is None, e or 0.0)))
    return cols


def _format(values: list[float | None]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    return f"{100 * sum(values) / len(values):.2f}"


def paper_table(rows: Iterable[ResultRow], protocol: str, dataset: str | None = None, score: str = "one") -> str:
    """One Markdown table of `protocol` (restricted to `dataset` when given) for `score`
    ("one": one inference draw; "worst" / "vote": worst-of-R / vote-of-R).

    A cell averages the trials of one evaluated model. Two runs with the same model and method
    label (e.g. two RNA runs trained with different modes) get a row each, the method then
    suffixed with the run id, so merged result files never blend two models into one number.
    """
    rows = [r for r in rows if r.protocol == protocol and (dataset is None or r.dataset == dataset)]
    cols = _columns(rows)
    runs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        runs[(r.model, r.method)].add(r.run_id)
    cells: dict[tuple[str, str], dict[tuple[str, float | None], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        method = r.method if len(runs[(r.model, r.method)]) == 1 else f"{r.method} [{r.run_id[:8]}]"
        cells[(r.model, method)][(r.attack, _eps_key(r.eps))].append(r.score(score))
    header = ["Model", "Method"] + [_column_label(a, e) for a, e in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(cols)) + "|"]
    for model, method in sorted(cells):
        by_col = cells[(model, method)]
        values = [_format(by_col.get(c, [])) for c in cols]
        lines.append("| " + " | ".join([model, method] + values) + " |")
    return "\n".join(lines)


def _protocol_order(rows: list[ResultRow]) -> list[str]:
    present = {r.protocol for r in rows}
    return [p for p in PROTOCOLS if p in present] + sorted(present - set(PROTOCOLS))


def paper_tables(rows: Iterable[ResultRow], score: str = "one") -> dict[str, str]:
    """{protocol: table of `score`} for each protocol present, in the canonical protocol order."""
    rows = list(rows)
    return {p: paper_table(rows, p, score=score) for p in _protocol_order(rows)}


def _draws(rows: list[ResultRow]) -> str | None:
    """R as a table title says it ("10", or "5/10" when merged rows differ); None without R."""
    values = sorted({r.draws for r in rows if r.draws is not None})
    return "/".join(map(str, values)) if values else None


def render_markdown(rows: Iterable[ResultRow], title: str | None = None) -> str:
    """All tables (one per dataset and protocol) under headings, as one Markdown document."""
    rows = list(rows)
    parts = [f"# {title}", ""] if title else []
    datasets = sorted({r.dataset for r in rows})
    for dataset in datasets:
        subset = [r for r in rows if r.dataset == dataset]
        for protocol in _protocol_order(subset):
            heading = f"## {dataset}: protocol `{protocol}`" if len(datasets) > 1 else f"## Protocol `{protocol}`"
            in_protocol = [r for r in subset if r.protocol == protocol]
            draws = _draws(in_protocol)
            scores = ("one", "worst", "vote") if draws else ("one",)
            parts += [heading, ""]
            for score in scores:
                what = SCORE_TITLES[score].format(R=draws)
                parts += [
                    f"Accuracy (%) under attack, {what}; rows model x method.",
                    "",
                    paper_table(subset, protocol, score=score),
                    "",
                ]
    return "\n".join(parts).rstrip() + "\n"
