//! AWS Neuron devices (Inferentia2, Trainium): inventory, metrics, core groups.

pub mod groups;
pub mod monitor;
pub mod sim;
pub mod subsystem;
pub mod sysfs;
