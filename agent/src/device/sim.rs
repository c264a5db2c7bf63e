//! Simulated accelerators that look like the real products: names, memory and PCI ids as
//! the drivers report them, stable UUIDs per node. CI and `hearth local` run on this; the
//! NVIDIA work extends it with MIG profile tables and NVML's failure modes.

use super::{Accelerator, DeviceError, Health, Inventory, Vendor};

/// A product the simulator can stand in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Name used in config: "H100-80GB".
    pub key: &'static str,
    /// Name the driver reports.
    pub name: &'static str,
    pub vendor: Vendor,
    pub memory_bytes: u64,
    /// PCI device id in mig-parted's form (device << 16 | vendor); 0 for Neuron.
    pub pci_device_id: u32,
    pub core_count: u32,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Memory sizes are NVML's `memory.total` on each product (H100 80GB: 81559 MiB).
pub const PRODUCTS: &[Product] = &[
    Product {
        key: "H100-80GB",
        name: "NVIDIA H100 80GB HBM3",
        vendor: Vendor::Nvidia,
        memory_bytes: 81559 * MIB,
        pci_device_id: 0x2330_10DE,
        core_count: 0,
    },
    Product {
        key: "H200-141GB",
        name: "NVIDIA H200",
        vendor: Vendor::Nvidia,
        memory_bytes: 143771 * MIB,
        pci_device_id: 0x2335_10DE,
        core_count: 0,
    },
    Product {
        key: "A100-40GB",
        name: "NVIDIA A100-SXM4-40GB",
        vendor: Vendor::Nvidia,
        memory_bytes: 40960 * MIB,
        pci_device_id: 0x20B0_10DE,
        core_count: 0,
    },
    Product {
        key: "A100-80GB",
        name: "NVIDIA A100-SXM4-80GB",
        vendor: Vendor::Nvidia,
        memory_bytes: 81920 * MIB,
        pci_device_id: 0x20B2_10DE,
        core_count: 0,
    },
    Product { key: "inf2", name: "Inferentia2", vendor: Vendor::AwsNeuron, memory_bytes: 32 * GIB, pci_device_id: 0, core_count: 2 },
    Product { key: "trn1", name: "Trainium", vendor: Vendor::AwsNeuron, memory_bytes: 32 * GIB, pci_device_id: 0, core_count: 2 },
    Product { key: "trn2", name: "Trainium2", vendor: Vendor::AwsNeuron, memory_bytes: 96 * GIB, pci_device_id: 0, core_count: 8 },
];

/// "2xH100-80GB": a count and a product; or a Neuron instance type ("inf2.48xlarge"), which
/// is its devices with the instance's geometry (logical cores per device, core-group rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSpec {
    pub count: u32,
    pub product: &'static Product,
    pub instance: Option<&'static hearth_proto::neuron::Topology>,
}

impl SimSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let expected = || {
            let keys: Vec<_> = PRODUCTS.iter().map(|p| p.key).collect();
            let types: Vec<_> = hearth_proto::neuron::INSTANCE_TYPES.iter().map(|t| t.instance_type).collect();
            format!(
                "a product like \"2xH100-80GB\" (COUNTxPRODUCT, count 1-64, product one of {}) or a Neuron instance type ({})",
                keys.join(", "),
                types.join(", ")
            )
        };
        if let Some(t) = hearth_proto::neuron::INSTANCE_TYPES.iter().find(|t| t.instance_type == s.trim()) {
            let key = match t.device_name {
                "Inferentia2" => "inf2",
                "Trainium" => "trn1",
                _ => "trn2",
            };
            let product = PRODUCTS.iter().find(|p| p.key == key).ok_or_else(expected)?;
            return Ok(Self { count: t.devices, product, instance: Some(t) });
        }
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let (count, key) = match compact.split_once(['x', 'X']) {
            Some((n, k)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (n.parse().map_err(|_| expected())?, k),
            _ => (1, compact.as_str()),
        };
        let product = PRODUCTS.iter().find(|p| p.key.eq_ignore_ascii_case(key)).ok_or_else(expected)?;
        if !(1..=64).contains(&count) {
            return Err(expected());
        }
        Ok(Self { count, product, instance: None })
    }
}

/// Simulated inventory: the listed products, indexed in order.
#[derive(Debug)]
pub struct SimInventory {
    devices: Vec<Accelerator>,
}

/// FNV-1a, so a node's simulated UUIDs are the same on every start.
fn fnv(data: &[u8], seed: u64) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl SimInventory {
    pub fn new(node: &str, specs: &[SimSpec]) -> Self {
        let mut devices = Vec::new();
        for spec in specs {
            for _ in 0..spec.count {
                let index = devices.len() as u32;
                let p = spec.product;
                let a = fnv(node.as_bytes(), u64::from(index));
                let b = fnv(p.key.as_bytes(), a);
                let hex = format!("{a:016x}{b:016x}");
                let uuid_body = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
                let (uuid, pci_bus_id) = match p.vendor {
                    Vendor::Nvidia => (format!("GPU-{uuid_body}"), format!("00000000:{:02X}:00.0", 0x18 + index * 0x10)),
                    Vendor::AwsNeuron => (format!("neuron-{uuid_body}"), format!("0000:{:02x}:1e.0", 0x10 + index)),
                };
                devices.push(Accelerator {
                    index,
                    uuid,
                    vendor: p.vendor,
                    product: p.name.to_owned(),
                    memory_bytes: p.memory_bytes,
                    pci_bus_id,
                    pci_device_id: p.pci_device_id,
                    // An instance type's devices count logical cores (trn2: LNC 2 by default).
                    core_count: spec.instance.map_or(p.core_count, |t| t.cores_per_device),
                    simulated: true,
                    health: Health::Healthy,
                    health_reason: String::new(),
                    gpu: None,
                    core_groups: Vec::new(),
                });
            }
        }
        Self { devices }
    }
}

impl Inventory for SimInventory {
    fn name(&self) -> &'static str {
        "simulated"
    }
    fn accelerators(&self) -> Result<Vec<Accelerator>, DeviceError> {
        Ok(self.devices.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_products() {
        let s = SimSpec::parse("2xH100-80GB").expect("valid");
        assert_eq!((s.count, s.product.key), (2, "H100-80GB"));
        assert_eq!(SimSpec::parse("trn2").expect("valid").count, 1);
        assert_eq!(SimSpec::parse("8 x a100-40gb").expect("valid").product.pci_device_id, 0x20B0_10DE);
        assert!(SimSpec::parse("0xH100-80GB").is_err());
        assert!(SimSpec::parse("65xH100-80GB").is_err());
        let e = SimSpec::parse("2xB300").unwrap_err();
        assert!(e.contains("H100-80GB") && e.contains("trn2"), "{e}");
    }

    #[test]
    fn inventory_is_stable_per_node_and_distinct_across_nodes() {
        let specs = [SimSpec::parse("2xH100-80GB").expect("valid"), SimSpec::parse("1xinf2").expect("valid")];
        let a = SimInventory::new("node-a", &specs).accelerators().expect("sim");
        let again = SimInventory::new("node-a", &specs).accelerators().expect("sim");
        let b = SimInventory::new("node-b", &specs).accelerators().expect("sim");
        assert_eq!(a, again);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0].uuid, b[0].uuid);
        assert_ne!(a[0].uuid, a[1].uuid);
        assert!(a[0].uuid.starts_with("GPU-") && a[0].uuid.len() == 40, "{}", a[0].uuid);
        assert_eq!(a[2].vendor, Vendor::AwsNeuron);
        assert_eq!(a[2].core_count, 2);
    }
}
