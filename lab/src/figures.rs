//! The report's figures, each an SVG of its own (plotters): a timeline of every peer on a real
//! time axis with the faults shaded as windows, latency over time, the latency CDF, lines said
//! and shown per second, connections over time, and the final mesh (a circle up to 16 peers,
//! an adjacency matrix above).
//!
//! Fault windows come from the timeline the lab recorded: a partition, cut or link condition
//! lasts until the heal (or the end of its hold) that ends it, a pause until its resume, a
//! peer's downtime from its exit to its next start.

use std::collections::{BTreeMap, BTreeSet};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::runner::Report;
use crate::world::Mark;

/// What a window of time on a figure stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WindowKind {
    Partition,
    Cut,
    Condition,
    Pause,
    Down,
}

impl WindowKind {
    pub fn colour(self) -> RGBColor {
        match self {
            WindowKind::Partition => RGBColor(198, 40, 40),
            WindowKind::Cut => RGBColor(239, 108, 0),
            WindowKind::Condition => RGBColor(123, 31, 162),
            WindowKind::Pause => RGBColor(2, 119, 189),
            WindowKind::Down => RGBColor(97, 97, 97),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            WindowKind::Partition => "partition",
            WindowKind::Cut => "cut",
            WindowKind::Condition => "link condition",
            WindowKind::Pause => "paused",
            WindowKind::Down => "down",
        }
    }
}

/// A fault in force from `from_ms` to `to_ms`: on the whole mesh (`peer` None) or one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub kind: WindowKind,
    pub peer: Option<String>,
    pub from_ms: f64,
    pub to_ms: f64,
    pub label: String,
}

/// The directed pairs a timeline detail names: `a <-> b`, `a -> b`, `a -> b, c -> d`, or a
/// partition's groups `a b | c d` (every pair across groups, both ways). A condition's detail
/// carries its condition after a colon, which is left out.
fn pairs_of(kind: &str, detail: &str) -> BTreeSet<(String, String)> {
    let detail = detail.split(':').next().unwrap_or_default();
    let mut pairs = BTreeSet::new();
    if kind == "partition" {
        let groups: Vec<Vec<&str>> = detail.split('|').map(|g| g.split_whitespace().collect()).collect();
        for (i, x) in groups.iter().enumerate() {
            for y in &groups[i + 1..] {
                for a in x {
                    for b in y {
                        pairs.insert((a.to_string(), b.to_string()));
                        pairs.insert((b.to_string(), a.to_string()));
                    }
                }
            }
        }
        return pairs;
    }
    for part in detail.split(',') {
        if let Some((a, b)) = part.split_once("<->") {
            pairs.insert((a.trim().to_owned(), b.trim().to_owned()));
            pairs.insert((b.trim().to_owned(), a.trim().to_owned()));
        } else if let Some((a, b)) = part.split_once("->") {
            pairs.insert((a.trim().to_owned(), b.trim().to_owned()));
        }
    }
    pairs
}

