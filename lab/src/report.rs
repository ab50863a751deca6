//! Writes a run's report: `report.json` for programs (docs/report.md), `report.html` for people
//! (maud), and each figure as an SVG of its own under `figures/` (crate::figures), to be taken
//! out into a paper or a slide; each peer's log goes to `logs/NAME.log`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::figures::{self, Figure};
use crate::progress::human;
use crate::runner::{Percentiles, Report};

/// Writes `report.json`, `report.html`, `figures/*.svg` and the peers' logs into `dir`
/// (created if needed).
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<()> {
    for sub in ["logs", "figures"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report).expect("reports serialise");
    std::fs::write(dir.join("report.json"), json).context("cannot write report.json")?;
    let figures = figures::all(report)?;
    for f in &figures {
        std::fs::write(dir.join("figures").join(format!("{}.svg", f.id)), &f.svg).context("cannot write a figure")?;
    }
    std::fs::write(dir.join("report.html"), page(report, &figures).into_string())
        .context("cannot write report.html")?;
    for (peer, lines) in &report.logs {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(dir.join("logs").join(format!("{peer}.log")), text).context("cannot write a peer log")?;
    }
    Ok(())
}

fn ms(ms: f64) -> String {
    human(Duration::from_secs_f64(ms.max(0.0) / 1000.0))
}

fn page(r: &Report, figures: &[Figure]) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (r.scenario) " — meshlab report" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    h1 {
                        @if r.passed { span.pass { "PASS" } } @else { span.fail { "FAIL" } }
                        " " (r.scenario)
                    }
                    @if !r.description.is_empty() { p.desc { (r.description) } }
                    p {
                        (r.backend) " backend"
                        @if r.time_scale != 1.0 { " (deadlines ×" (r.time_scale) ")" }
                        " · " (ms(r.wall_ms)) " wall time · " (r.delivery.said) " lines said"
                    }
                    p.desc {
                        (r.method)
                        @if r.cooperative { " — cuts and link conditions here are " b { "cooperative" } ": the peers under test apply them" }
                    }
                }
                @if let Some(f) = &r.failure {
                    pre.failure { "step " (f.step) " (line " (f.line) "): " (f.action) "\n" (f.error) }
                }
                (delivery(r))
                @for f in figures {
                    figure id=(f.id) {
                        figcaption { (f.title) " " a href={ "figures/" (f.id) ".svg" } { "(SVG)" } }
                        div.plot { (PreEscaped(&f.svg)) }
                        p.note { (caption(f.id)) }
                    }
                }
                (chaos(r))
                (steps(r))
                script { (PreEscaped(OVERFLOW_CHECK)) }
            }
        }
    }
}

/// Marks the page when anything is wider than the window (checked in a headless browser by
/// the tests).
const OVERFLOW_CHECK: &str =
    "document.body.dataset.overflow = String(document.documentElement.scrollWidth > window.innerWidth);";

fn caption(id: &str) -> &'static str {
    match id {
        "timeline" => {
            "One row per peer. Blue bars: a process running; green and red ticks: a neighbour up and down (left out above 4,000); shaded: partitions, cuts and link conditions across the mesh, and each peer's pauses and downtime."
        }
        "latency" => {
            "Each showing's latency against when its line was said; direct showings and those caught up after a reconnection apart. Faults shaded behind."
        }
        "cdf" => "The share of showings within a given latency.",
        "rate" => "Lines said, and first showings, in each second of the run.",
        "connections" => {
            "Pairs of peers connected, from the links each side reports; the grey line is a full mesh of every peer named."
        }
        _ => {
            "The mesh at the end: up to 16 peers on a circle (blue: connected, dashed red: cut, grey: not running); above, an adjacency matrix."
        }
    }
}

fn delivery(r: &Report) -> Markup {
    let d = &r.delivery;
    let troubled: Vec<_> =
        d.per_receiver.iter().filter(|(_, rc)| rc.lost + rc.duplicated + rc.out_of_order + rc.gapped > 0).collect();
    let quiet = d.per_receiver.len() - troubled.len();
    html! {
        h2 { "Delivery" }
        table {
            tr { th { "lines said" } th { "owed showings" } th { "shown" } th { "lost" } th { "duplicated" } th { "out of order" } th { "gapped" } }
            tr { td { (d.said) } td { (d.owed) } td { (d.shown) } td { (d.lost) } td { (d.duplicated) } td { (d.out_of_order) } td { (d.gapped) } }
        }
        @if !troubled.is_empty() {
            table {
                tr { th { "receiver" } th { "owed" } th { "shown" } th { "lost" } th { "duplicated" } th { "out of order" } th { "gapped" } }
                @for (name, rc) in &troubled {
                    tr { td { (name) } td { (rc.owed) } td { (rc.shown) } td { (rc.lost) } td { (rc.duplicated) } td { (rc.out_of_order) } td { (rc.gapped) } }
                }
            }
        }
        @if quiet > 0 {
            p.note {
                @if troubled.is_empty() { "All " } @else { "The other " }
                (quiet) " receivers showed every line owed to them once, in order."
            }
        }
        @for example in &d.lost_examples { p.fail { "lost: " (example) } }
        table {
            tr { th { "latency" } th { "showings" } th { "p50" } th { "p99" } th { "max" } }
            @for (label, p) in [("direct", &r.latency_direct), ("caught up", &r.latency_catch_up)] {
                @let Percentiles { count, p50_ms, p99_ms, max_ms } = p;
                tr { td { (label) } td { (count) } td { (ms(*p50_ms)) } td { (ms(*p99_ms)) } td { (ms(*max_ms)) } }
            }
        }
    }
}

fn chaos(r: &Report) -> Markup {
    html! {
        @for step in &r.steps {
            @if let Some(chaos) = &step.chaos {
                h2 { "Chaos (step " (step.index) ")" }
                p {
                    "seed " (chaos.seed) " · " (chaos.lines) " lines said · " (chaos.fault_count()) " faults"
                    @if chaos.faults.len() < chaos.fault_count() { ", the first " (chaos.faults.len()) " listed" }
                }
                table {
                    tr { th { "at" } th { "fault" } }
                    @for f in &chaos.faults {
                        tr {
                            td { (ms(step.started_ms + f.at_ms as f64)) }
                            td { (describe(&f.action)) }
                        }
                    }
                }
            }
        }
    }
}

fn describe(action: &crate::chaos::Action) -> String {
    match action {
        crate::chaos::Action::Fault(f) => f.to_string(),
        crate::chaos::Action::Say { say } => format!("{say} says a line"),
    }
}

fn steps(r: &Report) -> Markup {
    html! {
        h2 { "Steps" }
        table {
            tr { th { "#" } th { "line" } th { "step" } th { "at" } th { "took" } th { "" } }
            @for s in &r.steps {
                tr {
                    td { (s.index) } td { (s.line) }
                    td { (s.action) @if let Some(n) = &s.note { br; small { (n) } } }
                    td { (ms(s.started_ms)) } td { (ms(s.elapsed_ms)) }
                    td {
                        @if s.ok { "ok" } @else { span.fail { "failed" } }
                        " " small { (s.detail.as_deref().unwrap_or_default()) }
                    }
                }
            }
        }
    }
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:.5em 0;max-width:100%}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}\
.pass{color:#1a7f37}.fail{color:#c62828}.failure{background:#fdecea;padding:1em;white-space:pre-wrap;overflow-wrap:anywhere}\
.desc,.note{color:#555}figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.3em}\
.plot svg{max-width:100%;height:auto;border:1px solid #ddd}";
