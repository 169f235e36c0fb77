"""Views of a per-token TD trace: an HTML "dopamine trace", a terminal line per text and a PNG
of r and rbar, V, delta and the belief.

Sign convention (the same in every view): delta_t is the surprise of token t relative to the
reference LM's own expectation. Green (delta > 0): the text was more predictable than the model
expected (r_t above rbar_t = E_p[r_t]); red (delta < 0): less predictable; white: as expected.
Colours are on a diverging scale centred on 0 whose full saturation is the 95th percentile of
|delta| in that text (`robust_scale`), so one outlier (such as the last token of a text read as
terminal, delta_T = r_T - V_T) does not wash out the rest; larger |delta| saturates.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tdreward.display import fmt_num
from tdreward.io import atomic_path, write_text
from tdreward.reward_model import TextScore

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.text import Text

# Endpoints of the diverging scale: white at delta = 0; saturated, yet light enough that dark
# text stays readable on them (contrast with #222 above 4:1).
NEUTRAL = (255, 255, 255)
GREEN = (72, 168, 88)  # delta > 0: more predictable than the model expected
RED = (229, 83, 75)  # delta < 0: less predictable than the model expected
UNDEFINED = (204, 204, 204)  # a NaN or infinite delta
SCALE_QUANTILE = 0.95

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
.trace { line-height: 2.1; font-family: ui-monospace, monospace; white-space: pre-wrap;
         color: #222; }
.tok { padding: 0.15em 0.05em; border-radius: 3px; }
.tok:hover { outline: 1px solid #555; }
.nl { color: #888; }
.note { color: #a33; }
.legend { font-size: 0.9em; margin: 0.3em 0 0.6em 0; }
.legend .key { display: inline-block; width: 14em; height: 0.9em; vertical-align: middle;
               border: 1px solid #bbb; margin: 0 0.4em;
               background: linear-gradient(to right, rgb(229,83,75), #fff, rgb(72,168,88)); }
.legend .sw { display: inline-block; padding: 0 0.4em; border-radius: 3px;
              border: 1px solid #ddd; }
"""


# ------------------------------------------------------------------------ colour scale
def robust_scale(values: Sequence[float], q: float = SCALE_QUANTILE) -> float:
    """The |delta| at which the colour saturates: the q-quantile of the finite |values| (the
    "lower" quantile, a value of the data: with fewer than 1/(1-q) + 1 values the largest one is
    never it, so one outlier cannot set the scale of a short text either), else their maximum
    when that quantile is 0 (a mostly-zero trace), else 1.0 (all zero, or none)."""
    mags = sorted(abs(v) for v in values if math.isfinite(v))
    if not mags:
        return 1.0
    scale = mags[int(math.floor(q * (len(mags) - 1)))]
    return scale if scale > 0 else (mags[-1] or 1.0)


def delta_rgb(delta: float, scale: float) -> tuple[int, int, int]:
    """The colour of a TD error: white at 0, towards GREEN for delta > 0 and RED for delta < 0,
    linear in |delta| / scale and saturated from |delta| >= scale."""
    if not math.isfinite(delta):
        return UNDEFINED
    a = min(1.0, abs(delta) / scale) if scale > 0 else 0.0
    end = GREEN if delta > 0 else RED
    return tuple(round(n + (e - n) * a) for n, e in zip(NEUTRAL, end))  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def delta_colour(delta: float, scale: float) -> str:
    """delta_rgb as a CSS colour, "#rrggbb"."""
    return _hex(delta_rgb(delta, scale))


def _plain_token(tok: str) -> str:
    """A token in one line of plain text (plot tick labels): newline and tab made visible."""
    return tok.replace("\r", "").replace("\n", "↵").replace("\t", "→")


# ------------------------------------------------------------------------------- HTML
def _tooltip(s: TextScore, j: int) -> str:
    rows = [f"#{j + 1} {s.tokens[j]!r}"]
    for name, value in (("r", s.r[j]), ("rbar", s.rbar[j]), ("r - rbar", s.r[j] - s.rbar[j]),
                        ("V", s.V[j]), ("delta", s.delta[j]), ("logp", s.logp[j]),
                        ("H", s.H[j]), ("c", s.c[j])):
        rows.append(f"{name} = {fmt_num(value, '.3f')}")
    if s.state_names and j < len(s.belief):
        rows.append("belief: " + ", ".join(
            f"{n}={b:.2f}" for n, b in zip(s.state_names, s.belief[j])))
    return "\n".join(rows)


