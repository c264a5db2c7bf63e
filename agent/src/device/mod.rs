//! Accelerators on this node, behind one trait per concern with real and simulated
//! backends. This layer owns discovery and (later) device metrics and partition calls; it
//! does not decide layouts (that is `partition`) and never talks to the controller.
//!
//! Calls are synchronous (NVML and sysfs block); callers run them on a blocking thread.

pub mod mig;
pub mod migctl;
pub mod sim;

use hearth_proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{backend}: {call} failed on device {index}: {reason}")]
    Call { backend: &'static str, call: &'static str, index: u32, reason: String },
    #[error("{backend} unavailable: {reason}")]
    Unavailable { backend: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Nvidia,
    AwsNeuron,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded,
    Unhealthy,
}

/// One accelerator as discovered.
#[derive(Debug, Clone, PartialEq)]
pub struct Accelerator {
    pub index: u32,
    pub uuid: String,
    pub vendor: Vendor,
    pub product: String,
    pub memory_bytes: u64,
    pub pci_bus_id: String,
    pub pci_device_id: u32,
    /// Neuron cores; 0 for GPUs.
    pub core_count: u32,
    pub simulated: bool,
    pub health: Health,
    pub health_reason: String,
}

/// Discovery: what accelerators this node has.
pub trait Inventory: Send + Sync {
    /// Short name for logs and the snapshot ("simulated", "nvml", "neuron").
    fn name(&self) -> &'static str;
    fn accelerators(&self) -> Result<Vec<Accelerator>, DeviceError>;
}

/// A node with no accelerator backend configured.
#[derive(Debug)]
pub struct NoDevices;

impl Inventory for NoDevices {
    fn name(&self) -> &'static str {
        "none"
    }
    fn accelerators(&self) -> Result<Vec<Accelerator>, DeviceError> {
        Ok(Vec::new())
    }
}

impl From<&Accelerator> for pb::Accelerator {
    fn from(a: &Accelerator) -> Self {
        pb::Accelerator {
            index: a.index,
            uuid: a.uuid.clone(),
            vendor: match a.vendor {
                Vendor::Nvidia => pb::AcceleratorVendor::Nvidia,
                Vendor::AwsNeuron => pb::AcceleratorVendor::AwsNeuron,
            } as i32,
            product: a.product.clone(),
            memory_bytes: a.memory_bytes,
            pci_bus_id: a.pci_bus_id.clone(),
            pci_device_id: a.pci_device_id,
            core_count: a.core_count,
            simulated: a.simulated,
            health: match a.health {
                Health::Healthy => pb::HealthState::Healthy,
                Health::Degraded => pb::HealthState::Degraded,
                Health::Unhealthy => pb::HealthState::Unhealthy,
            } as i32,
            health_reason: a.health_reason.clone(),
            mig_enabled: false,
            partitions: Vec::new(),
        }
    }
}
