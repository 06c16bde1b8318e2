//! The live status page: one self-contained HTML document (no external assets), static; its
//! script reads the admin token from the URL fragment (`#token=...`, never sent to the server
//! in the request line) and polls the API with it.

pub const STATUS_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Portcullis status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d232b; }
  header { background: #1d232b; color: #fff; padding: 10px 20px; display: flex; gap: 24px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  main { padding: 16px 20px; display: grid; gap: 16px; }
  section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 12px 16px; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: right; padding: 4px 8px; border-bottom: 1px solid #eef0f3; font-variant-numeric: tabular-nums; }
  th:first-child, td:first-child { text-align: left; }
  #error { color: #b00020; font-weight: 600; }
  .bad { color: #b00020; } .ok { color: #1b7f3b; }
  svg { width: 100%; height: 220px; background: #fbfcfd; border: 1px solid #eef0f3; }
  .legend span { margin-right: 14px; }
</style>
</head>
<body>
<header><h1>Portcullis</h1><span id="summary">connecting…</span><span id="error"></span></header>
<main>
  <section>
    <h2>Routes (latency percentiles over the last <span id="window">60</span> s)</h2>
    <table id="routes"><thead><tr><th>route</th><th>req/s</th><th>requests</th><th>4xx/s</th><th>5xx/s</th><th>429</th><th>gateway p50 ms</th><th>gateway p99 ms</th><th>upstream p50 ms</th><th>upstream p99 ms</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Latency history: whole request (gateway + upstream), p50 solid, p99 dashed; requests per second dotted</h2>
    <svg id="chart" viewBox="0 0 800 220" preserveAspectRatio="none"></svg>
    <div class="legend" id="legend"></div>
  </section>
  <section>
    <h2>Upstream servers</h2>
    <table id="upstreams"><thead><tr><th>upstream / server</th><th>state</th><th>in flight</th><th>latency ms</th><th>requests</th><th>connect failures</th><th>timeouts</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Sources dropped by XDP</h2>
    <table id="xdp"><thead><tr><th>source</th><th>packets</th><th>drops</th></tr></thead><tbody></tbody></table>
    <p id="xdp-none"></p>
  </section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const POLL_MS = 2000, HISTORY = 300;
const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const history = {};
let previous = null;

async function api(path) {
  const r = await fetch(path, { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (r.status === 401) throw new Error("the admin token is missing or wrong: open this page as /#token=YOUR_TOKEN");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function ms(seconds) { return seconds == null ? "–" : (seconds * 1000).toFixed(2); }
function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const r of rows) { const tr = body.insertRow(); r(tr); }
}

function draw() {
  const svg = document.getElementById("chart");
  const ids = Object.keys(history);
  let max = 1, maxRate = 1;
  for (const id of ids) for (const p of history[id]) { max = Math.max(max, p.p99 || 0, p.p50 || 0); maxRate = Math.max(maxRate, p.rate || 0); }
  const parts = [];
  ids.forEach((id, i) => {
    const pts = history[id], color = colors[i % colors.length];
    const x = k => (800 * (HISTORY - pts.length + k) / (HISTORY - 1)).toFixed(1);
    const line = (key, scale, dash) => {
      const d = pts.map((p, k) => (p[key] == null ? null : x(k) + "," + (215 - 205 * p[key] / scale).toFixed(1))).filter(Boolean);
      if (d.length > 1) parts.push('<polyline fill="none" stroke="' + color + '" stroke-width="1.5"' + (dash ? ' stroke-dasharray="' + dash + '"' : "") + ' points="' + d.join(" ") + '"/>');
    };
    line("p50", max, ""); line("p99", max, "5,3"); line("rate", maxRate, "1,3");
  });
  svg.innerHTML = parts.join("");
  document.getElementById("legend").innerHTML = ids.map((id, i) => '<span style="color:' + colors[i % colors.length] + '">■ ' + id.replace(/[<&]/g, "") + "</span>").join("") +
    "<span>top of the chart: " + max.toFixed(2) + " ms, " + maxRate.toFixed(1) + " req/s</span>";
}

async function poll() {
  try {
    const [status, stats, ups] = await Promise.all([api("/status"), api("/stats"), api("/upstreams")]);
    document.getElementById("error").textContent = "";
    document.getElementById("summary").textContent =
      "v" + status.version + " · up " + status.uptime_seconds + " s · " + status.workers + " workers · " +
      status.routes + " routes · reloads " + status.reloads.accepted + (status.draining ? " · DRAINING" : "");
    document.getElementById("window").textContent = stats.window_seconds;
    const now = Date.now(), dt = previous ? (now - previous.at) / 1000 : null;
    const rows = [];
    for (const r of stats.routes) {
      if (r.id === "(none)" && r.requests === 0) continue;
      const before = previous && previous.routes[r.id];
      const rate = (k) => (before && dt ? Math.max(0, (r[k] - before[k]) / dt) : null);
      const reqRate = rate("requests");
      const whole = (g, u) => (g == null ? null : (g + (u || 0)) * 1000);
      (history[r.id] = history[r.id] || []).push({ p50: whole(r.p50, r.upstream_p50), p99: whole(r.p99, r.upstream_p99), rate: reqRate });
      if (history[r.id].length > HISTORY) history[r.id].shift();
      rows.push(tr => {
        tr.dataset.route = r.id;
        cell(tr, r.id);
        cell(tr, reqRate == null ? "–" : reqRate.toFixed(1), "rate");
        cell(tr, r.requests, "requests");
        cell(tr, rate("client_errors") == null ? "–" : rate("client_errors").toFixed(1));
        cell(tr, rate("server_errors") == null ? "–" : rate("server_errors").toFixed(1), r.server_errors ? "bad" : "");
        cell(tr, r.refused, "refused");
        cell(tr, ms(r.p50), "p50");
        cell(tr, ms(r.p99), "p99");
        cell(tr, ms(r.upstream_p50), "upstream-p50");
        cell(tr, ms(r.upstream_p99), "upstream-p99");
      });
    }
    fill("routes", rows);
    const byId = {}; for (const r of stats.routes) byId[r.id] = r;
    previous = { at: now, routes: byId };
    const upRows = [];
    for (const u of ups.upstreams) for (const s of u.servers) upRows.push(tr => {
      cell(tr, u.name + " / " + s.address);
      const state = s.healthy === false ? "unhealthy" : s.ejected_for_ms ? "ejected " + Math.ceil(s.ejected_for_ms / 1000) + " s" : "healthy";
      cell(tr, state, state === "healthy" ? "ok" : "bad");
      cell(tr, s.in_flight);
      cell(tr, s.latency_ewma_ms == null ? "" : s.latency_ewma_ms.toFixed(1));
      cell(tr, s.requests);
      cell(tr, s.connect_failures, s.connect_failures ? "bad" : "ok");
      cell(tr, s.timeouts, s.timeouts ? "bad" : "ok");
    });
    fill("upstreams", upRows);
    const top = stats.xdp ? stats.xdp.top_sources : [];
    fill("xdp", top.map(s => tr => { cell(tr, s.address); cell(tr, s.packets); cell(tr, s.drops, s.drops ? "bad" : ""); }));
    document.getElementById("xdp-none").textContent = stats.xdp ? "" : "XDP is not configured on this gateway.";
    draw();
    document.body.dataset.updated = String(now);
  } catch (e) {
    document.getElementById("error").textContent = e.message;
  }
}
poll();
setInterval(poll, POLL_MS);
</script>
</body>
</html>
"##;
