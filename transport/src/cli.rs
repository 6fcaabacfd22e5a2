//! What both binaries' `cli_main` share: the runtime, error reporting and shutdown signals.

use std::future::Future;
use std::process::ExitCode;

/// Which runtime a binary's `main` gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// One thread for every task (blocking work still goes to the blocking pool). For a process
    /// whose async work is small messages and short file operations, while the machine's cores
    /// are wanted by something else: an agent (its steps), or a client command. Every hand-off
    /// between tasks stays on one thread, where a multi-threaded runtime wakes another thread
    /// for most of them (a futex wake and two context switches, many times per step). Nothing
    /// on it may call `block_in_place`.
    One,
    /// A worker thread per core: a coordinator (a fleet's connections; `block_in_place`).
    PerCore,
}

/// Runs `main` on a runtime of `threads`; an error is printed on stderr as one line (with
/// its causes) and the process exits with status 1.
pub fn block_on_main(threads: Threads, main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
