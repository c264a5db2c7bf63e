//! The Neuron simulator: a fake driver tree (`sysfs::write_fake_tree`) and a fake
//! `neuron-monitor` (`hearth neuron-monitor-sim`) that prints the real report shape, one JSON
//! document per line every period, with plausible, changing values read against the tree.
//! Faults are injected through the tree, as the hardware would show them:
//! - ECC events: raise `stats/hardware/{mem,sram}_ecc_{uncorrected,corrected}` of a device;
//!   the report carries the increase for the period (and the agent marks the device unhealthy);
//! - a device that disappears: remove its `neuron<N>` directory;
//! - a runtime error: create `hearth-sim/runtime_error` under the root; the runtime reports
//!   hardware execution errors and failed executions while it exists.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::neuron::Topology;
use serde_json::{Value, json};

use super::sysfs;

/// Where fault switches live under the fake root.
pub const FAULT_DIR: &str = "hearth-sim";

/// Generates the reports; keeps the last ECC counts to report per-period increases.
#[derive(Debug)]
pub struct FakeMonitor {
    root: PathBuf,
    topology: Topology,
    instance_id: String,
    period: Duration,
    tick: u64,
    last_ecc: BTreeMap<u32, [u64; 4]>,
    /// One runtime per device present instead of one on the first.
    every_device: bool,
}

impl FakeMonitor {
    pub fn new(root: &Path, topology: Topology, instance_id: &str, period: Duration) -> Self {
        Self {
            root: root.to_owned(),
            topology,
            instance_id: instance_id.to_owned(),
            period,
            tick: 0,
            last_ecc: BTreeMap::new(),
            every_device: false,
        }
    }

    /// A fully loaded node: a runtime on every device present (tags `sim-0`, `sim-1`, ...),
    /// so every NeuronCore reports counters and memory, as on a node serving one model per
    /// device. Benchmarks use it for the largest reports.
    pub fn every_device(mut self) -> Self {
        self.every_device = true;
        self
    }

