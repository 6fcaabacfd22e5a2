//! What an operator sees of a run on their terminal: a progress bar (indicatif) of steps
//! done / running / pending and the bytes moved, with log lines drawn above it; plain lines
//! when stderr is not a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::RunEvent;

pub struct Display {
    bar: Option<ProgressBar>,
    /// Print every event as a line (runs on a remote coordinator, whose log is elsewhere).
    print_events: bool,
    started: Instant,
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
        Self { bar, print_events, started: Instant::now() }
    }

    pub fn event(&self, ev: &RunEvent) {
        if self.print_events {
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
            match &self.bar {
                Some(b) => b.suspend(|| eprintln!("{line}")),
                None => eprintln!("{line}"),
            }
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
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            transport::telemetry::set_output_hook(None);
        }
    }
}
