//! Writes a run's report: `report.json` for programs and `report.html` for people, with the
//! steps, the delivery figures, a timeline of every peer and the final mesh drawn as a graph.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::runner::{Percentiles, Report};

/// Writes `report.json`, `report.html` and each peer's log (`logs/NAME.log`, its stderr) into
/// `dir` (created if needed).
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).expect("reports serialise");
    std::fs::write(dir.join("report.json"), json).context("cannot write report.json")?;
    std::fs::write(dir.join("report.html"), html(report)).context("cannot write report.html")?;
    for (peer, lines) in &report.logs {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(dir.join("logs").join(format!("{peer}.log")), text).context("cannot write a peer log")?;
    }
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html(r: &Report) -> String {
    let mut h = String::new();
    let verdict = if r.passed { "<span class=pass>PASS</span>" } else { "<span class=fail>FAIL</span>" };
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>{name} — meshlab report</title><style>{CSS}</style></head><body>\
         <h1>{verdict} {name}</h1><p class=desc>{desc}</p>\
         <p>{backend} backend{scale} · {wall:.2} s wall time</p><p class=desc>{method}{cooperative}</p>",
        name = esc(&r.scenario),
        desc = esc(&r.description),
        backend = esc(&r.backend),
        method = esc(&r.method),
        cooperative = if r.cooperative {
            " — cuts and link conditions here are <b>cooperative</b>: the peers under test apply them"
        } else {
            ""
        },
        scale = if r.time_scale == 1.0 { String::new() } else { format!(" (deadlines ×{})", r.time_scale) },
        wall = r.wall_ms / 1000.0,
    );
    if let Some(f) = &r.failure {
        let _ = write!(
            h,
            "<pre class=failure>step {} (line {}): {}\n{}</pre>",
            f.step,
            f.line,
            esc(&f.action),
            esc(&f.error)
        );
    }
    let d = &r.delivery;
    let _ = write!(
        h,
        "<h2>Delivery</h2><table><tr><th>lines said</th><th>owed showings</th><th>shown</th><th>lost</th><th>duplicated</th><th>out of order</th><th>gapped</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        d.said, d.owed, d.shown, d.lost, d.duplicated, d.out_of_order, d.gapped
    );
    h.push_str("<table><tr><th>receiver</th><th>owed</th><th>shown</th><th>lost</th><th>duplicated</th><th>out of order</th><th>gapped</th></tr>");
    for (name, rc) in &d.per_receiver {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            rc.owed,
            rc.shown,
            rc.lost,
            rc.duplicated,
            rc.out_of_order,
            rc.gapped
        );
    }
    h.push_str("</table>");
    if let Some(chaos) = r.steps.iter().find_map(|s| s.chaos.as_ref()) {
        let listed = chaos.faults.len();
        let first = if listed < chaos.fault_count() { format!(", the first {listed} listed") } else { String::new() };
        let _ = write!(
            h,
            "<h2>Chaos</h2><p>seed {} · {} lines said · {} faults{first}:</p><ol>",
            chaos.seed,
            chaos.lines,
            chaos.fault_count()
        );
        for f in &chaos.faults {
            let what = serde_json::to_string(&f.action).unwrap_or_default();
            let _ = write!(h, "<li>{:.1} s: {}</li>", f.at_ms as f64 / 1000.0, esc(&what));
        }
        h.push_str("</ol>");
    }
    h.push_str("<table><tr><th>latency</th><th>showings</th><th>p50</th><th>p99</th><th>max</th></tr>");
    for (label, p) in [("direct", &r.latency_direct), ("caught up", &r.latency_catch_up)] {
        let Percentiles { count, p50_ms, p99_ms, max_ms } = p;
        let _ = write!(
            h,
            "<tr><td>{label}</td><td>{count}</td><td>{p50_ms:.2} ms</td><td>{p99_ms:.2} ms</td><td>{max_ms:.2} ms</td></tr>"
        );
    }
    h.push_str("</table><h2>Timeline</h2>");
    h.push_str(&timeline_svg(r));
    h.push_str("<h2>Final mesh</h2>");
    h.push_str(&mesh_svg(r));
    h.push_str("<h2>Steps</h2><table><tr><th>#</th><th>line</th><th>step</th><th>at</th><th>took</th><th></th></tr>");
    for s in &r.steps {
        let status = if s.ok { "ok" } else { "<span class=fail>failed</span>" };
        let note = s.note.as_deref().map(|n| format!("<br><small>{}</small>", esc(n))).unwrap_or_default();
        let detail = s.detail.as_deref().map(esc).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}{note}</td><td>{:.1} ms</td><td>{:.1} ms</td><td>{status} <small>{detail}</small></td></tr>",
            s.index,
            s.line,
            esc(&s.action),
            s.started_ms,
            s.elapsed_ms
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
.pass{color:#1a7f37}.fail{color:#c62828}.failure{background:#fdecea;padding:1em;white-space:pre-wrap}\
.desc{color:#555}svg{background:#fafafa;border:1px solid #ddd}";

/// One row per peer: when its processes ran, its links coming up and down, and the lab's
/// actions (starts, kills, partitions, heals) as markers.
fn timeline_svg(r: &Report) -> String {
    let peers: Vec<&String> = r.mesh.peers.iter().map(|(n, _)| n).collect();
    let row: BTreeMap<&str, usize> = peers.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let (left, width, row_h) = (90.0, 900.0, 22.0);
    let height = 30.0 + row_h * peers.len() as f64;
    let end = r.wall_ms.max(1.0);
    let x = |ms: f64| left + width * (ms / end);
    let mut s = format!("<svg width='{}' height='{height}' xmlns='http://www.w3.org/2000/svg'>", left + width + 20.0);
    for (i, name) in peers.iter().enumerate() {
        let y = 20.0 + row_h * i as f64;
        let _ = write!(s, "<text x='4' y='{}'>{}</text>", y + 14.0, esc(name));
        let _ = write!(
            s,
            "<line x1='{left}' x2='{}' y1='{}' y2='{}' stroke='#eee'/>",
            left + width,
            y + row_h / 2.0,
            y + row_h / 2.0
        );
    }
    // Process lifetimes: from each start to the next exit (or the end).
    let mut alive: BTreeMap<&str, f64> = BTreeMap::new();
    let mut bars = Vec::new();
    for m in &r.timeline {
        match m.kind.as_str() {
            "start" => {
                alive.insert(&m.peer, m.at_ms as f64);
            }
            "exit" => {
                if let Some(from) = alive.remove(m.peer.as_str()) {
                    bars.push((m.peer.as_str(), from, m.at_ms as f64));
                }
            }
            _ => {}
        }
    }
    bars.extend(alive.into_iter().map(|(p, from)| (p, from, end)));
    for (peer, from, to) in bars {
        let Some(&i) = row.get(peer) else { continue };
        let y = 20.0 + row_h * i as f64 + 5.0;
        let _ = write!(
            s,
            "<rect x='{:.1}' y='{y}' width='{:.1}' height='12' fill='#cfe3ff' rx='3'/>",
            x(from),
            (x(to) - x(from)).max(1.0)
        );
    }
    for m in &r.timeline {
        let at = x(m.at_ms as f64);
        let title = format!("<title>{:.0} ms {} {} {}</title>", m.at_ms, esc(&m.peer), esc(&m.kind), esc(&m.detail));
        if m.peer == "*" {
            let colour = if m.kind == "heal" { "#1a7f37" } else { "#c62828" };
            let _ = write!(
                s,
                "<line x1='{at:.1}' x2='{at:.1}' y1='14' y2='{height}' stroke='{colour}' stroke-dasharray='4 3'>{title}</line>\
                 <text x='{:.1}' y='11' fill='{colour}' font-size='10'>{}</text>",
                at + 2.0,
                esc(&m.kind)
            );
            continue;
        }
        let Some(&i) = row.get(m.peer.as_str()) else { continue };
        let y = 20.0 + row_h * i as f64;
        let (colour, h) = match m.kind.as_str() {
            "up" => ("#1a7f37", 6.0),
            "down" => ("#c62828", 6.0),
            "kill" | "exit" => ("#000", 16.0),
            "stop" => ("#555", 16.0),
            "start" => ("#1565c0", 16.0),
            _ => ("#e65100", 10.0),
        };
        let y0 = y + row_h / 2.0 - h / 2.0;
        let _ = write!(
            s,
            "<line x1='{at:.1}' x2='{at:.1}' y1='{y0}' y2='{}' stroke='{colour}' stroke-width='2'>{title}</line>",
            y0 + h
        );
    }
    s.push_str("</svg><p><small>Rows: peers; blue bars: a process running; green/red ticks: a neighbour up/down; black: kill or exit; dashed lines: partitions, cuts (red) and heals (green). Hover for details.</small></p>");
    s
}

/// Peers on a circle; links between connected pairs, cut pairs dashed in red, stopped peers grey.
fn mesh_svg(r: &Report) -> String {
    let n = r.mesh.peers.len().max(1);
    let (cx, cy, radius) = (220.0, 200.0, 150.0);
    let pos: BTreeMap<&str, (f64, f64)> = r
        .mesh
        .peers
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let a = std::f64::consts::TAU * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
            (name.as_str(), (cx + radius * a.cos(), cy + radius * a.sin()))
        })
        .collect();
    let mut s = String::from("<svg width='440' height='400' xmlns='http://www.w3.org/2000/svg'>");
    for (a, b) in &r.mesh.links {
        let ((x1, y1), (x2, y2)) = (pos[a.as_str()], pos[b.as_str()]);
        let _ = write!(
            s,
            "<line x1='{x1:.1}' y1='{y1:.1}' x2='{x2:.1}' y2='{y2:.1}' stroke='#1565c0' stroke-width='1.5'/>"
        );
    }
    for (a, b) in &r.mesh.cuts {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(a.as_str()), pos.get(b.as_str())) else { continue };
        let _ = write!(
            s,
            "<line x1='{x1:.1}' y1='{y1:.1}' x2='{x2:.1}' y2='{y2:.1}' stroke='#c62828' stroke-dasharray='5 4'/>"
        );
    }
    for (name, running) in &r.mesh.peers {
        let (x, y) = pos[name.as_str()];
        let fill = if *running { "#fff" } else { "#ddd" };
        let _ = write!(
            s,
            "<circle cx='{x:.1}' cy='{y:.1}' r='16' fill='{fill}' stroke='#333'/><text x='{x:.1}' y='{:.1}' text-anchor='middle' font-size='11'>{}</text>",
            y + 4.0,
            esc(name)
        );
    }
    let _ = write!(
        s,
        "</svg><p><small>{} links among {} running peers; dashed red: cut; grey: not running.</small></p>",
        r.mesh.links.len(),
        r.mesh.peers.iter().filter(|(_, up)| *up).count()
    );
    s
}
