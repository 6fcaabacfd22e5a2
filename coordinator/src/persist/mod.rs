//! What the coordinator keeps on disk in its state dir: the state database, the working
//! registry, trust (CA and certificates), the config file.

pub mod config;
pub mod state;
pub mod trust;
pub mod working;

/// The file in the state dir naming the address a running coordinator listens on.
pub const ADDR_FILE: &str = "coordinator.addr";
