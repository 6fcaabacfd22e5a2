//! `status --watch`: a full-terminal view of a run for operators, redrawn every second: the
//! run and its cost, its steps with what they used, the connected agents, the last
//! transfers. `q`, Esc or Ctrl-C leaves. The only module naming ratatui.
//!
//! Everything shown is read as `status` reads it (the state database, and the running
//! coordinator for its agents), so the view works beside `serve` and beside an embedded `run`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::AgentInfo;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};

use crate::persist::state::{RunRecord, State, StepRecord, TransferRow, now_ms};
use crate::run::cost::Cost;
use crate::run::outcome::human_bytes;

/// How often the view is redrawn.
const REFRESH: Duration = Duration::from_secs(1);

/// One look at the run.
struct Snapshot {
    run: Option<RunRecord>,
    steps: Vec<StepRecord>,
    agents: Option<Vec<AgentInfo>>,
    cost: Cost,
    transfers: Vec<TransferRow>,
}

async fn snapshot(dir: &Path, run: Option<&str>, addr: Option<SocketAddr>) -> Result<Snapshot> {
    let agents = crate::cli::status::connected_agents(dir, addr, Duration::from_millis(800)).await;
    let state = State::open(dir)?;
    // Without a run named, the newest: a run started while watching shows up.
    let rec = match run {
        Some(r) => state.run(r)?,
        None => state.runs(1)?.into_iter().next(),
    };
    let (steps, cost) = match &rec {
        Some(r) => (state.steps_of(&r.run_id)?, crate::run::cost::load(&state, Some(&r.run_id))?),
        None => (Vec::new(), Cost::default()),
    };
    Ok(Snapshot { run: rec, steps, agents, cost, transfers: state.recent_transfers(8)? })
}

/// Runs the view until the operator leaves.
pub async fn watch(dir: &Path, run: Option<&str>, addr: Option<SocketAddr>) -> Result<()> {
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            // Raw mode may be on already.
            ratatui::restore();
            return Err(e).context("opening the terminal (status --watch needs one)");
        }
    };
    let result = watch_in(&mut terminal, dir, run, addr).await;
    ratatui::restore();
    result
}