/// The fault windows of a timeline that ends at `end_ms`.
pub fn windows(timeline: &[Mark], end_ms: f64) -> Vec<Window> {
    let mut done = Vec::new();
    let mut open: Vec<(Window, BTreeSet<(String, String)>)> = Vec::new();
    let mut paused: BTreeMap<&str, f64> = BTreeMap::new();
    let mut down: BTreeMap<&str, f64> = BTreeMap::new();
    let close = |w: Window, at: f64| Window { to_ms: at, ..w };
    for m in timeline {
        let at = m.at_ms as f64;
        match m.kind.as_str() {
            "partition" | "cut" | "condition" => {
                let kind = match m.kind.as_str() {
                    "partition" => WindowKind::Partition,
                    "cut" => WindowKind::Cut,
                    _ => WindowKind::Condition,
                };
                let label = format!("{} {}", m.kind, m.detail);
                let w = Window { kind, peer: None, from_ms: at, to_ms: end_ms, label };
                open.push((w, pairs_of(&m.kind, &m.detail)));
            }
            "heal" | "clear" => {
                let ends = pairs_of("heal", &m.detail);
                let healed = |w: &Window, pairs: &BTreeSet<(String, String)>| {
                    let kind_matches = (m.kind == "clear") == (w.kind == WindowKind::Condition) || m.kind == "heal";
                    kind_matches && (m.detail == "all" || (!pairs.is_empty() && pairs.is_subset(&ends)))
                };
                let (ended, kept): (Vec<_>, Vec<_>) = open.into_iter().partition(|(w, p)| healed(w, p));
                done.extend(ended.into_iter().map(|(w, _)| close(w, at)));
                open = kept;
            }
            "pause" => {
                paused.insert(&m.peer, at);
            }
            "resume" => {
                if let Some(from) = paused.remove(m.peer.as_str()) {
                    done.push(peer_window(WindowKind::Pause, &m.peer, from, at));
                }
            }
            "exit" => {
                down.insert(&m.peer, at);
                if let Some(from) = paused.remove(m.peer.as_str()) {
                    done.push(peer_window(WindowKind::Pause, &m.peer, from, at));
                }
            }
            "start" => {
                if let Some(from) = down.remove(m.peer.as_str()) {
                    done.push(peer_window(WindowKind::Down, &m.peer, from, at));
                }
            }
            _ => {}
        }
    }
    done.extend(open.into_iter().map(|(w, _)| w));
    done.extend(paused.into_iter().map(|(p, from)| peer_window(WindowKind::Pause, p, from, end_ms)));
    done.sort_by(|a, b| a.from_ms.total_cmp(&b.from_ms));
    done
}

fn peer_window(kind: WindowKind, peer: &str, from_ms: f64, to_ms: f64) -> Window {
    Window { kind, peer: Some(peer.to_owned()), from_ms, to_ms, label: format!("{} {peer}", kind.label()) }
}

/// One figure: its id (and file name) and its SVG.
pub struct Figure {
    pub id: &'static str,
    pub title: &'static str,
    pub svg: String,
}

/// Every figure of a report.
pub fn all(r: &Report) -> anyhow::Result<Vec<Figure>> {
    let end_s = (r.wall_ms / 1000.0).max(0.001);
    let windows = windows(&r.timeline, r.wall_ms);
    Ok(vec![
        Figure { id: "timeline", title: "Timeline", svg: timeline(r, &windows, end_s)? },
        Figure { id: "latency", title: "Latency over time", svg: latency_over_time(r, &windows, end_s)? },
        Figure { id: "cdf", title: "Latency distribution", svg: latency_cdf(r)? },
        Figure { id: "rate", title: "Lines said and shown per second", svg: rates(r, end_s)? },
        Figure { id: "connections", title: "Connections over time", svg: connections(r, &windows, end_s)? },
        Figure { id: "mesh", title: "The mesh at the end", svg: mesh(r)? },
    ])
}

const WIDTH: u32 = 960;
const FONT: &str = "sans-serif";

fn canvas<F>(size: (u32, u32), draw: F) -> anyhow::Result<String>
where
    F: FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> anyhow::Result<()>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw a figure: {e:?}")
}

/// A chart's frame: margins and room for the axes' labels.
fn chart_on<'a, 'b>(root: &'a DrawingArea<SVGBackend<'b>, Shift>) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.margin(10).x_label_area_size(36).y_label_area_size(60);
    builder
}

/// The series' names and keys, boxed, at a chart's top right.
fn series_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> anyhow::Result<()> {
    chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).draw().map_err(plot_error)
}

/// Whole-mesh windows shaded across a chart's height.
fn shade<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, impl Ranged<ValueType = f64>>>,
    windows: &[Window],
    (y0, y1): (f64, f64),
) -> anyhow::Result<()> {
    let mesh_wide = windows.iter().filter(|w| w.peer.is_none());
    chart
        .draw_series(mesh_wide.map(|w| {
            Rectangle::new([(w.from_ms / 1000.0, y0), (w.to_ms / 1000.0, y1)], w.kind.colour().mix(0.12).filled())
        }))
        .map_err(plot_error)?;
    Ok(())
}

