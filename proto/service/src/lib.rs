//! hearth-service: what every Hearth process needs at run time, shared by the agent
//! (`hearth`) and the controller (`hearth-controller`) so that neither depends on the other:
//! the HTTP server for `/metrics` and probes, readiness, log set-up, the signal handler,
//! owned tasks, the retry delay, durable file writes, config parsing, and how to reach the
//! Kubernetes API (client set-up, validation of names and labels, errors an operator can act on). The development
//! certificate authority (`pki`) is here behind the `dev-ca` feature, for local mode and
//! tests only. It knows nothing of devices, caches, placement or scaling.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod fsutil;
pub mod http;
pub mod kube;
#[cfg(feature = "dev-ca")]
pub mod pki;
pub mod retry;
pub mod tasks;
pub mod telemetry;