    /// The next report.
    pub fn report(&mut self) -> Value {
        self.tick += 1;
        let t = &self.topology;
        let p = self.period.as_secs_f64();
        let devices = sysfs::devices(&self.root).unwrap_or_default();
        let hw: Vec<Value> = devices
            .iter()
            .map(|d| {
                let now =
                    [d.ecc.mem_corrected.unwrap_or(0), d.ecc.mem_uncorrected, d.ecc.sram_corrected.unwrap_or(0), d.ecc.sram_uncorrected];
                let before = self.last_ecc.insert(d.index, now).unwrap_or(now);
                let inc = |i: usize| now[i].saturating_sub(before[i]);
                json!({"neuron_device_index": d.index, "mem_ecc_corrected": inc(0), "mem_ecc_uncorrected": inc(1),
                       "sram_ecc_corrected": inc(2), "sram_ecc_uncorrected": inc(3)})
            })
            .collect();
        let failing = self.root.join(FAULT_DIR).join("runtime_error").exists();
        // One runtime serving on the first device present (or one on each), its load rising
        // and falling.
        let serving = if self.every_device { devices.len() } else { 1 };
        let runtimes: Vec<Value> = devices
            .iter()
            .take(serving)
            .enumerate()
            .map(|(n, d)| {
                let phase = self.tick as f64 / 6.0;
                let cpd = t.cores_per_device;
                let cores: BTreeMap<String, Value> = (0..cpd)
                    .map(|c| {
                        let util = (45.0 + 35.0 * (phase + f64::from(c)).sin()).clamp(0.0, 100.0);
                        ((d.index * cpd + c).to_string(), json!({"neuroncore_utilization": util, "effective_flops": (util * 1e10) as u64}))
                    })
                    .collect();
                let memory: BTreeMap<String, Value> = (0..cpd)
                    .map(|c| {
                        ((d.index * cpd + c).to_string(), json!({"constants": 4 << 20, "model_code": 96 << 20, "model_shared_scratchpad": 0,
                                                                  "runtime_memory": 1 << 20, "tensors": 512 << 20}))
                    })
                    .collect();
                let done = 40 + (self.tick % 7) * 3;
                let (hw_err, failed) = if failing { (2, 2) } else { (0, 0) };
                json!({
                    "pid": std::process::id(), "neuron_runtime_tag": format!("sim-{n}"), "error": "",
                    "report": {
                        "neuroncore_counters": {"period": p, "neuroncores_in_use": cores, "error": ""},
                        "execution_stats": {"period": p,
                            "error_summary": {"generic": 0, "numerical": 0, "transient": 0, "model": 0, "runtime": 0, "hardware": hw_err},
                            "execution_summary": {"completed": done, "completed_with_err": failed, "completed_with_num_err": 0,
                                                  "timed_out": 0, "incorrect_input": 0, "failed_to_queue": 0},
                            "latency_stats": {
                                "total_latency": {"p0": 0.010, "p1": 0.011, "p25": 0.013, "p50": 0.015, "p75": 0.018, "p99": 0.031, "p100": 0.040},
                                "device_latency": {"p0": 0.008, "p1": 0.009, "p25": 0.010, "p50": 0.012, "p75": 0.014, "p99": 0.025, "p100": 0.030}},
                            "error": ""},
                        "memory_used": {"period": p,
                            "neuron_runtime_used_bytes": {"host": 600 << 20, "neuron_device": u64::from(cpd) * (613 << 20),
                                "usage_breakdown": {"host": {"application_memory": 80 << 20, "constants": 0, "dma_buffers": 512 << 20, "tensors": 8 << 20},
                                                    "neuroncore_memory_usage": memory}},
                            "loaded_models": [], "error": ""},
                        "neuron_runtime_vcpu_usage": {"period": p, "vcpu_usage": {"user": 12.5, "system": 2.5}, "error": ""}
                    }
                })
            })
            .collect();
        let device_type = match t.device_name {
            "Inferentia2" => "inferentia2",
            "Trainium" => "trainium",
            _ => "trainium2",
        };
        json!({
            "neuron_runtime_data": runtimes,
            "system_data": {
                "neuron_hw_counters": {"period": p, "neuron_devices": hw, "error": ""},
                "vcpu_usage": {"period": p, "average_usage": {"user": 20.0, "nice": 0.5, "system": 4.0, "idle": 74.5, "io_wait": 0.5, "irq": 0.2, "soft_irq": 0.3},
                               "usage_data": {"0": {"user": 20.0, "nice": 0.5, "system": 4.0, "idle": 74.5, "io_wait": 0.5, "irq": 0.2, "soft_irq": 0.3},
                                              "1": {"user": 20.0, "nice": 0.5, "system": 4.0, "idle": 74.5, "io_wait": 0.5, "irq": 0.2, "soft_irq": 0.3}},
                               "context_switch_count": 1200, "error": ""},
                "memory_info": {"period": p, "memory_total_bytes": 768u64 << 30, "memory_used_bytes": 96u64 << 30,
                                "swap_total_bytes": 0, "swap_used_bytes": 0, "error": ""}
            },
            "instance_info": {"instance_name": "", "instance_id": self.instance_id, "instance_type": t.instance_type,
                              "instance_availability_zone": "us-east-2a", "instance_availability_zone_id": "use2-az1",
                              "instance_region": "us-east-2", "ami_id": "ami-0000000000000000", "subnet_id": "subnet-00000000", "error": ""},
            "neuron_hardware_info": {"neuron_device_type": device_type, "neuroncore_version": if t.physical_cores == 8 { "v3d" } else { "v2" },
                                     "neuron_device_count": devices.len(), "neuron_device_memory_size": t.memory_per_device,
                                     "neuroncore_per_device_count": t.cores_per_device, "logical_neuroncore_config": t.lnc, "error": ""}
        })
    }
}

