//! The end-to-end tests: one binary, one module per area, so the AWS SDK and everything else
//! link once. `cargo test -p tests --test it pipelines::` runs one area; the shared fixture
//! and helpers are the `tests` library (tests/src).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod agent_cache;
mod aws;
mod backends;
mod biopype;
mod cas;
mod consistency;
mod deploy;
mod hollow;
mod hostile_paths;
mod hostile_peers;
mod instances;
mod lifecycle;
mod metrics;
mod pipelines;
mod resources;
mod roundtrip;
mod slurm;
mod trust;
mod watch;
