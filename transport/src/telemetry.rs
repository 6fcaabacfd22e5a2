//! Log setup shared by both binaries: human lines on a terminal, JSON with `--log-format json`.
//! Logs go to stderr; stdout is for results.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, RwLock};

type OutputHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// When set, log lines go through it instead of straight to stderr (a progress display draws
/// them above its bar).
static HOOK: RwLock<Option<OutputHook>> = RwLock::new(None);

pub fn set_output_hook(hook: Option<OutputHook>) {
    *HOOK.write().unwrap_or_else(|p| p.into_inner()) = hook;
}

struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let hook = HOOK.read().unwrap_or_else(|p| p.into_inner()).clone();
        match hook {
            Some(h) => {
                h(buf);
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,quinn=warn,quinn_proto=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| Stderr);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