/// `hearth neuron-monitor-sim`: prints a report every `period` until stdout closes.
pub fn run(root: &Path, instance_type: &str, instance_id: &str, period: Duration) -> anyhow::Result<()> {
    let t = Topology::of(instance_type, None)?;
    anyhow::ensure!(root.join(sysfs::DEVICE_DIR).exists(), "{}: no fake driver tree (the agent writes one in simulation)", root.display());
    let mut m = FakeMonitor::new(root, t, instance_id, period);
    let mut out = std::io::stdout().lock();
    loop {
        let line = serde_json::to_string(&m.report())?;
        // A closed pipe (the agent stopped reading) ends the simulator, as it ends neuron-monitor.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_follow_the_tree_faults_included() {
        let dir = tempfile::tempdir().unwrap();
        let t = Topology::of("inf2.24xlarge", None).unwrap();
        sysfs::write_fake_tree(dir.path(), &t, true).unwrap();
        let mut m = FakeMonitor::new(dir.path(), t, "i-0sim", Duration::from_secs(5));
        let r = m.report();
        assert_eq!(r["neuron_hardware_info"]["neuron_device_count"], 6);
        assert_eq!(r["instance_info"]["instance_type"], "inf2.24xlarge");
        assert_eq!(r["neuron_runtime_data"][0]["report"]["neuroncore_counters"]["neuroncores_in_use"].as_object().unwrap().len(), 2);
        let base = dir.path().join(sysfs::DEVICE_DIR);
        std::fs::write(base.join("neuron3/stats/hardware/mem_ecc_uncorrected"), "2\n").unwrap();
        std::fs::remove_dir_all(base.join("neuron5")).unwrap();
        std::fs::create_dir_all(dir.path().join(FAULT_DIR)).unwrap();
        std::fs::write(dir.path().join(FAULT_DIR).join("runtime_error"), "").unwrap();
        let r = m.report();
        let hw = r["system_data"]["neuron_hw_counters"]["neuron_devices"].as_array().unwrap();
        assert_eq!(hw.len(), 5, "the removed device is gone");
        assert_eq!(hw[3]["mem_ecc_uncorrected"], 2, "the period's increase");
        assert_eq!(r["neuron_runtime_data"][0]["report"]["execution_stats"]["error_summary"]["hardware"], 2);
        let r = m.report();
        assert_eq!(r["system_data"]["neuron_hw_counters"]["neuron_devices"][3]["mem_ecc_uncorrected"], 0, "no new events");
    }

    #[test]
    fn a_loaded_trn2_reports_every_one_of_its_128_cores() {
        let dir = tempfile::tempdir().unwrap();
        let t = Topology::of("trn2.48xlarge", Some(1)).unwrap();
        sysfs::write_fake_tree(dir.path(), &t, true).unwrap();
        let mut m = FakeMonitor::new(dir.path(), t, "i-0sim", Duration::from_secs(5)).every_device();
        let r = m.report();
        let runtimes = r["neuron_runtime_data"].as_array().unwrap();
        assert_eq!(runtimes.len(), 16);
        assert_eq!(runtimes[15]["neuron_runtime_tag"], "sim-15");
        let cores: std::collections::BTreeSet<u32> = runtimes
            .iter()
            .flat_map(|rt| rt["report"]["neuroncore_counters"]["neuroncores_in_use"].as_object().unwrap().keys())
            .map(|k| k.parse().unwrap())
            .collect();
        assert_eq!(cores, (0..128).collect(), "8 logical cores per device at LNC 1");
        assert_eq!(r["neuron_hardware_info"]["logical_neuroncore_config"], 1);
        // And the agent's parser takes it whole.
        let parsed = crate::neuron::monitor::parse_line(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(parsed.runtimes.len(), 16);
    }
}
