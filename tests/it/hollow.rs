//! Hollow agents (`tests::hollow`) against a real `serve`: faults a real agent cannot be made to
//! show on cue, such as a connection that breaks while a step is on the wire.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tests::{Cluster, LONG, Proc, hollow};
use tokio_util::sync::CancellationToken;

/// The agent drops its connection with the step unread, and is back inside the heartbeat
/// window saying it holds nothing: the attempt is lost and run again, once. (Before, the run
/// waited for that attempt's result forever.)
#[test]
fn a_step_on_the_wire_when_its_connection_broke_runs_again_once() {
    // A window of 6 s: the hollow agent is back within its 0.2-2 s pause, not lost.
    let c = Cluster::new().heartbeat_ms(2000).serve();
    let addr = c.coord().addr;
    let token = c.token(&[]);
    let ca: Arc<str> = std::fs::read_to_string(c.coord().ca()).unwrap().into();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = rt.block_on(hollow::enroll(addr, &ca, &token, 1, "hollow", &c.p("hollow"), 1)).unwrap();
    let counters = Arc::new(hollow::Counters::default());
    counters.lose_run_steps.store(1, Ordering::Relaxed);
    let stop = CancellationToken::new();
    let facts = agent::facts::host_facts(c.dir.path());
    hollow::spawn_fleet(&rt, addr, &ca, ids, &facts, 1, 1, &counters, &stop).unwrap();

    let names = ["s0", "s1", "s2"];
    let text: String =
        names.iter().map(|n| format!("[[steps]]\nname = \"{n}\"\ncommand = \"true\"\n")).collect();
    let pipeline = c.pipeline("p.toml", &format!("name = \"wire\"\n{text}"));
    let mut cmd = c.command();
    cmd.args(["run", "--coordinator", &addr.to_string(), pipeline.to_str().unwrap()]);
    let mut run = Proc::spawn_keeping_stdout("run", cmd);
    let status = run.wait_exit(LONG);
    stop.cancel();
    assert!(status.success(), "{}\n{}", run.dump(), c.coord().proc.dump());
    assert_eq!(counters.lose_run_steps.load(Ordering::Relaxed), 0, "the fault never fired");
    assert!(counters.sessions_ended.load(Ordering::Relaxed) >= 1);
    let coord_log = c.coord().proc.dump();
    assert!(
        coord_log.contains("attempt lost") && coord_log.contains("came back without attempt"),
        "{coord_log}"
    );
    assert!(
        coord_log.contains("agent back"),
        "the agent should have come back inside its window:\n{coord_log}"
    );
    assert_eq!(counters.tally(names.iter().copied()), (0, 3, 0), "every step answered exactly once");
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// Sums the counts of the summary lines (`N more agents joined in ...` or `N more `agent
/// joined` in ...`) that contain every one of `needles`.
fn left_out(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.split(" more ").next()?.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

/// 60 agents joining at once are 20 lines and one summary, in the server's log, in a run's,
/// and in what the client watching the run prints, while the run's watchers (and its
/// scheduler) still get every join.
#[test]
fn a_fleet_joining_at_once_is_summarised_in_the_log() {
    const N: usize = 60;
    let c = Cluster::new().serve();
    let addr = c.coord().addr;
    let token = c.token(&["--uses", &N.to_string()]);
    let ca: Arc<str> = std::fs::read_to_string(c.coord().ca()).unwrap().into();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = rt.block_on(hollow::enroll(addr, &ca, &token, N, "fleet", &c.p("hollow"), 8)).unwrap();
    let counters = Arc::new(hollow::Counters::default());
    let stop = CancellationToken::new();
    let facts = agent::facts::host_facts(c.dir.path());
    hollow::spawn_fleet(&rt, addr, &ca, ids, &facts, 1, 20, &counters, &stop).unwrap();
    let coord = &c.coord().proc;
    coord.wait_for(&["more agents joined in the last"], LONG);
    let log = coord.dump();
    let one_by_one = coord.count(&["server::agent", "agent joined"]);
    assert!(one_by_one <= 2 * 20, "{one_by_one} join lines:\n{log}");
    assert_eq!(one_by_one + left_out(&log, &["more agents joined"]), N, "{log}");

    // A run that starts with the fleet connected sees 60 joins: its log says 20 and sums the
    // rest when it ends; its scheduler used them all (a step per agent slot at once).
    let text: String = (0..N).map(|i| format!("[[steps]]\nname = \"s{i}\"\ncommand = \"true\"\n")).collect();
    let pipeline = c.pipeline("p.toml", &format!("name = \"fleet\"\n{text}"));
    let mut cmd = c.command();
    cmd.args(["run", "--coordinator", &addr.to_string(), pipeline.to_str().unwrap()]);
    let mut run = Proc::spawn_keeping_stdout("run", cmd);
    let status = run.wait_exit(LONG);
    stop.cancel();
    assert!(status.success(), "{}\n{}", run.dump(), coord.dump());
    let log = coord.dump();
    let run_joins = coord.count(&["coordinator::run: agent joined"]);
    assert!(run_joins <= 2 * 20, "{run_joins} run join lines:\n{log}");
    assert_eq!(run_joins + left_out(&log, &["more `agent joined`"]), N, "{log}");
    // The client watching the run prints its events the same way.
    let printed = run.dump();
    let cli_joins = run.count(&["] agent joined agent="]);
    assert!(cli_joins <= 2 * 20, "{cli_joins} printed join lines:\n{printed}");
    assert_eq!(cli_joins + left_out(&printed, &["more `agent joined`"]), N, "{printed}");
    assert_eq!(
        counters.tally((0..N).map(|i| format!("s{i}")).collect::<Vec<_>>().iter().map(String::as_str)),
        (0, N, 0)
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}
