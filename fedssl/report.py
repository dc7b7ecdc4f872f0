"""The run report: `report.md` with PNG plots, made only from the files of a run folder.

Reading files (not the live server) lets the deployed ServerApp, the simulation runner and
`fedssl report RUN_DIR` write the same report, and lets it be regenerated anywhere later. A run
folder (fedssl/runfolder.py) holds `scenario.yaml` (the configuration used), one `RoundRecord` per
round in `metrics.jsonl`, the encoder checkpoints and, from the simulation runner, `summary.json`
(the comparison with the baselines). Plots are drawn with matplotlib's object API on its Agg
canvas, so no display and no global pyplot state is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedssl.config import Scenario
from fedssl.runfolder import RoundRecord, RunFolder, RunFolderError

RANK_DROP_WARNING = 0.5  # warn when the embedding's effective rank fell below this fraction of its maximum
# participation of a site in a round, as the report's table writes it
TRAINED, DECLINED, REJECTED, FAILED, ABSENT = "trained", "declined", "rejected", "error", "-"


@dataclass(frozen=True)
class Run:
    """What a run folder records."""

    folder: RunFolder
    scenario: Scenario
    rounds: list[RoundRecord]
    summary: dict | None  # summary.json of a simulated run

    @property
    def sites(self) -> list[str]:
        return [s.name for s in self.scenario.sites]


def epsilon_by_site(rounds: list[RoundRecord]) -> dict[str, list[float | None]]:
    """{site: [epsilon after round 1, 2, ...]} of the sites that trained with DP-SGD."""
    sites = sorted({site for r in rounds for site in r.epsilon})
    return {site: [r.epsilon.get(site) for r in rounds] for site in sites}


def last_delta(rounds: list[RoundRecord], site: str) -> float:
    """The delta `site` reported last (with the epsilon of the same guarantee)."""
    return next(r.delta[site] for r in reversed(rounds) if site in r.delta)


def load_run(folder: str | Path) -> Run:
    """The run in `folder`; a RunFolderError says what is missing or damaged."""
    run = RunFolder(folder)
    scenario = run.load_scenario()
    rounds = run.rounds()
    if not rounds:
        raise RunFolderError(f"run folder {run.root}: no round recorded in {run.metrics.name}")
    return Run(run, scenario, rounds, run.read_summary())


def loss_terms(rounds: list[RoundRecord]) -> list[str]:
    """The loss terms of the run, "loss" (the one minimised) first."""
    return sorted({term for r in rounds for term in r.losses}, key=lambda k: (k != "loss", k))


def participation(run: Run) -> list[dict[str, str]]:
    """Per round, each site's part: trained (its update was aggregated), declined (privacy budget or its policy),
    rejected (update failed validation), error, or - (not sampled, or no reply in time). Replies
    that named no site of the scenario count in the round's totals only."""
    return [{site: state for site, (state, _) in row.items()} for row in participation_reasons(run.sites, run.rounds)]


def participation_reasons(sites: list[str], rounds: list[RoundRecord]) -> list[dict[str, tuple[str, str]]]:
    """`participation` with the reason each site gave or was given: per round {site: (state, reason)},
    the reason empty for trained and - (the dashboard shows it; the report lists it apart)."""
    table = []
    for r in rounds:
        row = dict.fromkeys(sites, (ABSENT, ""))
        for state, entries in ((FAILED, r.errors), (REJECTED, r.rejected), (DECLINED, r.declined),
                               (TRAINED, [{"site": site} for site in r.site_windows])):
            row.update({e.get("site"): (state, e.get("reason", "")) for e in entries if e.get("site") in row})
        table.append(row)
    return table


def collapse_warning(rounds: list[RoundRecord]) -> str | None:
    """A warning when the embedding's effective rank (`embedding_rank`, fedssl/monitor.py) of the
    last round fell by more than half from its maximum over the rounds: a collapsing encoder."""
    ranks = [(r.round, r.embedding_rank) for r in rounds if r.embedding_rank is not None]
    if not ranks:
        return None
    best_round, best = max(ranks, key=lambda item: item[1])
    last_round, last = ranks[-1]
    if last >= RANK_DROP_WARNING * best:
        return None
    return (f"**Warning: the embedding is collapsing.** Its effective rank fell from {best:.1f} (round "
            f"{best_round}) to {last:.1f} (round {last_round}), below half its maximum: the encoder maps "
            f"different ECGs to ever fewer directions. Lower the learning rate, or use another objective.")


def write_report(folder: str | Path) -> Path:
    """Write `report.md` and its plots into the run folder; return the report's path."""
    run = load_run(folder)
    plots = draw_plots(run)
    run.folder.report.write_text(render(run, plots))
    return run.folder.report


