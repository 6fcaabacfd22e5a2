//! `pype-coordinator`: runs pipelines of steps on pype agents over QUIC with mutual TLS.
//! `main.rs` only calls [`cli_main`]; the library does the work. See ARCHITECTURE.md for the
//! layers: `cli` → `embedded` → {`server`, `run`, `provision`} → `hub` → {`persist`, `store`,
//! `pipeline`}; imports only go down (`.ci/module-cycles` checks it).

#[cfg(feature = "aws")]
pub mod aws;
pub mod cli;
pub mod embedded;
pub mod hub;
pub mod lograte;
pub mod metrics;
pub mod persist;
pub mod pipeline;
pub mod provision;
pub mod run;
pub mod server;
pub mod store;

pub use cli::cli_main;
