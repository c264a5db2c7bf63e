//! Accelerators on this node, behind one trait per concern with real and simulated
//! backends. This layer owns discovery and (later) device metrics and partition calls; it
//! does not decide layouts (that is `partition`) and never talks to the controller.
//!
//! Calls are synchronous (NVML and sysfs block); callers run them on a blocking thread.

pub mod gpu;
pub mod gpusim;
/// MIG geometry lives in hearth-proto: the controller places MIG requests with the same table.
pub use hearth_proto::mig;
pub mod migctl;
pub mod nvml;
pub mod nvml_bench;
pub mod sim;
mod subsystem;

pub use subsystem::start;

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

impl Vendor {
    /// What people call one device of this vendor.
    pub fn device_word(self) -> &'static str {
        match self {
            Self::Nvidia => "GPU",
            Self::AwsNeuron => "Neuron device",
        }
    }
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
    /// NVIDIA details from the GPU collector; `None` until its first sweep and for Neuron.
    pub gpu: Option<GpuDetail>,
    /// Neuron core groups (node-wide core ranges) that start on this device, from the applied
    /// partition config; reported as the device's partitions.
    pub core_groups: Vec<hearth_proto::neuron::Group>,
}

/// What NVML says about a GPU beyond the static facts: driver, MIG, processes, memory health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuDetail {
    pub driver_version: String,
    pub cuda_version: String,
    pub mig_current: bool,
    pub mig_pending: bool,
    pub mig_devices: Vec<gpu::MigDevice>,
    pub processes: Vec<gpu::GpuProcess>,
    pub remapped_rows_correctable: u64,
    pub remapped_rows_uncorrectable: u64,
    pub row_remap_pending: bool,
    pub retired_pages: u64,
    /// Last XID seen, 0 for none.
    pub last_xid: u64,
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
        let mut out = pb::Accelerator {
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
            ..Default::default()
        };
        // A group is reported on its first device: uuid "neuroncores:A-B" (what runtimes bind
        // to and placement parses), the start local to the device, the size may run on.
        out.partitions.extend(a.core_groups.iter().map(|g| pb::Partition {
            uuid: g.partition_name(),
            profile: format!("cores:{}", g.cores),
            placement_start: g.start.saturating_sub(a.index * a.core_count),
            placement_size: g.cores,
            ..Default::default()
        }));
        if let Some(g) = &a.gpu {
            out.mig_enabled = g.mig_current;
            out.mig_pending = g.mig_pending;
            out.partitions = g
                .mig_devices
                .iter()
                .map(|m| pb::Partition {
                    uuid: m.uuid.clone(),
                    profile: m.profile.clone(),
                    gpu_instance_id: m.gi_id,
                    compute_instance_id: m.ci_id,
                    placement_start: m.placement_start,
                    placement_size: m.placement_size,
                    memory_bytes: m.memory_bytes,
                })
                .collect();
            out.driver_version = g.driver_version.clone();
            out.cuda_version = g.cuda_version.clone();
            out.processes = g
                .processes
                .iter()
                .map(|p| pb::GpuProcess { pid: p.pid, used_memory_bytes: p.used_memory_bytes, gpu_instance_id: p.gi_id.unwrap_or(0) })
                .collect();
            out.remapped_rows_correctable = g.remapped_rows_correctable;
            out.remapped_rows_uncorrectable = g.remapped_rows_uncorrectable;
            out.row_remap_pending = g.row_remap_pending;
            out.retired_pages = g.retired_pages;
            out.last_xid = g.last_xid;
        }
        out
    }
}
