//! What an operator sees of a run on their terminal: a progress bar (indicatif) of steps
//! done / running / pending and the bytes moved, with log lines drawn above it; plain lines
//! when stderr is not a terminal.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::RunEvent;

use crate::lograte::{Burst, LeftOut, MEMBER_LINES, member_burst};

pub struct Display {
    bar: Option<ProgressBar>,
    /// Print every event as a line (runs on a remote coordinator, whose log is elsewhere).
    print_events: bool,
    started: Instant,
    /// Printed membership events (`agent joined`, ...) per run and kind: one by one up to
    /// [`MEMBER_LINES`] per window, the rest in one line, as in the coordinator's log.
    members: Mutex<HashMap<(String, String), Burst>>,
}

impl Display {
    pub fn new(print_events: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let b = bar.clone();
            transport::telemetry::set_output_hook(Some(Arc::new(move |buf: &[u8]| {
                b.suspend(|| {
                    let _ = std::io::stderr().write_all(buf);
                })
            })));
            bar
        });
        Self { bar, print_events, started: Instant::now(), members: Mutex::new(HashMap::new()) }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Prints what the membership windows left out: those that have ended, or all at `end`.
    fn print_left_out(&self, now: Instant, end: bool) {
        let ended: Vec<((String, String), LeftOut)> = {
            let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
            m.iter_mut()
                .filter_map(|(k, b)| if end { b.end(now) } else { b.poll(now) }.map(|l| (k.clone(), l)))
                .collect()
        };
        for ((run, event), l) in ended {
            self.print(&format!(
                "[{run}] {} more `{event}` in the last {} s (past {MEMBER_LINES}, not printed one by one)",
                l.count,
                l.over.as_secs().max(1)
            ));
        }
    }

    /// Whether a membership event is printed on a line of its own (every other event is).
    fn one_by_one(&self, ev: &RunEvent, now: Instant) -> bool {
        if !ev.event.starts_with("agent ") {
            return true;
        }
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((ev.run.clone(), ev.event.clone())).or_insert_with(member_burst).event(now).0
    }

    pub fn event(&self, ev: &RunEvent) {
        let now = Instant::now();
        if self.print_events {
            self.print_left_out(now, false);
        }
        if self.print_events && self.one_by_one(ev, now) {
            let mut line = format!("[{}] {}", ev.run, ev.event);
            for (k, v) in [("step", &ev.step), ("agent", &ev.agent)] {
                if let Some(v) = v {
                    line += &format!(" {k}={v}");
                }
            }
            if let Some(a) = ev.attempt {
                line += &format!(" attempt={a}");
            }
            if !ev.detail.is_empty() {
                line += &format!(": {}", ev.detail);
            }
            self.print(&line);
        }
        if let Some(b) = &self.bar {
            let p = ev.progress;
            b.set_length(u64::from(p.total));
            b.set_position(u64::from(p.done + p.failed));
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let pending = p.total.saturating_sub(p.done + p.failed + p.running);
            b.set_message(format!(
                "{} running, {} pending, {} failed, {:.1} MB moved ({:.1} MB/s)",
                p.running,
                pending,
                p.failed,
                p.bytes as f64 / 1e6,
                p.bytes as f64 / 1e6 / secs
            ));
        }
    }

    pub fn finish(&self) {
        if self.print_events {
            self.print_left_out(Instant::now(), true);
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            transport::telemetry::set_output_hook(None);
        }
    }
}
