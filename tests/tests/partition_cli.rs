//! `hearth partition plan` on the shipped example spec, against simulated GPUs.

use std::process::Command;

use hearth_tests::bin;

fn plan(args: &[&str]) -> (bool, String, String) {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/mig-spec.yaml");
    let out = Command::new(bin("hearth")).args(["partition", "plan", "--spec", spec]).args(args).output().expect("run hearth");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn plan_prints_ordered_explicit_placements() {
    let (ok, out, err) = plan(&["--config", "half-and-half", "--simulate", "2xH100-80GB"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "plan for config \"half-and-half\" on 2 simulated GPU(s) (read-only; nothing was changed):\n  \
         now: GPU 0 NVIDIA H100 80GB HBM3 MIG off\n  now: GPU 1 NVIDIA H100 80GB HBM3 MIG off\n  \
         GPU 0: enable MIG mode\n  GPU 0: create 4g.40gb (profile id 5) at placement 0\n  \
         GPU 0: create 3g.40gb (profile id 9) at placement 4\n  unchanged: GPU 1\n"
    );
}

#[test]
fn plan_refuses_profiles_the_product_lacks_and_says_why() {
    let (ok, _, err) = plan(&["--config", "half-and-half", "--simulate", "1xH200-141GB"]);
    assert!(!ok);
    assert!(err.contains("GPU 0 (NVIDIA H200): profile \"3g.40gb\" does not exist on this product"), "{err}");
    let (ok, _, err) = plan(&["--config", "balanced"]);
    assert!(!ok);
    assert!(err.contains("pass --simulate"), "{err}");
}

#[test]
fn plan_says_when_the_device_filter_excludes_every_gpu() {
    // `balanced-h200` is for H200s (0x233510DE); these are H100s.
    let (ok, out, err) = plan(&["--config", "balanced-h200", "--simulate", "2xH100-80GB"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "config \"balanced-h200\" applies to none of these GPUs (its device filter selects 0x233510de; these GPUs are 0x233010de): nothing would change"
        ),
        "{out}"
    );
    assert!(!out.contains("nothing to do"), "{out}");
}

#[test]
fn plan_places_neuron_core_groups_on_a_simulated_instance_type() {
    let (ok, out, err) = plan(&["--config", "inf2-mixed", "--simulate", "inf2.48xlarge"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("plan for config \"inf2-mixed\" on simulated inf2.48xlarge (12 Inferentia2 devices, 24 NeuronCores, LNC 1)"),
        "{out}"
    );
    // The whole-device group first (devices 0-3), then the pairs from device 4 on.
    assert!(out.contains("group 0: 8 cores 0-7     devices 0-3  NEURON_RT_VISIBLE_CORES=0-7"), "{out}");
    assert!(out.contains("group 6: 2 cores 18-19"), "{out}");
    assert!(out.contains("20 of 24 cores in groups, 4 free"), "{out}");
    let (ok, out, err) = plan(&["--config", "trn2-quarters", "--simulate", "trn2.48xlarge"]);
    assert!(ok && out.contains("group 3: 16 cores 48-63"), "{out}{err}");
    // On inf2.24xlarge the 8-core group and six pairs need 20 cores of 12.
    let (ok, _, err) = plan(&["--config", "inf2-mixed", "--simulate", "inf2.24xlarge"]);
    assert!(!ok && err.contains("do not fit"), "{err}");
    let (ok, _, err) = plan(&["--config", "balanced-h200", "--simulate", "inf2.48xlarge"]);
    assert!(!ok && err.contains("no neuron-configs entries"), "{err}");
}
