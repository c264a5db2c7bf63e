//! hearth-agent: the node agent (`hearth agent`) and the operator CLI (`hearth local`,
//! `hearth status`, `hearth prefetch`...). One module per capability, each started by the
//! daemon as a subsystem of one shape (`subsystem`); `daemon` is the list of them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cache;
pub mod call;
pub mod config;
pub mod daemon;
pub mod device;
pub mod gpu_cli;
pub mod gpu_metrics;
pub mod images;
pub mod kube;
pub mod local;
pub mod netobs;
pub mod neuron;
pub mod node;
pub mod partition;
pub mod prefetch;
pub mod report;
pub mod runtime;
pub mod status;
pub mod subsystem;