async fn watch_in(
    terminal: &mut DefaultTerminal,
    dir: &Path,
    run: Option<&str>,
    addr: Option<SocketAddr>,
) -> Result<()> {
    // Keys are read on a thread of their own (crossterm's read blocks).
    let (quit_tx, mut quit) = tokio::sync::mpsc::channel::<()>(1);
    std::thread::spawn(move || {
        loop {
            match event::poll(Duration::from_millis(200)) {
                Ok(true) => {}
                Ok(false) => {
                    if quit_tx.is_closed() {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            if let Ok(Event::Key(k)) = event::read() {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                {
                    let _ = quit_tx.blocking_send(());
                    return;
                }
            }
        }
    });
    // SIGTERM and SIGHUP end the view too, with the terminal given back.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::hangup())?);
    loop {
        let snap = snapshot(dir, run, addr).await;
        terminal.draw(|f| match &snap {
            Ok(s) => draw(f, s),
            Err(e) => {
                f.render_widget(Paragraph::new(format!("cannot read {}: {e:#}", dir.display())), f.area())
            }
        })?;
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = quit.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
        }
    }
}

fn fmt_ms(ms: u64) -> String {
    match ms / 1000 {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{:.1}s", ms as f64 / 1e3),
    }
}

fn state_style(state: &str) -> Style {
    match state {
        "succeeded" | "skipped" | "pruned" => Style::default().fg(Color::Green),
        "running" => Style::default().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        "failed" | "cancelled" => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        _ => Style::default(),
    }
}

fn draw(f: &mut Frame, s: &Snapshot) {
    let agents_h = s.agents.as_ref().map_or(3, |a| a.len() as u16 + 3).min(12);
    let [head, steps, lower, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(6),
        Constraint::Length(agents_h.max(11)),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let [agents, transfers] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(lower);

    // The run.
    let header: Vec<Line> = match &s.run {
        None => vec![Line::from("no runs yet")],
        Some(r) => {
            let end = r.finished_ms.unwrap_or_else(now_ms);
            let count = |st: &[&str]| s.steps.iter().filter(|x| st.contains(&x.state.as_str())).count();
            let mut lines = vec![
                Line::styled(
                    format!(
                        "run {} ({}): {} for {}",
                        r.run_id,
                        r.pipeline,
                        r.state,
                        fmt_ms(end.saturating_sub(r.created_ms))
                    ),
                    state_style(&r.state).add_modifier(Modifier::BOLD),
                ),
                Line::from(format!(
                    "steps {}: {} done, {} running, {} failed, {} waiting",
                    s.steps.len(),
                    count(&["succeeded", "skipped", "pruned"]),
                    count(&["running"]),
                    count(&["failed", "cancelled"]),
                    count(&["pending", "ready"]),
                )),
            ];
            lines.push(Line::from(if s.cost.total > 0.0 {
                format!(
                    "cost {:.4}: steps {:.4}, boot {:.4}, idle {:.4}",
                    s.cost.total, s.cost.steps, s.cost.boot, s.cost.idle
                )
            } else {
                "cost: no priced instances".to_string()
            }));
            lines
        }
    };
    f.render_widget(Paragraph::new(header), head);

    // Its steps.
    let rows = s.steps.iter().map(|x| {
        let (dur, cpu, peak) = crate::cli::status::step_cells(x, fmt_ms);
        let cost = s
            .cost
            .by_step
            .iter()
            .find(|(n, _)| *n == x.step)
            .map(|(_, c)| format!("{c:.4}"))
            .unwrap_or_default();
        Row::new(vec![
            x.step.clone(),
            x.state.clone(),
            x.attempts.to_string(),
            x.agent.clone().unwrap_or_default(),
            dur,
            cpu,
            peak,
            human_bytes(x.bytes),
            cost,
        ])
        .style(state_style(&x.state))
    });
    let widths = [
        Constraint::Min(12),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(18),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
    ];
    let table = Table::new(rows, widths)
        .header(
            Row::new(["STEP", "STATE", "ATTEMPT", "AGENT", "DURATION", "CPU", "PEAK MEM", "BYTES", "COST"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(" steps "));
    f.render_widget(table, steps);

    // The agents.
    match &s.agents {
        None => f.render_widget(
            Paragraph::new("no running coordinator reachable").block(Block::bordered().title(" agents ")),
            agents,
        ),
        Some(list) => {
            let rows = list.iter().map(|a| {
                let running: Vec<&str> = s
                    .steps
                    .iter()
                    .filter(|x| x.state == "running" && x.agent.as_deref() == Some(a.agent_id.as_str()))
                    .map(|x| x.step.as_str())
                    .collect();
                Row::new(vec![
                    a.agent_id.clone(),
                    a.host.cpus.to_string(),
                    format!("{:.2}", a.load_average),
                    running.join(","),
                ])
            });
            let t = Table::new(
                rows,
                [Constraint::Min(14), Constraint::Length(5), Constraint::Length(6), Constraint::Min(8)],
            )
            .header(
                Row::new(["AGENT", "CPUS", "LOAD", "RUNNING"])
                    .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(Block::bordered().title(format!(" agents ({}) ", list.len())));
            f.render_widget(t, agents);
        }
    }

    // The last transfers.
    let now = now_ms();
    let rows = s.transfers.iter().map(|t| {
        let rate = if t.elapsed_ms > 0 && !t.direction.ends_with("-direct") {
            format!("{:.0} MB/s", t.bytes as f64 / 1e3 / t.elapsed_ms as f64)
        } else {
            String::new()
        };
        Row::new(vec![
            format!("{} ago", fmt_ms(now.saturating_sub(t.at_ms))),
            t.agent.clone(),
            t.direction.clone(),
            human_bytes(t.bytes),
            rate,
        ])
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Min(12),
            Constraint::Length(12),
            Constraint::Length(9),
            Constraint::Length(10),
        ],
    )
    .header(
        Row::new(["WHEN", "AGENT", "DIRECTION", "BYTES", "RATE"])
            .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(" transfers "));
    f.render_widget(t, transfers);

    f.render_widget(Paragraph::new("q: quit   refreshed every second"), foot);
}
