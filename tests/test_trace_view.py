"""The views of a TD trace (tdreward.evaluation.trace): the HTML dopamine trace on a diverging
green/red scale centred on 0, the terminal line, and the PNG's panels."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from tdreward.evaluation import trace
from tdreward.reward_model import TextScore

WHITE = (255, 255, 255)


def _score(tokens: list[str], delta: list[float], states: list[str] | None = None,
           v_offset: float = 300.0) -> TextScore:
    n = len(tokens)
    states = ["a", "b"] if states is None else states
    belief = [[1.0 / len(states)] * len(states) if states else [] for _ in range(n)]
    r = [-2.0 + 0.1 * i for i in range(n)]
    return TextScore(token_ids=list(range(n + 1)), tokens=tokens, logp=[-1.5] * n,
                     c=[0.2] * n, H=[2.5] * n, r=r,
                     rbar=[x - max(-1.0, min(1.0, d)) for x, d in zip(r, delta)],
                     V=[v_offset + i for i in range(n)], delta=delta, belief=belief,
                     state_names=states,
                     summary={"td_reward": sum(delta) / n, "mean_r": sum(r) / n,
                              "return": 0.0, "perplexity": 4.5, "n_tokens": n})


class _Tokens(HTMLParser):
    """The tok spans of a trace page: (background colour, title, text) in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[list[str]] = []
        self.depth = 0  # > 0 inside a tok span (it may hold a newline mark's span)
        self.legend = ""
        self.in_legend = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "tok":
            style = a["style"]
            assert style.startswith("background:")
            self.spans.append([style.removeprefix("background:"), a["title"], ""])
            self.depth = 1
        elif self.depth and tag == "span":
            self.depth += 1
        if tag == "div" and a.get("class") == "legend":
            self.in_legend = 1

    def handle_endtag(self, tag):
        if tag == "span" and self.depth:
            self.depth -= 1
        if tag == "div" and self.in_legend:
            self.in_legend = 0

    def handle_data(self, data):
        if self.depth:
            self.spans[-1][2] += data
        if self.in_legend:
            self.legend += data


def _spans(page: str) -> list[list[str]]:
    p = _Tokens()
    p.feed(page)
    p.close()
    return p.spans


def _rgb(colour: str) -> tuple[int, int, int]:
    assert colour.startswith("#") and len(colour) == 7, colour
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _is_green(rgb) -> bool:
    return rgb[1] > max(rgb[0], rgb[2])


def _is_red(rgb) -> bool:
    return rgb[0] > max(rgb[1], rgb[2])


# ------------------------------------------------------------------------------- HTML
def test_html_colours_diverge_around_zero_and_show_every_token() -> None:
    tokens = ["First", " the", " cat", " sat", " on", " a", " mat"]
    delta = [-1.0, -0.3, 0.0, 0.3, 1.0, 0.6, -0.6]
    page = trace.trace_html([_score(tokens, delta)], "m", trained=False)
    spans = _spans(page)
    assert [s[2] for s in spans] == tokens  # every token in order, the first one too
    colours = [_rgb(s[0]) for s in spans]
    assert colours[2] == WHITE  # delta = 0 is neutral
    for c, d in zip(colours, delta):
        if d > 0:
            assert _is_green(c), (d, c)
        elif d < 0:
            assert _is_red(c), (d, c)
    # Saturation grows with |delta| on both sides, and symmetrically.
    assert sum(colours[3]) > sum(colours[5]) > sum(colours[4])
    assert sum(colours[1]) > sum(colours[6]) > sum(colours[0])
    # The tooltip has the numbers of its token.
    title = spans[3][1]
    for key in ("r = ", "rbar = ", "V = ", "delta = 0.300", "logp = -1.500", "H = 2.500"):
        assert key in title, (key, title)
    assert "belief: a=0.50, b=0.50" in title
    # The legend explains the sign.
    assert "more predictable than the model expected" in page
    assert "less predictable than the model expected" in page
    assert page.count("class='tok'") == len(tokens)


def test_one_outlier_does_not_wash_out_the_rest() -> None:
    # The last token of a text read as terminal: delta = r - V, hundreds of nats.
    delta = [0.4, -0.4, 0.5, -0.5, 0.3, -0.3, 0.45, -0.45] * 5 + [-300.0]
    tokens = [f" w{i}" for i in range(len(delta))]
    spans = _spans(trace.trace_html([_score(tokens, delta)], "m", trained=True))
    colours = [_rgb(s[0]) for s in spans]
    assert colours[-1] == trace.RED  # the outlier saturates
    # A typical token is clearly coloured (more than half way from white to full colour).
    for c, d in zip(colours[:-1], delta[:-1]):
        end = trace.GREEN if d > 0 else trace.RED
        assert abs(c[1] - end[1]) < abs(WHITE[1] - end[1]) / 2, (d, c)
    assert trace.robust_scale(delta) < 1.0


def test_robust_scale_edge_cases() -> None:
    assert trace.robust_scale([]) == 1.0
    assert trace.robust_scale([0.0, 0.0]) == 1.0
    assert trace.robust_scale([0.0] * 99 + [2.0]) == 2.0  # mostly zero: the maximum
    assert trace.robust_scale([float("nan"), 1.0, -1.0]) == 1.0
    assert trace.robust_scale([0.1, -0.2, 0.3, -500.0]) == 0.3  # a short text's outlier
    assert trace.delta_colour(0.0, 1.0) == "#ffffff"
    assert trace.delta_rgb(-5.0, 1.0) == trace.RED and trace.delta_rgb(5.0, 1.0) == trace.GREEN
    assert trace.delta_rgb(float("nan"), 1.0) == trace.UNDEFINED


