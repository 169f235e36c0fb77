"""A figure laid out like Qian et al. (2025) Fig. 3d-f: one column per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tdreward.io import atomic_path  # noqa: E402

COLOURS = {
    "conditioning": "#1f77b4",
    "degradation": "#d62728",
    "cued_reward": "#2ca02c",
    "extinction": "#7f7f7f",
}
TITLES = {
    "csc": "CSC (no ITI states)",
    "csc_iti": "CSC with ITI states",
    "cue_context": "Cue-Context",
    "belief": "Belief-State",
}


def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def plot_fig3(results: dict, path: str | Path) -> None:
    """Rows: value around odour A, TD error around odour A, cue RPE by condition."""
    conds, mods = results["conditions"], results["models"]
    res = results["results"]
    t = _arr(results["trace_time_s"])
    delay_s = results["config"]["task"]["delay_s"]
    fig, axes = plt.subplots(3, len(mods), figsize=(3.6 * len(mods), 8.4), squeeze=False)
    for j, m in enumerate(mods):
        ax_v, ax_d, ax_b = axes[:, j]
        for c in conds:
            e = res[c][m]
            ax_v.plot(t, _arr(e["value_trace"]["mean"]), color=COLOURS[c], label=c)
            rew = _arr(e["rpe_trace_rewarded"]["mean"])
            if np.all(np.isnan(rew)):  # extinction: no rewarded trials, show all A trials
                ax_d.plot(t, _arr(e["rpe_trace_all"]["mean"]), color=COLOURS[c], ls="--")
            else:
                ax_d.plot(t, rew, color=COLOURS[c])
        for ax in (ax_v, ax_d):
            for x in (0.0, delay_s):
                ax.axvline(x, color="k", lw=0.6, ls=":")
            ax.set_xlabel("time from odour A onset (s)")
        ax_v.set_title(TITLES.get(m, m))
        ax_d.axhline(0.0, color="k", lw=0.5)
        means = [res[c][m]["cue_rpe_normalized"]["mean"] for c in conds]
        sems = [res[c][m]["cue_rpe_normalized"]["sem"] for c in conds]
        x = np.arange(len(conds))
        ax_b.bar(x, _arr(means), yerr=_arr(sems), color=[COLOURS[c] for c in conds], capsize=3)
        for i, c in enumerate(conds):
            pts = _arr(res[c][m]["cue_rpe_normalized"]["per_seed"])
            ax_b.scatter(np.full(len(pts), i) + 0.25, pts, s=6, color="k", zorder=3)
        ax_b.axhline(0.0, color="k", lw=0.5)
        ax_b.set_xticks(x, [c.replace("_", "\n") for c in conds], fontsize=8)
        if j == 0:
            ax_v.set_ylabel("value V")
            ax_d.set_ylabel("TD error δ (rewarded A trials)")
            ax_b.set_ylabel("cue RPE / end of conditioning")
            ax_v.legend(fontsize=7, frameon=False)
    cfg = results["config"]
    fig.suptitle(
        "Qian et al. 2025, Fig. 3 (simulation): odour-A value, TD error and cue RPE by "
        f"condition — {cfg['seeds']} seeds × {cfg['trials_per_phase']} trials/phase, "
        f"γ={cfg['gamma_per_bin']}/bin, α={cfg['alpha']}; mean ± sem",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