def _legend(scale: float) -> str:
    return (
        "<div class='legend'>&delta; &lt; 0 <span class='sw' style='background:"
        f"{delta_colour(-1.0, 1.0)}'>less predictable than the model expected</span>"
        "<span class='key'></span><span class='sw' style='background:"
        f"{delta_colour(1.0, 1.0)}'>more predictable than the model expected</span> "
        "&delta; &gt; 0; white: as expected. Full colour at |&delta;| &ge; "
        f"{fmt_num(scale, '.3g')} nats (the {SCALE_QUANTILE:.0%} quantile of |&delta;| in this "
        "text); hover a token for r, rbar, V, &delta;, log p, H.</div>"
    )


def _token_span(s: TextScore, j: int, scale: float) -> str:
    tok = s.tokens[j]
    text = html.escape(tok, quote=True)
    if "\n" in tok:  # a line break has no width to colour: show a mark, then break the line
        text = text.replace("\n", "<span class='nl'>↵</span>\n")
    return (f"<span class='tok' style='background:{delta_colour(s.delta[j], scale)}' "
            f"title='{html.escape(_tooltip(s, j), quote=True)}'>{text}</span>")


def trace_html(scores: list[TextScore], model: str, trained: bool) -> str:
    """A self-contained page: per text a summary table, a colour legend and every token of
    the text (the prefix token the text is read after is not one) coloured by delta."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tdreward trace: {html.escape(model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Dopamine trace</h1><p>Model <code>{html.escape(model)}</code>. Each token is "
        "coloured by its TD error &delta;<sub>t</sub>, a surprise relative to the model's own "
        "expectation: <b>green</b> where the text was more predictable than the model "
        "expected (the reward r<sub>t</sub> above its expectation r&#772;<sub>t</sub> = "
        "E<sub>p</sub>[r<sub>t</sub>]), <b>red</b> where it was less predictable, white where "
        "it was as expected. The value is V<sub>t</sub> = r&#772;<sub>t</sub> + &gamma; "
        "C<sub>t</sub>. Hover a token for r, r&#772;, V, &delta;, log p, H and the belief.</p>",
    ]
    if not trained:
        parts.append(
            "<p class='note'>No trained critic: the learned part of the value is 0, so V and "
            "&delta; come from the model's expected reward r&#772; and its running average "
            "alone; &delta; is still the surprise against the model's own expectation. r and "
            "r&#772; need no learning.</p>"
        )
    for i, s in enumerate(scores):
        scale = robust_scale(s.delta)
        head = "".join(f"<th>{html.escape(k)}</th>" for k in s.summary)
        row = "".join(
            f"<td>{fmt_num(v, '.4g')}</td>" if isinstance(v, float)
            else f"<td>{html.escape(str(v))}</td>"
            for v in s.summary.values()
        )
        parts.append(f"<h2>Text {i + 1}</h2><table class='summary'><tr>{head}</tr>"
                     f"<tr>{row}</tr></table>{_legend(scale)}<div class='trace'>")
        parts.extend(_token_span(s, j, scale) for j in range(len(s.tokens)))
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(path: str | os.PathLike, scores: list[TextScore], model: str, trained: bool) -> None:
    write_text(path, trace_html(scores, model, trained))


# --------------------------------------------------------------------------- terminal
TERMINAL_LEGEND = ("delta: green = more predictable than the model expected, red = less, "
                   "white = as expected")


def trace_line(s: TextScore, name: str) -> Text:
    """A rich Text: `name: ` then every token on its delta colour (black on the diverging
    scale of the HTML trace, so it reads on dark and light terminals alike)."""
    from rich.text import Text

    scale = robust_scale(s.delta)
    line = Text(f"{name}: ")
    for tok, d in zip(s.tokens, s.delta):
        r, g, b = delta_rgb(d, scale)
        style = f"rgb(0,0,0) on rgb({r},{g},{b})"
        # A line break has no width to colour: a mark on the colour, then the break.
        line.append(tok.replace("\n", "↵\n"), style=style)
    line.append(f"  (full colour at |delta| >= {fmt_num(scale, '.3g')})", style="dim")
    return line


# ------------------------------------------------------------------------------- plot
def _clip_limit(delta: Sequence[float]) -> float | None:
    """A y-limit for the delta panel that keeps the bulk readable: None (no clipping) unless
    an outlier exceeds 4x the robust scale."""
    finite = [abs(d) for d in delta if math.isfinite(d)]
    if not finite:
        return None
    scale = robust_scale(delta)
    return 4 * scale if max(finite) > 4 * scale else None


def plot_figure(scores: list[TextScore], model: str, names: list[str] | None = None
                ) -> Figure:
    """The matplotlib Figure of write_plot: per text (max 4) a column of panels over the
    tokens: r with rbar (one axis, nats per token), V (its own axis: it sums discounted future
    reward, hundreds of nats), delta (bars in the trace's colours, zero line; an outlier beyond
    4x the 95% quantile of |delta| is clipped and marked) and, when the critic has states, the
    belief."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = scores[:4]
    names = list(names or [])[: len(shown)]
    names += [f"text {k + 1}" for k in range(len(names), len(shown))]
    has_belief = any(s.state_names for s in shown)
    nrows = 4 if has_belief else 3
    fig, axes = plt.subplots(nrows, max(1, len(shown)), figsize=(6 * max(1, len(shown)),
                                                                 2.5 * nrows + 0.6),
                             squeeze=False, sharex="col")
    for k, s in enumerate(shown):
        n = len(s.tokens)
        x = list(range(n))
        ax = axes[0][k]
        ax.plot(x, s.r, label="r", lw=1, color="C0")
        ax.plot(x, s.rbar, label="rbar", lw=1, color="C1", ls="--")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel("reward (nats/token)")
        ax.legend(loc="best", fontsize="small")
        td = fmt_num(s.summary.get("td_reward"), ".3f")
        ax.set_title(f"{names[k]}: TD reward {td}")

        ax = axes[1][k]
        ax.plot(x, s.V, label="V", lw=1, color="C2")
        ax.set_ylabel("V (nats)")
        ax.legend(loc="best", fontsize="small")

        ax = axes[2][k]
        # The bar's height shows |delta|; its colour only the sign, in the trace's colours.
        colours = [_hex(GREEN if d > 0 else RED if d < 0 else UNDEFINED) for d in s.delta]
        ax.bar(x, s.delta, color=colours, width=0.9)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("δ (nats)")
        ax.set_title("δ > 0: more predictable than the model expected; δ < 0: less",
                     fontsize="small", color="dimgrey")
        lim = _clip_limit(s.delta)
        if lim is not None:
            ax.set_ylim(-1.1 * lim, 1.1 * lim)
            for j, d in enumerate(s.delta):
                if math.isfinite(d) and abs(d) > lim:
                    y = 1.05 * lim * (1 if d > 0 else -1)
                    ax.annotate(f"{d:.3g}", (j, y), fontsize="x-small", ha="center",
                                va="top" if d > 0 else "bottom", color="black",
                                bbox={"fc": "white", "ec": "grey", "lw": 0.5, "pad": 1.0})
        bottom = ax
        if has_belief:
            ax = axes[3][k]
            if s.state_names and len(s.state_names) <= 8:
                for i, name in enumerate(s.state_names):
                    ax.plot(x, [b[i] for b in s.belief], label=name, lw=1)
                ax.set_ylim(-0.02, 1.02)
                ax.legend(loc="upper right", fontsize="small")
            elif s.state_names:
                ax.imshow([list(col) for col in zip(*s.belief)], aspect="auto",
                          cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                ax.set_yticks(range(len(s.state_names)))
                ax.set_yticklabels(s.state_names, fontsize="x-small")
            else:
                ax.text(0.5, 0.5, "no belief states", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
            ax.set_ylabel("belief P(state)")
            bottom = ax
        bottom.set_xlabel("token")
        if 0 < n <= 40:  # short texts: the tokens themselves on the axis
            bottom.set_xticks(x)
            bottom.set_xticklabels([_plain_token(t).replace("$", r"\$") for t in s.tokens],
                                   rotation=90, fontsize="x-small")
    fig.suptitle(f"tdreward trace — {model}")
    fig.tight_layout()
    return fig


def write_plot(path: str | os.PathLike, scores: list[TextScore], model: str,
               names: list[str] | None = None) -> None:
    """PNG of plot_figure: r and rbar, V, delta and the belief over tokens, a column per text
    (max 4), titled by `names` (default "text 1", "text 2", ...)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(scores, model, names)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["TERMINAL_LEGEND", "delta_colour", "delta_rgb", "plot_figure", "robust_scale",
           "trace_html", "trace_line", "write_html", "write_plot"]
