// The dashboard page: polls /api/run (dashboard/view.py's JSON) and redraws what changed.
// Every text that comes from the run folder (site names, reasons, errors) is set as textContent,
// never as HTML: a site's error reason is not trusted markup.
"use strict";

const POLL_MS = 1000;
const COLORS = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#0c8599", "#f08c00", "#5c940d", "#d6336c"];
const SYMBOL = {trained: "\u2713", declined: "D", rejected: "R", error: "E", "-": "\u00b7"};
const CSS_STATE = {trained: "trained", declined: "declined", rejected: "rejected", error: "error", "-": "absent"};
const PLOT_CONFIG = {displayModeBar: false, responsive: true};

let etag = null;
let view = null;
let clockOffset = 0; // server time minus this browser's time, seconds

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${s} s`;
}

function number(value, digits = 3) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function serverNow() {
  return Date.now() / 1000 + clockOffset;
}

function layout(title, yTitle, extra = {}) {
  const rounds = view.round_numbers;
  return {
    title: {text: title, x: 0, xanchor: "left", font: {size: 14}},
    margin: {l: 56, r: 16, t: 34, b: 56},
    xaxis: {dtick: rounds.length <= 20 ? 1 : undefined, zeroline: false,
            range: rounds.length ? [rounds[0] - 0.5, rounds[rounds.length - 1] + 0.5] : [0.5, 1.5]},
    yaxis: {title: {text: yTitle}, zeroline: false},
    legend: {orientation: "h", x: 0, y: -0.1, yanchor: "top", traceorder: "normal", font: {size: 11}},
    bargap: 0.35,
    paper_bgcolor: "#ffffff", plot_bgcolor: "#ffffff",
    ...extra,
  };
}

function draw(id, traces, plotLayout) {
  // a stable uid per trace: Plotly.react then matches a trace to its drawing when traces come and go
  // (Plotly puts it in CSS selectors: letters, digits and dashes only)
  traces.forEach((trace, i) => { trace.uid = trace.uid ?? `${id}-${trace.name ?? i}`.replace(/[^A-Za-z0-9-]/g, "-"); });
  Plotly.react(document.getElementById(id), traces, plotLayout, PLOT_CONFIG);
}

function renderHeader() {
  const scenario = view.scenario;
  document.getElementById("scenario-name").textContent = scenario ? scenario.name : "(no scenario.yaml yet)";
  const state = document.getElementById("state");
  state.textContent = view.state;
  state.className = `badge ${view.state}`;
  document.getElementById("round-counter").textContent = String(view.round);
  document.getElementById("round-total").textContent = view.rounds === null ? "?" : String(view.rounds);
  document.getElementById("meta").textContent = scenario
    ? `${scenario.objective} objective, ${scenario.strategy}, ${scenario.encoder} encoder, ` +
      `${scenario.local_steps} local steps per round` +
      (scenario.central_dp !== "none" ? `, central DP (${scenario.central_dp}-side clipping)` : "")
    : "";
  document.getElementById("run-dir").textContent = view.run_dir;
  document.title = `fedssl ${scenario ? scenario.name : ""}: round ${view.round}/${view.rounds ?? "?"}, ${view.state}`;

  const error = document.getElementById("error");
  const lines = [view.error, ...view.log_errors].filter(Boolean);
  error.hidden = view.state !== "failed";
  error.textContent = lines.length ? lines.join("\n") : "failed (no error line recorded)";
  const problems = document.getElementById("problems");
  problems.hidden = view.problems.length === 0;
  problems.textContent = view.problems.join("; ");
}

function tick() {
  if (!view) return;
  const t = view.time;
  const end = t.ended ?? serverNow();
  document.getElementById("elapsed").textContent = t.started ? duration(end - t.started) : "-";
  document.getElementById("remaining").textContent =
    view.state === "finished" ? "0 s" : t.remaining_seconds === null ? "-" : `~${duration(t.remaining_seconds)}`;
  const since = t.ended ?? t.last_update; // a finished run: how long ago it ended; else its last round
  document.getElementById("last-update-label").textContent = t.ended ? "ended" : "last round recorded";
  document.getElementById("last-update").textContent = since ? `${duration(serverNow() - since)} ago` : "-";
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = `${duration(serverNow() - Number(node.dataset.since))} ago`;
  }
}

function ago(since) {
  return el("span", {class: "ago", "data-since": String(since), text: `${duration(serverNow() - since)} ago`});
}

// The "last seen" cell. With presence.json: an online / offline badge while rounds run (its title says
// why a site is offline) and when and in which round the site was last seen; without it (an older
// run), the last round the site replied in.
function seenCell(site) {
  const presence = site.presence;
  if (!presence) {
    if (site.last_replied === null) return el("td", {class: "seen", text: "never replied"});
    const behind = view.round - site.last_replied;
    return el("td", {class: behind ? "seen behind" : "seen current",
                     text: `last replied in round ${site.last_replied}` + (behind ? ` (${behind} behind)` : "")});
  }
  const cell = el("td", {class: "presence"});
  if (presence.online !== null) {
    const stale = view.presence.stale_since;
    cell.append(el("span", {
      class: `badge ${presence.online ? "online" : "offline"}`, text: presence.online ? "online" : "offline",
      title: presence.online ? "connected to the SuperLink at the ServerApp's last poll"
        : stale ? `no news: the ServerApp has not written presence.json since ${new Date(stale * 1000).toISOString()}`
        : "not connected to the SuperLink at the ServerApp's last poll",
    }));
  }
  if (presence.online) return cell;
  if (presence.last_seen === null) cell.append(" not seen yet");
  else cell.append(" ", ago(presence.last_seen), presence.round === null ? "" : ` (round ${presence.round})`);
  return cell;
}

function renderSites() {
  document.getElementById("rounds-head").replaceChildren(
    ...view.round_numbers.map((r) => el("span", {
      text: view.round_numbers.length <= 20 || r === 1 || r % 5 === 0 ? String(r) : "",
    })));
  const body = document.querySelector("#sites tbody");
  const sites = view.sites.map((site) => {
    let privacy;
    if (site.dp) {
      const spent = site.epsilon ?? 0;
      const fraction = site.budget ? Math.min(1, spent / site.budget) : 0;
      const bar = el("span", {class: fraction >= 1 ? "bar full" : "bar"},
                     el("span", {style: `width:${100 * fraction}%`}));
      privacy = el("div", {class: "budget"}, bar,
        el("span", {text: `${number(site.epsilon, 2)} / ${site.budget} per ${site.unit}` +
                          (site.delta !== null ? ` (\u03b4 ${site.delta.toExponential(0)})` : "")}));
    } else {
      privacy = el("span", {class: "meta", text: "no DP-SGD"});
    }
    const grid = el("div", {class: "grid"}, ...site.cells.map((cell) => el("span", {
      class: `cell ${CSS_STATE[cell.state] ?? "absent"}`,
      "data-site": site.name, "data-round": String(cell.round), "data-state": cell.state,
      title: `round ${cell.round}: ${cell.state === "-" ? "not sampled or no reply" : cell.state}` +
             (cell.reason ? ` \u2014 ${cell.reason}` : ""),
      text: SYMBOL[cell.state] ?? "?",
    })));
    return el("tr", {"data-site": site.name},
      el("td", {text: site.name}), seenCell(site),
      el("td", {class: "num", text: site.windows ?? "-"}), el("td", {}, privacy), el("td", {}, grid));
  });
  // SuperNodes that name no site of the scenario: not replied yet (simulated nodes have no names) or
  // registered under another name
  const others = view.other_nodes.map((node) => el("tr", {class: "other", "data-node": node.name},
    el("td", {text: node.name}), seenCell({presence: node}),
    el("td", {colspan: "3", class: "meta",
              text: node.site === null ? "not matched to a site yet: named by its first reply"
                : "registered under a name that is not a site of this scenario"})));
  body.replaceChildren(...sites, ...others);
}

function renderAuroc() {
  const x = view.round_numbers, probe = view.probe, traces = [];
  if (probe.ci95.some((ci) => ci)) {
    traces.push({x, y: probe.ci95.map((ci) => ci && ci[1]), mode: "lines", line: {width: 0}, hoverinfo: "skip",
                 showlegend: false, name: "interval high"});
    traces.push({x, y: probe.ci95.map((ci) => ci && ci[0]), mode: "lines", line: {width: 0}, fill: "tonexty",
                 fillcolor: "rgba(28,126,214,0.18)", name: "95 % interval", hoverinfo: "skip"});
  }
  traces.push({x, y: probe.auroc, mode: "lines+markers", name: "global encoder", uid: "auroc-main",
               line: {color: COLORS[0]}, marker: {size: 7}});
  if (probe.federated.some((v) => v !== null)) {
    traces.push({x, y: probe.federated, mode: "lines+markers", name: "sites' own probes (mean)",
                 line: {color: COLORS[1], dash: "dash"}});
  }
  const reference = probe.random_init;
  const annotations = [];
  if (reference && reference.macro_auroc !== null && x.length) {
    const ends = [x[0] - 0.5, x[x.length - 1] + 0.5];
    if (reference.ci95) {
      traces.push({x: ends, y: [reference.ci95[1], reference.ci95[1]], mode: "lines", line: {width: 0},
                   showlegend: false, hoverinfo: "skip", uid: "random-init-high"});
      traces.push({x: ends, y: [reference.ci95[0], reference.ci95[0]], mode: "lines", line: {width: 0},
                   fill: "tonexty", fillcolor: "rgba(134,142,150,0.18)", showlegend: false, hoverinfo: "skip",
                   uid: "random-init-low"});
    }
    traces.push({x: ends, y: [reference.macro_auroc, reference.macro_auroc], mode: "lines", uid: "random-init",
                 name: `random init${reference.inits > 1 ? ` (mean of ${reference.inits} inits)` : ""}`,
                 line: {color: "#495057", dash: "dot"}});
  } else {
    annotations.push({text: "random-init reference: once the run is compared (summary.json)", showarrow: false,
                      xref: "paper", yref: "paper", x: 1, y: 1.06, xanchor: "right",
                      font: {size: 10, color: "#868e96"}});
  }
  draw("auroc", traces, layout("Linear-probe macro AUROC per round", "macro AUROC", {annotations}));
}

function renderLosses() {
  // the minimised loss first and widest: a term equal to it (a pure objective) is drawn on top, not hidden
  const traces = Object.entries(view.losses).map(([term, values], i) => ({
    x: view.round_numbers, y: values, mode: "lines+markers", name: term,
    line: {color: COLORS[i % COLORS.length], width: term === "loss" ? 5 : 2},
  }));
  draw("losses", traces, layout("Loss terms per round (mean over the sites that trained)", "loss"));
}

function renderPrivacy() {
  const dpSites = view.sites.filter((site) => site.dp);
  const central = view.central_dp;
  document.getElementById("privacy-panel").hidden = dpSites.length === 0 && !central;
  if (dpSites.length === 0 && !central) return;
  const x = view.round_numbers, traces = [];
  const ends = x.length ? [x[0] - 0.5, x[x.length - 1] + 0.5] : [0.5, 1.5];
  dpSites.forEach((site, i) => {
    const color = COLORS[i % COLORS.length];
    traces.push({x, y: site.epsilon_by_round, mode: "lines+markers", name: `${site.name} (DP-SGD)`,
                 line: {color}, connectgaps: true});
    traces.push({x: ends, y: [site.budget, site.budget], mode: "lines", name: `${site.name} budget`,
                 line: {color, dash: "dash", width: 1}});
  });
  if (central) {
    traces.push({x, y: central.central_epsilon, mode: "lines+markers", name: "central DP (site-level)",
                 line: {color: "#212529"}});
  }
  draw("privacy", traces, layout("Privacy spent (\u03b5) per round against each site's budget", "\u03b5",
                                {yaxis: {title: {text: "\u03b5"}, rangemode: "tozero", zeroline: false}}));
}

function renderCollapse() {
  const collapse = view.collapse;
  document.getElementById("collapse-panel").hidden = !collapse;
  if (!collapse) return;
  const x = view.round_numbers;
  draw("collapse", [
    {x, y: collapse.embedding_rank, mode: "lines+markers", name: "effective rank", line: {color: COLORS[3]}},
    {x, y: collapse.embedding_std, mode: "lines+markers", name: "embedding std", yaxis: "y2",
     line: {color: COLORS[4], dash: "dash"}},
  ], layout("Collapse monitor per round: embeddings of the global encoder", "effective rank",
            // automargin: the right margin grows to the second axis's tick labels and title (16 px clipped
            // them); its ticks, aligned to the rank's grid lines, get 3 significant digits, even near collapse
            {yaxis2: {title: {text: "std"}, overlaying: "y", side: "right", zeroline: false, automargin: true,
                      tickformat: ".3~g"}}));
}

function renderWall() {
  const x = view.round_numbers, wall = view.wall;
  const split = wall.compute.some((v) => v !== null);
  const traces = split
    ? [{x, y: wall.compute, type: "bar", name: "compute (slowest site's training)", marker: {color: COLORS[0]}},
       {x, y: wall.overhead, type: "bar", name: "overhead (communication, waiting, aggregation)",
        marker: {color: "#adb5bd"}}]
    : [{x, y: wall.seconds, type: "bar", name: "round (training + communication)", marker: {color: COLORS[0]}}];
  traces.push({x, y: wall.probe, type: "bar", name: "probe", marker: {color: COLORS[2]}});
  draw("wall", traces, layout("Wall time per round", "seconds", {barmode: "stack"}));
}

function interval(ci) {
  return Array.isArray(ci) ? `[${number(ci[0])}, ${number(ci[1])}]` : "-";
}

function renderEncoders() {
  const encoders = Object.entries(view.encoders);
  document.getElementById("encoders-panel").hidden = encoders.length === 0;
  document.querySelector("#encoders tbody").replaceChildren(...encoders.map(([name, result]) => {
    const difference = result.federated_minus;
    return el("tr", {},
      el("td", {text: name}), el("td", {class: "num", text: number(result.macro_auroc)}),
      el("td", {class: "num", text: interval(result.ci95)}),
      el("td", {class: "num", text: difference ? `${number(difference.mean)} ${interval(difference.ci95)}` : "-"}));
  }));
}

function render() {
  renderHeader();
  renderSites();
  renderAuroc();
  renderLosses();
  renderPrivacy();
  renderCollapse();
  renderWall();
  renderEncoders();
  tick();
}

function connection(ok, why = "") {
  const node = document.getElementById("connection");
  node.className = ok ? "connection" : "connection lost";
  node.textContent = ok ? "\u25cf live" : `\u25cf ${why}; retrying`;
}

async function refresh() {
  let response;
  try {
    response = await fetch("/api/run", {headers: etag ? {"If-None-Match": etag} : {}, cache: "no-store"});
  } catch (err) {
    connection(false, "the dashboard server is unreachable");
    return;
  }
  if (response.status === 200) {
    view = await response.json();
    clockOffset = view.now - Date.now() / 1000;
    render();
    etag = response.headers.get("ETag"); // only once drawn: a failed render is retried on the next poll
  }
  connection(response.status === 200 || response.status === 304, `the dashboard server answered ${response.status}`);
}

async function poll() {
  try {
    await refresh();
  } catch (err) {
    console.error("fedssl dashboard: cannot draw the run", err);
  } finally {
    tick();
    setTimeout(poll, POLL_MS);
  }
}

poll();