def render(run: Run, plots: dict[str, str]) -> str:
    """The markdown of the report; `plots` maps each plot's name to its PNG file name."""
    s = run.scenario
    last = run.rounds[-1]
    probes = [r.probe_macro_auroc for r in run.rounds if r.probe_macro_auroc is not None]
    files = run.folder
    lines = [
        f"# Run report: {s.name}",
        "",
        (f"Run folder `{files.root}`: configuration [{files.scenario.name}]({files.scenario.name}), per-round "
         f"metrics [{files.metrics.name}]({files.metrics.name}), final global encoder `{files.encoder.name}` (each "
         f"round's in `{files.checkpoints.name}/`)."),
        "",
        "| | |",
        "|---|---|",
        f"| sites | {len(run.sites)}: {', '.join(run.sites)} |",
        (f"| rounds | {len(run.rounds)} of {s.federation.rounds} planned; {s.federation.strategy}, "
         f"share {s.federation.share}, {s.train.local_steps} local steps of batch {s.train.batch_size} |"),
        f"| objective | {s.objective.name} |",
        f"| encoder | {s.model.encoder} {s.model.size} |",
        f"| privacy | {privacy_text(s, run.rounds)} |",
        f"| final loss | {_number(last.losses.get('loss'), '.4f')} |",
        (f"| final probe macro AUROC | {_number(probes[-1] if probes else None, '.3f')}"
         f"{' ' + interval_text(last.probe_macro_auroc_ci95) if last.probe_macro_auroc_ci95 else ''} |"),
        f"| wall time of the rounds | {sum(r.seconds + r.probe_seconds for r in run.rounds):.1f} s |",
        "",
        "## Loss terms per round",
        "",
        "Weighted mean over the sites that trained (weights: their training windows).",
        "",
        f"![loss terms]({plots['losses']})",
        "",
        "## Linear-probe macro AUROC per round",
        "",
    ]
    lines += ([f"![probe AUROC]({plots['auroc']})"] if "auroc" in plots
              else ["No probe was recorded (`evaluation.every_round` off and no final probe)."])
    lines += ["", "## Collapse monitor", ""]
    if "collapse" in plots:
        lines += ["Effective rank (RankMe) and mean per-dimension std of the L2-normalised embeddings of the global "
                  "encoder on a fixed set of windows, per round (fedssl/monitor.py).", "",
                  f"![collapse monitor]({plots['collapse']})"]
        warning = collapse_warning(run.rounds)
        lines += ["", warning] if warning else []
    else:
        lines.append("No collapse monitor was recorded.")
    lines += ["", "## Privacy: epsilon per site", ""]
    eps = epsilon_by_site(run.rounds)
    if eps:
        lines += [f"![epsilon per site]({plots['epsilon']})", "", "| site | epsilon spent | delta | unit | target |",
                  "|---|---|---|---|---|"]
        for site, values in eps.items():
            spent = [v for v in values if v is not None]
            privacy = s.privacy_of(s.site(site)) if site in run.sites else None
            lines.append(f"| {site} | {spent[-1]:.3f} | {last_delta(run.rounds, site):.2g} | "
                         f"{privacy.unit if privacy else '?'} | "
                         f"{_number(privacy.target_epsilon if privacy else None, 'g')} |")
    else:
        lines.append("No DP: no site trained with DP-SGD, so there is no epsilon to plot.")
    lines += ["", "## Round wall time", "", f"![round wall time]({plots['seconds']})", "",
              "## Participation", "", participation_table(run)]
    if run.summary and run.summary.get("encoders"):
        lines += ["", "## Comparison with baselines", "", comparison_text(run.summary), "",
                  "| encoder | macro AUROC | 95 % interval | probes | federated minus this (95 % interval) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {_number(e.get('macro_auroc'), '.3f')} | {interval_text(e.get('ci95'))} | "
                  f"{len(e.get('runs', [])) or '-'} | {difference_text(e.get('federated_minus'))} |"
                  for name, e in run.summary["encoders"].items()]
    problems = [(r.round, kind, e) for r in run.rounds
                for kind, entries in (("declined", r.declined), ("rejected", r.rejected), ("errors", r.errors))
                for e in entries]
    if problems:
        lines += ["", "## Declines, rejected updates and errors", "", "| round | site | what | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {rnd} | {e.get('site') or e.get('node_id')} | {kind} | {e.get('reason', '')} |"
                  for rnd, kind, e in problems]
    return "\n".join(lines) + "\n"