/// A row per peer on a time axis: its processes' lifetimes, its pauses and downtime, its links
/// coming up and down (up to a few thousand of them), and the mesh-wide faults shaded.
fn timeline(r: &Report, windows: &[Window], end_s: f64) -> anyhow::Result<String> {
    let names: Vec<&str> = r.mesh.peers.iter().map(|(n, _)| n.as_str()).collect();
    let n = names.len().max(1);
    let row_px = (600 / n as u32).clamp(3, 20);
    let height = 90 + row_px * n as u32;
    let row: BTreeMap<&str, f64> = names.iter().enumerate().map(|(i, p)| (*p, (n - 1 - i) as f64)).collect();
    canvas((WIDTH, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end_s, 0f64..n as f64)
            .map_err(plot_error)?;
        let every = n.div_ceil(40);
        chart
            .configure_mesh()
            .x_desc("time since the run started (s)")
            .y_labels(n.min(40))
            .y_label_formatter(&|y| {
                let i = (n as f64 - 1.0 - y.floor()) as usize;
                let at_row = y.fract().abs() < 1e-9 && i.is_multiple_of(every);
                match names.get(i) {
                    Some(name) if at_row => name.to_string(),
                    _ => String::new(), // between rows, or no peer at all
                }
            })
            .disable_y_mesh()
            .draw()
            .map_err(plot_error)?;
        shade(&mut chart, windows, (0.0, n as f64))?;
        // Process lifetimes.
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
        bars.extend(alive.into_iter().map(|(p, from)| (p, from, r.wall_ms)));
        let lane = |peer: &str, pad: f64| row.get(peer).map(|y| (y + pad, y + 1.0 - pad));
        chart
            .draw_series(bars.iter().filter_map(|(p, from, to)| {
                let (y0, y1) = lane(p, 0.25)?;
                Some(Rectangle::new([(from / 1000.0, y0), (to / 1000.0, y1)], RGBColor(187, 222, 251).filled()))
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(windows.iter().filter_map(|w| {
                let (y0, y1) = lane(w.peer.as_deref()?, 0.1)?;
                Some(Rectangle::new(
                    [(w.from_ms / 1000.0, y0), (w.to_ms / 1000.0, y1)],
                    w.kind.colour().mix(0.45).filled(),
                ))
            }))
            .map_err(plot_error)?;
        let ticks: Vec<&Mark> = r.timeline.iter().filter(|m| m.kind == "up" || m.kind == "down").collect();
        if ticks.len() <= 4000 {
            chart
                .draw_series(ticks.iter().filter_map(|m| {
                    let (y0, y1) = lane(&m.peer, 0.3)?;
                    let colour = if m.kind == "up" { RGBColor(46, 125, 50) } else { RGBColor(198, 40, 40) };
                    let x = m.at_ms as f64 / 1000.0;
                    Some(PathElement::new(vec![(x, y0), (x, y1)], colour.stroke_width(1)))
                }))
                .map_err(plot_error)?;
        }
        legend(
            root,
            &[WindowKind::Partition, WindowKind::Cut, WindowKind::Condition, WindowKind::Pause, WindowKind::Down],
        )
    })
}

/// A row of coloured keys along the top right of a figure.
fn legend(root: &DrawingArea<SVGBackend<'_>, Shift>, kinds: &[WindowKind]) -> anyhow::Result<()> {
    let mut x = WIDTH as i32 - 110 * kinds.len() as i32 - 10;
    for kind in kinds {
        root.draw(&Rectangle::new([(x, 2), (x + 12, 12)], kind.colour().mix(0.45).filled())).map_err(plot_error)?;
        root.draw(&Text::new(kind.label(), (x + 16, 1), (FONT, 12).into_font())).map_err(plot_error)?;
        x += 110;
    }
    Ok(())
}

/// At most `max` items, evenly spread over `items` (figures stay small for large runs).
fn thin<T: Copy>(items: &[T], max: usize) -> Vec<T> {
    if items.len() <= max {
        return items.to_vec();
    }
    let step = items.len() as f64 / max as f64;
    (0..max).map(|i| items[(i as f64 * step) as usize]).collect()
}

/// Each showing's latency against when its line was said, direct and caught up apart, with
/// the mesh-wide faults shaded behind.
fn latency_over_time(r: &Report, windows: &[Window], end_s: f64) -> anyhow::Result<String> {
    let mut direct = Vec::new();
    let mut caught_up = Vec::new();
    for line in &r.lines {
        for s in &line.showings {
            let point = (line.said_ms / 1000.0, (s.at_ms - line.said_ms).max(0.01));
            if s.caught_up { caught_up.push(point) } else { direct.push(point) }
        }
    }
    let top = direct.iter().chain(&caught_up).map(|p| p.1).fold(1.0f64, f64::max) * 1.5;
    canvas((WIDTH, 360), |root| {
        let mut chart =
            chart_on(root).build_cartesian_2d(0f64..end_s, (0.01f64..top).log_scale()).map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("when the line was said (s since the run started)")
            .y_desc("latency (ms, log)")
            .draw()
            .map_err(plot_error)?;
        shade(&mut chart, windows, (0.01, top))?;
        for (points, colour, label) in
            [(&direct, RGBColor(21, 101, 192), "direct"), (&caught_up, RGBColor(230, 81, 0), "caught up")]
        {
            chart
                .draw_series(thin(points, 20_000).into_iter().map(|p| Circle::new(p, 2, colour.mix(0.6).filled())))
                .map_err(plot_error)?
                .label(format!("{label} ({})", points.len()))
                .legend(move |(x, y)| Circle::new((x, y), 3, colour.filled()));
        }
        series_legend(&mut chart)?;
        Ok(())
    })
}

/// The share of showings within each latency, direct and caught up apart.
fn latency_cdf(r: &Report) -> anyhow::Result<String> {
    let mut direct = Vec::new();
    let mut caught_up = Vec::new();
    for line in &r.lines {
        for s in &line.showings {
            let ms = (s.at_ms - line.said_ms).max(0.01);
            if s.caught_up { caught_up.push(ms) } else { direct.push(ms) }
        }
    }
    direct.sort_by(f64::total_cmp);
    caught_up.sort_by(f64::total_cmp);
    let top = direct.iter().chain(&caught_up).copied().fold(1.0f64, f64::max) * 1.5;
    canvas((WIDTH, 320), |root| {
        let mut chart =
            chart_on(root).build_cartesian_2d((0.01f64..top).log_scale(), 0f64..1f64).map_err(plot_error)?;
        chart.configure_mesh().x_desc("latency (ms, log)").y_desc("share of showings").draw().map_err(plot_error)?;
        for (values, colour, label) in
            [(&direct, RGBColor(21, 101, 192), "direct"), (&caught_up, RGBColor(230, 81, 0), "caught up")]
        {
            if values.is_empty() {
                continue;
            }
            let n = values.len() as f64;
            let curve: Vec<(f64, f64)> =
                thin(&values.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)).collect::<Vec<_>>(), 2000);
            chart
                .draw_series(LineSeries::new(curve, colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(format!("{label} ({})", values.len()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        series_legend(&mut chart)?;
        Ok(())
    })
}

/// Lines said and shown (first showings) in each second of the run.
fn rates(r: &Report, end_s: f64) -> anyhow::Result<String> {
    let bins = end_s.ceil().max(1.0) as usize;
    let mut said = vec![0u32; bins];
    let mut shown = vec![0u32; bins];
    let bin = |ms: f64| ((ms / 1000.0) as usize).min(bins - 1);
    for line in &r.lines {
        said[bin(line.said_ms)] += 1;
        for s in &line.showings {
            shown[bin(s.at_ms)] += 1;
        }
    }
    let top = said.iter().chain(&shown).copied().max().unwrap_or(1).max(1) as f64 * 1.15;
    canvas((WIDTH, 300), |root| {
        let mut chart = chart_on(root).build_cartesian_2d(0f64..bins as f64, 0f64..top).map_err(plot_error)?;
        chart.configure_mesh().x_desc("second of the run").y_desc("per second").draw().map_err(plot_error)?;
        for (counts, colour, label) in
            [(&said, RGBColor(21, 101, 192), "said"), (&shown, RGBColor(46, 125, 50), "shown")]
        {
            let steps =
                counts.iter().enumerate().flat_map(|(i, c)| [(i as f64, *c as f64), ((i + 1) as f64, *c as f64)]);
            chart
                .draw_series(LineSeries::new(steps, colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        series_legend(&mut chart)?;
        Ok(())
    })
}

/// Links up over time (each peer's neighbours, counted once per pair), with the faults shaded.
fn connections(r: &Report, windows: &[Window], end_s: f64) -> anyhow::Result<String> {
    let mut per_peer: BTreeMap<&str, i64> = BTreeMap::new();
    let mut total: i64 = 0;
    let mut curve = vec![(0.0, 0.0)];
    for m in &r.timeline {
        let count = per_peer.entry(&m.peer).or_default();
        let before = *count;
        match m.kind.as_str() {
            "up" => *count += 1,
            "down" => *count = (*count - 1).max(0),
            "exit" => *count = 0,
            _ => continue,
        }
        total += *count - before;
        let x = m.at_ms as f64 / 1000.0;
        let y = total as f64 / 2.0;
        if curve.last().is_some_and(|(lx, _)| *lx == x) {
            curve.pop();
        }
        curve.push((x, y));
    }
    curve.push((end_s, total as f64 / 2.0));
    let n = r.mesh.peers.len() as f64;
    let top = (n * (n - 1.0) / 2.0).max(1.0) * 1.1;
    canvas((WIDTH, 300), |root| {
        let mut chart = chart_on(root).build_cartesian_2d(0f64..end_s, 0f64..top).map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("time since the run started (s)")
            .y_desc("connected pairs")
            .draw()
            .map_err(plot_error)?;
        shade(&mut chart, windows, (0.0, top))?;
        let stepped: Vec<(f64, f64)> =
            curve.windows(2).flat_map(|w| [w[0], (w[1].0, w[0].1)]).chain(curve.last().copied()).collect();
        chart
            .draw_series(LineSeries::new(thin(&stepped, 20_000), RGBColor(21, 101, 192).stroke_width(2)))
            .map_err(plot_error)?;
        let full = n * (n - 1.0) / 2.0;
        chart
            .draw_series(LineSeries::new([(0.0, full), (end_s, full)], BLACK.mix(0.4).stroke_width(1)))
            .map_err(plot_error)?
            .label(format!("full mesh ({full})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.4)));
        series_legend(&mut chart)?;
        Ok(())
    })
}

/// The mesh at the end: up to 16 peers on a circle (links blue, cut pairs dashed red, stopped
/// peers grey); above, an adjacency matrix (connected blue, cut red), runs of equal cells drawn
/// as one.
fn mesh(r: &Report) -> anyhow::Result<String> {
    let names: Vec<&str> = r.mesh.peers.iter().map(|(n, _)| n.as_str()).collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // Named pairs as index pairs, both ways round.
    let both_ways = |pairs: &[(String, String)]| -> BTreeSet<(usize, usize)> {
        pairs
            .iter()
            .filter_map(|(a, b)| Some((*index.get(a.as_str())?, *index.get(b.as_str())?)))
            .flat_map(|(a, b)| [(a, b), (b, a)])
            .collect()
    };
    let (linked, cut) = (both_ways(&r.mesh.links), both_ways(&r.mesh.cuts));
    if names.len() <= 16 {
        return circle(r, &names, &linked, &cut);
    }
    let n = names.len();
    let side = 640u32;
    canvas((side + 120, side + 60), |root| {
        let cell = side as f64 / n as f64;
        let (x0, y0) = (90.0, 40.0);
        let px = |v: f64| v.round() as i32;
        root.draw(&Text::new("rows and columns: peers; blue: connected; red: cut", (10, 10), (FONT, 13).into_font()))
            .map_err(plot_error)?;
        for (i, name) in names.iter().enumerate() {
            let state = |j: usize| {
                if linked.contains(&(i, j)) {
                    1
                } else if cut.contains(&(i, j)) {
                    2
                } else {
                    0
                }
            };
            let mut j = 0;
            while j < n {
                let s = state(j);
                let start = j;
                while j < n && state(j) == s {
                    j += 1;
                }
                let colour = match s {
                    1 => RGBColor(21, 101, 192),
                    2 => RGBColor(198, 40, 40),
                    _ => continue,
                };
                let (top, left) = (y0 + i as f64 * cell, x0 + start as f64 * cell);
                let rect = [(px(left), px(top)), (px(x0 + j as f64 * cell), px(top + cell).max(px(top) + 1))];
                root.draw(&Rectangle::new(rect, colour.filled())).map_err(plot_error)?;
            }
            if i.is_multiple_of(n.div_ceil(32)) {
                let y = px(y0 + (i as f64 + 0.5) * cell) - 5;
                root.draw(&Text::new(*name, (10, y), (FONT, 10).into_font())).map_err(plot_error)?;
            }
        }
        let frame = [(px(x0), px(y0)), (px(x0 + side as f64), px(y0 + side as f64))];
        root.draw(&Rectangle::new(frame, BLACK.mix(0.5))).map_err(plot_error)?;
        Ok(())
    })
}

fn circle(
    r: &Report,
    names: &[&str],
    linked: &BTreeSet<(usize, usize)>,
    cut: &BTreeSet<(usize, usize)>,
) -> anyhow::Result<String> {
    let n = names.len().max(1);
    let (cx, cy, radius) = (230.0, 210.0, 160.0);
    let pos: Vec<(i32, i32)> = (0..n)
        .map(|i| {
            let a = std::f64::consts::TAU * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
            ((cx + radius * a.cos()) as i32, (cy + radius * a.sin()) as i32)
        })
        .collect();
    canvas((460, 430), |root| {
        for &(a, b) in linked.iter().filter(|(a, b)| a < b) {
            root.draw(&PathElement::new(vec![pos[a], pos[b]], RGBColor(21, 101, 192).stroke_width(2)))
                .map_err(plot_error)?;
        }
        for &(a, b) in cut.iter().filter(|(a, b)| a < b) {
            // Dashes: short segments along the line.
            let ((x1, y1), (x2, y2)) = (pos[a], pos[b]);
            for k in (0..20).step_by(2) {
                let at =
                    |t: f64| ((x1 as f64 + (x2 - x1) as f64 * t) as i32, (y1 as f64 + (y2 - y1) as f64 * t) as i32);
                let segment = vec![at(k as f64 / 20.0), at((k + 1) as f64 / 20.0)];
                root.draw(&PathElement::new(segment, RGBColor(198, 40, 40).stroke_width(2))).map_err(plot_error)?;
            }
        }
        for (i, (name, running)) in r.mesh.peers.iter().enumerate() {
            let fill = if *running { WHITE } else { RGBColor(221, 221, 221) };
            root.draw(&Circle::new(pos[i], 18, fill.filled())).map_err(plot_error)?;
            root.draw(&Circle::new(pos[i], 18, BLACK.stroke_width(1))).map_err(plot_error)?;
            let style = TextStyle::from((FONT, 12).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
            root.draw(&Text::new(name.as_str(), pos[i], style)).map_err(plot_error)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(at_ms: u64, peer: &str, kind: &str, detail: &str) -> Mark {
        Mark { at_ms, peer: peer.into(), kind: kind.into(), detail: detail.into() }
    }

    #[test]
    fn faults_become_windows_that_end_where_they_are_undone() {
        let timeline = [
            mark(100, "*", "partition", "a b | c"),
            mark(200, "*", "cut", "a <-> b"),
            mark(300, "*", "condition", "a <-> c: 10% loss"),
            mark(400, "*", "heal", "a -> b, b -> a"),
            mark(500, "b", "pause", ""),
            mark(600, "b", "resume", ""),
            mark(700, "c", "exit", "signal: 9"),
            mark(800, "c", "start", ""),
            mark(900, "*", "clear", "a -> c, c -> a"),
            mark(1000, "*", "heal", "all"),
        ];
        let w = windows(&timeline, 2000.0);
        let spans: Vec<(WindowKind, f64, f64)> = w.iter().map(|w| (w.kind, w.from_ms, w.to_ms)).collect();
        assert_eq!(
            spans,
            [
                (WindowKind::Partition, 100.0, 1000.0),
                (WindowKind::Cut, 200.0, 400.0),
                (WindowKind::Condition, 300.0, 900.0),
                (WindowKind::Pause, 500.0, 600.0),
                (WindowKind::Down, 700.0, 800.0),
            ]
        );
        assert_eq!(w[3].peer.as_deref(), Some("b"));
    }
}
