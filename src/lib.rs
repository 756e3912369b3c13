//! Trow: a container image registry for Kubernetes, speaking the OCI
//! Distribution Specification v1.1. See docs/ARCHITECTURE.md for the map.

pub mod admission;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod data_dir;
pub mod kube;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod meta;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod server;
mod shutdown;
pub mod signature;
pub mod storage;
pub mod tls;
pub mod units;