def comparison_text(summary: dict) -> str:
    """How the baseline table was measured, from the summary's `evaluation` section."""
    ev = summary.get("evaluation", {})
    if not ev:
        return "Linear-probe macro AUROC of each encoder on the held-out labelled set (`summary.json`)."
    return (f"Linear-probe macro AUROC of each encoder on the held-out labelled set (`summary.json`): the mean "
            f"over {ev['splits']} patient-level split(s) (test: {ev['test_fraction']:g} of the patients), for "
            f"random init also over {ev['random_inits']} initialisations; 95 % intervals from "
            f"{ev['bootstrap_replicates']} bootstrap replicates (splits, then test patients). A difference whose "
            f"interval contains 0 is no difference.")


def interval_text(ci95) -> str:
    return "-" if not ci95 else f"[{ci95[0]:.3f}, {ci95[1]:.3f}]"


def difference_text(diff: dict | None) -> str:
    return "" if not diff else f"{diff['mean']:+.3f} {interval_text(diff['ci95'])}"


def privacy_text(s: Scenario, rounds: list[RoundRecord]) -> str:
    """Which sites train with DP-SGD (and their target epsilon and unit), and central DP if on, with
    the site-level epsilon its accountant reported after the last round (server/central_dp.py)."""
    dp = {site.name: s.privacy_of(site) for site in s.sites if s.privacy_of(site).enabled}
    parts = [f"DP-SGD at {name} (target epsilon {p.target_epsilon:g} per {p.unit})" for name, p in dp.items()]
    plain = [site.name for site in s.sites if site.name not in dp]
    if plain:
        parts.append(f"no DP at {', '.join(plain)}")
    fed = s.federation
    if fed.central_dp != "none":
        accounted = [r for r in rounds if r.central_epsilon is not None]
        if accounted:
            spent = (f"site-level ({accounted[-1].central_epsilon:.3g}, {accounted[-1].central_delta:.2g})-DP after "
                     f"round {accounted[-1].round}")
        else:
            spent = "no noise, so no epsilon" if fed.central_noise_multiplier == 0 else "no round released yet"
        parts.append(f"central DP ({fed.central_dp}-side clipping at {fed.central_clipping_norm:g}, "
                     f"noise multiplier {fed.central_noise_multiplier:g}; {spent})")
    return "; ".join(parts)


def participation_table(run: Run) -> str:
    rows = participation(run)
    lines = ["| round | " + " | ".join(run.sites) + " | windows aggregated |", "|---" * (len(run.sites) + 2) + "|"]
    for r, row in zip(run.rounds, rows):
        lines.append(f"| {r.round} | " + " | ".join(row.values()) + f" | {r.examples} |")
    lines += ["", (f"{TRAINED}: its update was aggregated; {DECLINED}: it declined the round (privacy budget, or "
                   f"its policy refused the plan); {REJECTED}: its update failed validation; {FAILED}: it replied "
                   f"with an error; {ABSENT}: not sampled or no reply in time.")]
    return "\n".join(lines)


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# -- plots ----------------------------------------------------------------------------------------

def draw_plots(run: Run) -> dict[str, str]:
    """Render the plots as PNGs into the run folder; {name: file name}."""
    plots = {"losses": _loss_figure(run), "seconds": _seconds_figure(run)}
    if any(r.probe_macro_auroc is not None or r.federated_macro_auroc is not None
           for r in run.rounds):
        plots["auroc"] = _auroc_figure(run)
    if epsilon_by_site(run.rounds):
        plots["epsilon"] = _epsilon_figure(run)
    if any(r.embedding_rank is not None for r in run.rounds):
        plots["collapse"] = _collapse_figure(run)
    files = {}
    for name, figure in plots.items():
        files[name] = run.folder.report_plot(name).name
        figure.savefig(run.folder.report_plot(name), dpi=110, bbox_inches="tight")
    return files


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1, nrows: int = 1):
    # a Figure without pyplot draws on the Agg canvas; imported here to keep `fedssl` start-up fast
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False).ravel()


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)