def test_html_escapes_tokens_and_tooltips() -> None:
    tokens = ["<b>", " &amp;", " 'single'", ' "double"', "\n", "</span></div>", " x\ny"]
    delta = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.0]
    page = trace.trace_html([_score(tokens, delta)], "<model & 'name'>", trained=True)
    assert "<b>" not in page.split("class='trace'>", 1)[1]
    assert "&lt;b&gt;" in page and "&amp;amp;" in page
    assert "<model" not in page and "&lt;model &amp; &#x27;name&#x27;&gt;" in page
    spans = _spans(page)
    assert len(spans) == len(tokens)  # no token broke out of its span
    shown = [s[2].replace("↵", "") for s in spans]
    assert shown == tokens  # the text round-trips, newlines included
    assert spans[4][2] == "↵\n"  # a line break is marked where it is
    for (_, title, _), tok in zip(spans, tokens):
        assert repr(tok) in title  # the tooltip names its token, quotes and all


def test_html_page_is_self_contained() -> None:
    page = trace.trace_html([_score(["a", "b"], [0.1, -0.1])], "m", trained=False)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    for remote in ("<script", "<link", "src=", "http://", "https://"):
        assert remote not in page


def test_first_token_of_a_scored_text_is_in_the_trace(tokenizer, tiny_lm) -> None:
    from tdreward.reward_model import TDRewardModel

    text = "Dopamine neurons fire."
    rm = TDRewardModel.from_lm(tiny_lm, tokenizer, "tiny")
    (s,) = rm.score([text])
    assert "".join(s.tokens) == text  # the prefix token is not one of them
    assert len(s.rbar) == len(s.tokens) == len(s.delta)
    spans = _spans(trace.trace_html([s], "tiny", trained=False))
    assert "".join(x[2] for x in spans) == text
    assert spans[0][2] == s.tokens[0] and text.startswith(s.tokens[0])


# --------------------------------------------------------------------------- terminal
def test_terminal_trace_uses_the_same_colours() -> None:
    from rich.style import Style

    tokens = ["Up", " flat", " down", " line\n"]
    delta = [0.8, 0.0, -0.8, 0.1]
    line = trace.trace_line(_score(tokens, delta), "text")
    assert line.plain.startswith("text: Up flat down line↵\n")
    backgrounds = []
    for span in line.spans:
        style = span.style if isinstance(span.style, Style) else Style.parse(span.style)
        if style.bgcolor is not None:
            backgrounds.append(tuple(style.bgcolor.get_truecolor()))
    assert len(backgrounds) == len(tokens)
    assert _is_green(backgrounds[0]) and backgrounds[1] == WHITE and _is_red(backgrounds[2])
    assert "more predictable" in trace.TERMINAL_LEGEND


def test_print_scores_prints_the_legend_and_each_trace(capsys) -> None:
    from tdreward.commands.score import print_scores

    print_scores([_score(["t0", " t1"], [0.1, -0.1])], show_trace=True, names=["notes.txt"])
    out = capsys.readouterr().out
    assert "notes.txt: t0 t1" in out
    assert " ".join(trace.TERMINAL_LEGEND.split()) in " ".join(out.split())


# ------------------------------------------------------------------------------- plot
@pytest.mark.parametrize("states", [["a", "b"], []])
def test_plot_panels_and_png(tmp_path, states) -> None:
    import matplotlib.pyplot as plt

    tokens = [f" t{i}" for i in range(12)]
    delta = [0.2, -0.3, 0.0, 0.1, -0.1, 0.25, -0.2, 0.15, 0.05, -0.05, 0.3, -250.0]
    scores = [_score(tokens, delta, states), _score(tokens[:6], delta[:6], states)]
    fig = trace.plot_figure(scores, "m", ["one", "two"])
    try:
        rows = 4 if states else 3
        assert len(fig.axes) == rows * 2
        for k in range(2):
            col = sorted((ax for ax in fig.axes if ax.get_subplotspec().colspan.start == k),
                         key=lambda ax: ax.get_subplotspec().rowspan.start)
            ax_r, ax_v, ax_d = col[:3]
            assert ax_r.get_legend_handles_labels()[1] == ["r", "rbar"]  # one axis, same units
            assert "nats" in ax_r.get_ylabel()
            assert ax_v.get_legend_handles_labels()[1] == ["V"]
            assert "nats" in ax_v.get_ylabel() and ax_v.get_ylim()[0] > 200  # V's own range
            lo, hi = ax_r.get_ylim()
            assert hi - lo < 10  # r's scale, not V's
            assert "nats" in ax_d.get_ylabel()
            assert any(list(line.get_ydata()) == [0, 0] for line in ax_d.get_lines())  # zero
            if states:
                assert col[3].get_ylabel().startswith("belief")
        # The delta outlier of text 1 is clipped: the bulk keeps a readable scale.
        ax_d1 = sorted((ax for ax in fig.axes if ax.get_subplotspec().colspan.start == 0),
                       key=lambda ax: ax.get_subplotspec().rowspan.start)[2]
        assert ax_d1.get_ylim()[0] > -50
        assert "one: TD reward" in " ".join(ax.get_title() for ax in fig.axes)
    finally:
        plt.close(fig)
    path = tmp_path / "trace.png"
    trace.write_plot(path, scores, "m", ["one", "two"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_tolerates_special_characters_in_tokens(tmp_path) -> None:
    tokens = ["$x$", " $", "\n", "<&>", " \t"]
    path = tmp_path / "t.png"
    trace.write_plot(path, [_score(tokens, [0.1, -0.1, 0.0, 0.2, -0.2])], "m")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
