//! What a run shows on the terminal while it goes: a line per step, and on a terminal a live
//! bar for the step running (elapsed and remaining time; for chaos, the faults so far and the
//! lines said and shown), in colour unless `NO_COLOR` is set. On a pipe or in CI, plain lines
//! only. Output never fails a run: once stdout is closed (`lab run … | head`), lines are
//! dropped and the run goes on to write its report.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use console::style;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a run reports progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Nothing (tests that run scenarios themselves).
    #[default]
    Quiet,
    /// A line per step (a pipe, a file, CI).
    Plain,
    /// Lines and a live bar for the running step (a terminal).
    Live,
}

impl Mode {
    /// Live on a terminal (unless `TERM=dumb`), plain otherwise.
    pub fn for_stdout() -> Mode {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if std::io::stdout().is_terminal() && !dumb { Mode::Live } else { Mode::Plain }
    }
}

pub struct Progress {
    mode: Mode,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) || mode != Mode::Live {
            console::set_colors_enabled(false);
        }
        Progress { mode, bar: None }
    }

    pub fn enabled(&self) -> bool {
        self.mode != Mode::Quiet
    }

    /// Prints a line (above the bar, when there is one). A closed stdout is ignored.
    pub fn line(&self, text: &str) {
        match (&self.bar, self.mode) {
            (_, Mode::Quiet) => {}
            (Some(bar), _) => bar.suspend(|| print_line(text)),
            (None, _) => print_line(text),
        }
    }

    /// A step begins: on a terminal, a bar with its label, timed against `expected` when the
    /// step has a known length (a sleep, a chaos step, an await's deadline).
    pub fn step_started(&mut self, label: &str, expected: Option<Duration>) {
        if self.mode != Mode::Live {
            return;
        }
        let bar = match expected {
            Some(d) => {
                let bar = ProgressBar::with_draw_target(Some(d.as_millis() as u64), ProgressDrawTarget::stdout());
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {spinner:.cyan} {prefix} [{bar:24.cyan/blue}] {elapsed} of {human_len}, {left} left {msg}",
                    )
                    .expect("a valid template")
                    .with_key("human_len", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{}", human(Duration::from_millis(s.len().unwrap_or(0))));
                    })
                    .with_key("left", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let left = s.len().unwrap_or(0).saturating_sub(s.pos());
                        let _ = write!(w, "{}", human(Duration::from_secs(left.div_ceil(1000))));
                    })
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner:.cyan} {prefix} {elapsed} {msg}")
                        .expect("a valid template"),
                );
                bar
            }
        };
        bar.set_prefix(shorten(label, 50));
        bar.enable_steady_tick(Duration::from_millis(100));
        if expected.is_some() {
            // The bar fills with time; chaos steps also tell their counts (step_update).
            let ticking = bar.clone();
            let started = std::time::Instant::now();
            tokio::spawn(async move {
                while !ticking.is_finished() {
                    ticking.set_position(started.elapsed().as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        self.bar = Some(bar);
    }

    /// Sets the running step's message (a chaos step's counts).
    pub fn step_update(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message);
        }
    }

    /// The step ended: its bar goes, its line stays.
    pub fn step_done(&mut self, line: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.line(line);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Prints a line on stdout, or nothing once stdout is closed.
pub fn print_line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

fn shorten(label: &str, max: usize) -> String {
    match label.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &label[..at]),
        None => label.to_owned(),
    }
}

/// A duration as people read it: `0.42 ms`, `12.3 ms`, `20.0 s`, `2 min 5 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    match ms {
        ms if ms < 10.0 => format!("{ms:.2} ms"),
        ms if ms < 1000.0 => format!("{ms:.1} ms"),
        ms if ms < 60_000.0 => format!("{:.1} s", ms / 1000.0),
        _ => {
            let s = d.as_secs();
            format!("{} min {} s", s / 60, s % 60)
        }
    }
}

/// `ok` in green, `FAILED` in red (when colours are on).
pub fn verdict(ok: bool) -> String {
    if ok { style("ok").green().to_string() } else { style("FAILED").red().bold().to_string() }
}

/// `PASS` or `FAIL`, coloured.
pub fn pass_fail(passed: bool) -> String {
    if passed { style("PASS").green().bold().to_string() } else { style("FAIL").red().bold().to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_micros(420)), "0.42 ms");
        assert_eq!(human(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(human(Duration::from_micros(20_006_600)), "20.0 s");
        assert_eq!(human(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(shorten("abcdef", 3), "abc…");
    }
}