def _loss_figure(run: Run):
    terms = loss_terms(run.rounds)
    rounds = [r.round for r in run.rounds]
    # a component equal to "loss" in every round (a pure objective) gets no panel of its own
    same = [t for t in terms[1:] if all(r.losses.get(t) == r.losses.get("loss") for r in run.rounds)]
    shown = [t for t in terms if t not in same]
    ncols = min(3, len(shown))
    nrows = -(-len(shown) // ncols)
    figure, axes = _figure(max(6.4, 3.4 * ncols), 2.8 * nrows + 0.6, ncols, nrows)
    for ax, term in zip(axes, shown):
        ax.plot(rounds, [r.losses.get(term) for r in run.rounds], marker="o")
        ax.set_title(term + (f" (= {', '.join(same)})" if term == "loss" and same else ""))
        _round_axis(ax, rounds)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    figure.suptitle("loss terms per round (mean over the sites that trained)")
    return figure


def _auroc_figure(run: Run):
    rounds = [r.round for r in run.rounds]
    figure, (ax,) = _figure()
    ax.plot(rounds, [r.probe_macro_auroc for r in run.rounds], marker="o", color="C0", label="global encoder")
    band = [(r.round, *r.probe_macro_auroc_ci95) for r in run.rounds if r.probe_macro_auroc_ci95]
    if band:
        x, low, high = zip(*band)
        ax.fill_between(x, low, high, color="C0", alpha=0.2, label="global encoder, 95 % interval")
    if any(r.federated_macro_auroc is not None for r in run.rounds):
        ax.plot(rounds, [r.federated_macro_auroc for r in run.rounds], marker="s", color="C1",
                label="federated evaluation (sites' mean)")
    baselines = (run.summary or {}).get("encoders", {})
    # random init is the reference every other line is read against: solid and black
    styles = {"random_init": {"color": "k", "linestyle": "-", "linewidth": 1.2}}
    for i, (name, result) in enumerate((n, e) for n, e in baselines.items() if n != "federated"):
        if result.get("macro_auroc") is None:
            continue
        style = styles.get(name, {"color": f"C{i + 2}", "linestyle": ":"})
        ax.axhline(result["macro_auroc"], **style, label=f"{name} (end of run)")
        if result.get("ci95"):
            ax.axhspan(*result["ci95"], color=style["color"], alpha=0.08)
    ax.set_ylabel("macro AUROC")
    ax.set_title("linear-probe macro AUROC of the global encoder")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _round_axis(ax, rounds)
    return figure


def _collapse_figure(run: Run):
    rounds = [r.round for r in run.rounds]
    figure, (rank, std) = _figure(9.6, 3.2, ncols=2)
    ranks = [r.embedding_rank for r in run.rounds]
    rank.plot(rounds, ranks, marker="o")
    known = [v for v in ranks if v is not None]
    rank.axhline(RANK_DROP_WARNING * max(known), linestyle="--", color="C3", linewidth=0.8,
                 label="warning: half the maximum")
    rank.set_title("effective rank (RankMe)")
    rank.set_ylim(bottom=0)
    rank.legend(fontsize="small")
    std.plot(rounds, [r.embedding_std for r in run.rounds], marker="o", color="C1")
    std.set_title("mean std of normalised embeddings")
    std.set_ylim(bottom=0)
    for ax in (rank, std):
        _round_axis(ax, rounds)
    return figure


def _epsilon_figure(run: Run):
    rounds = [r.round for r in run.rounds]
    figure, (ax,) = _figure()
    declined = {(r.round, d.get("site")) for r in run.rounds for d in r.declined}
    for i, (site, values) in enumerate(epsilon_by_site(run.rounds).items()):
        color = f"C{i}"
        ax.plot(rounds, values, marker="o", color=color, label=site)
        if site in run.sites:
            ax.axhline(run.scenario.privacy_of(run.scenario.site(site)).target_epsilon, color=color,
                       linestyle="--", linewidth=0.8, label=f"{site} budget")
        spent = [v for v in values if v is not None]
        off = [rnd for rnd in rounds if (rnd, site) in declined]
        if off and spent:
            ax.plot(off, [spent[-1]] * len(off), "x", color=color, markersize=9, label=f"{site} declined")
    ax.set_ylabel("epsilon spent so far")
    ax.set_ylim(bottom=0)
    ax.set_title("privacy spent per DP site (cumulative)")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _round_axis(ax, rounds)
    return figure


def _seconds_figure(run: Run):
    rounds = [r.round for r in run.rounds]
    training = [r.seconds for r in run.rounds]
    figure, (ax,) = _figure()
    ax.bar(rounds, training, label="round (send, train, aggregate)")
    probe = ax.bar(rounds, [r.probe_seconds for r in run.rounds], bottom=training, label="server probe")
    ax.bar_label(probe, labels=[f"{t + r.probe_seconds:.1f}s" for t, r in zip(training, run.rounds)],
                 fontsize="small")  # a slow first round must not hide the others' numbers
    if any(r.compute_seconds for r in run.rounds):  # each site's training loop alone
        ax.plot(rounds, [max(r.compute_seconds.values()) if r.compute_seconds else None
                         for r in run.rounds], "k_", markersize=22, markeredgewidth=2,
                label="slowest site's training")
    ax.set_ylabel("seconds")
    ax.set_title("wall time per round (round 1 includes the sites' start-up)")
    ax.legend(fontsize="small")
    _round_axis(ax, rounds)
    return figure
