//! Trow: a container image registry for Kubernetes, speaking the OCI
//! Distribution Specification v1.1. See docs/ARCHITECTURE.md for the map.

pub mod api;
pub mod config;
pub mod logging;
pub mod meta;
pub mod registry;
pub mod server;
pub mod storage;
