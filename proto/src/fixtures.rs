//! Builders for `hearth.v1` messages in tests and benchmarks: an accelerator or a node as an
//! agent reports it, so a test names what matters to it (`Accelerator::h100(0).with_mig(..)`)
//! and not every field. Products carry the values the agent's simulator and NVML report for
//! them (memory is NVML's `memory.total`, PCI ids as mig-parted writes them).
//!
//! Built only for this crate's tests and behind the `test-fixtures` feature, which other
//! crates enable as a dev-dependency (the test crate enables it outright).

use crate::v1 as pb;

const MIB: u64 = 1 << 20;

impl pb::Accelerator {
    /// An H100 80GB HBM3 (SXM), healthy, MIG off, nothing running; uuid `GPU-{index}`.
    pub fn h100(index: u32) -> Self {
        Self::nvidia(index, "NVIDIA H100 80GB HBM3", 81_559 * MIB, 0x2330_10DE)
    }

    /// An A100-SXM4-80GB, healthy, MIG off, nothing running; uuid `GPU-{index}`.
    pub fn a100(index: u32) -> Self {
        Self::nvidia(index, "NVIDIA A100-SXM4-80GB", 81_920 * MIB, 0x20B2_10DE)
    }

    fn nvidia(index: u32, product: &str, memory_bytes: u64, pci_device_id: u32) -> Self {
        Self {
            index,
            uuid: format!("GPU-{index}"),
            vendor: pb::AcceleratorVendor::Nvidia as i32,
            product: product.into(),
            memory_bytes,
            pci_device_id,
            health: pb::HealthState::Healthy as i32,
            ..Default::default()
        }
    }

    /// An AWS Neuron device (Inferentia2, Trainium) with `cores` NeuronCores, healthy, no
    /// core group in use; uuid `NEURON-{index}`.
    pub fn neuron(index: u32, cores: u32) -> Self {
        Self {
            index,
            uuid: format!("NEURON-{index}"),
            vendor: pb::AcceleratorVendor::AwsNeuron as i32,
            core_count: cores,
            health: pb::HealthState::Healthy as i32,
            ..Default::default()
        }
    }

    pub fn with_uuid(mut self, uuid: impl Into<String>) -> Self {
        self.uuid = uuid.into();
        self
    }

    /// MIG mode on, with these MIG devices (none: MIG on, GPU not yet partitioned).
    pub fn with_mig(mut self, devices: impl IntoIterator<Item = pb::Partition>) -> Self {
        self.mig_enabled = true;
        self.partitions = devices.into_iter().collect();
        self
    }

    /// Neuron core groups in use (`Partition::cores`).
    pub fn with_core_groups(mut self, groups: impl IntoIterator<Item = pb::Partition>) -> Self {
        self.partitions = groups.into_iter().collect();
        self
    }

    /// Processes running on the GPU (on a whole GPU, or in a MIG instance by its
    /// `gpu_instance_id`).
    pub fn with_processes(mut self, processes: impl IntoIterator<Item = pb::GpuProcess>) -> Self {
        self.processes = processes.into_iter().collect();
        self
    }

    /// The agent's simulated backend, with its PCI bus address.
    pub fn simulated_at(mut self, pci_bus_id: impl Into<String>) -> Self {
        self.simulated = true;
        self.pci_bus_id = pci_bus_id.into();
        self
    }
}

impl pb::Partition {
    /// A MIG device: `profile` ("3g.40gb") in GPU instance `gpu_instance_id`, taking
    /// `size` memory slices from `start`.
    pub fn mig(uuid: impl Into<String>, profile: &str, gpu_instance_id: u32, start: u32, size: u32) -> Self {
        Self {
            uuid: uuid.into(),
            profile: profile.into(),
            gpu_instance_id,
            placement_start: start,
            placement_size: size,
            ..Default::default()
        }
    }

    /// A Neuron core group: `count` NeuronCores from core `start` of one device.
    pub fn cores(uuid: impl Into<String>, start: u32, count: u32) -> Self {
        Self { uuid: uuid.into(), placement_start: start, placement_size: count, ..Default::default() }
    }
}

impl pb::NodeState {
    /// A node with these accelerators and nothing else reported yet.
    pub fn from_accelerators(accelerators: impl IntoIterator<Item = pb::Accelerator>) -> Self {
        Self { accelerators: accelerators.into_iter().collect(), ..Default::default() }
    }

    /// A node with `n` idle H100s (`Accelerator::h100(0..n)`).
    pub fn h100s(n: u32) -> Self {
        Self::from_accelerators((0..n).map(pb::Accelerator::h100))
    }

    /// Free host memory, as the agent reports it in its resources.
    pub fn with_memory_available(mut self, bytes: u64) -> Self {
        self.resources.get_or_insert_with(Default::default).memory_available_bytes = bytes;
        self
    }

    pub fn with_model(mut self, model: pb::CachedModel) -> Self {
        self.models.push(model);
        self
    }

    /// A container image present on the node, by reference.
    pub fn with_image(mut self, reference: &str) -> Self {
        self.images.push(pb::CachedImage { reference: reference.into(), ..Default::default() });
        self
    }

    pub fn with_runtime(mut self, runtime: pb::ServingRuntime) -> Self {
        self.runtimes.push(runtime);
        self
    }
}

impl pb::CachedModel {
    /// A model in the cache: `present` of `total` bytes, Ready once they are equal and
    /// Downloading until then.
    pub fn cached(id: impl Into<String>, source_uri: impl Into<String>, revision: &str, present: u64, total: u64) -> Self {
        let state = if present == total { pb::CacheEntryState::Ready } else { pb::CacheEntryState::Downloading };
        Self {
            id: id.into(),
            source_uri: source_uri.into(),
            revision: revision.into(),
            state: state as i32,
            bytes_present: present,
            bytes_total: total,
            ..Default::default()
        }
    }

    /// A model fully present and Ready.
    pub fn ready(id: impl Into<String>, source_uri: impl Into<String>, revision: &str, bytes: u64) -> Self {
        Self::cached(id, source_uri, revision, bytes, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_what_they_name_and_nothing_else() {
        let a = pb::Accelerator::h100(3).with_mig([pb::Partition::mig("MIG-a", "3g.40gb", 1, 4, 4)]);
        assert_eq!((a.index, a.uuid.as_str(), a.pci_device_id, a.memory_bytes), (3, "GPU-3", 0x2330_10DE, 81_559 << 20));
        assert!(a.mig_enabled && a.partitions[0].profile == "3g.40gb" && a.processes.is_empty());
        assert_eq!(a.health, pb::HealthState::Healthy as i32);
        let n = pb::NodeState::h100s(2).with_memory_available(7).with_image("vllm:v1");
        assert_eq!(n.accelerators.len(), 2);
        assert_eq!(n.resources.map(|r| r.memory_available_bytes), Some(7));
        assert_eq!(pb::CachedModel::cached("m", "s3://m", "r", 1, 2).state, pb::CacheEntryState::Downloading as i32);
        assert_eq!(pb::CachedModel::ready("m", "s3://m", "r", 2).state, pb::CacheEntryState::Ready as i32);
    }
}
