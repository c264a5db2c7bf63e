//! One MIG instance for a process, the way the NVIDIA container toolkit gives a container
//! one. CUDA finds MIG instances through the capability device nodes in `/dev/nvidia-caps`
//! and GPUs through `/dev/nvidiaN`; the toolkit puts only the chosen GPU's node and the
//! instance's two capability nodes (its GPU instance and compute instance `access`) in the
//! container, so CUDA sees one device, index 0. Engines that read `CUDA_VISIBLE_DEVICES` as
//! integers (vLLM rejects a `MIG-...` UUID there) then work unchanged.
//!
//! For a process the agent does the same in a mount namespace of the child's own, set up
//! between fork and exec: the other GPUs' nodes covered by `/dev/null`, and a tmpfs over
//! `/dev/nvidia-caps` holding only the instance's capability nodes. The host's `/dev` is
//! untouched. The numbers come from the driver's procfs: the GPU's minor number from
//! `/proc/driver/nvidia/gpus/<bus id>/information`, the capability minors from
//! `/proc/driver/nvidia-caps/mig-minors`, the capability major from `/proc/devices`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the child's mount namespace changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// Other GPUs' `/dev/nvidiaN` nodes, covered by `/dev/null`.
    pub hide: Vec<CString>,
    /// `/dev/nvidia-caps`, replaced by a tmpfs with only `caps` in it.
    pub caps_dir: CString,
    /// (path, major, minor) of each capability node to create.
    pub caps: Vec<(CString, u32, u32)>,
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{}: a NUL in the path", p.display()))
}

fn read(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

/// NVML's bus id ("00000000:18:00.0") as the driver's procfs names it ("0000:18:00.0").
fn procfs_bus_id(nvml: &str) -> String {
    let lower = nvml.to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) => format!("{:0>4}:{rest}", domain.trim_start_matches('0')),
        None => lower,
    }
}

/// The view that leaves a process exactly the MIG instance (`gi`, `ci`) of the GPU at
/// `bus_id`; `dev` and `procfs` are `/dev` and `/proc` outside tests.
pub fn plan(dev: &Path, procfs: &Path, bus_id: &str, gi: u32, ci: u32) -> Result<DeviceView, String> {
    let info = procfs.join("driver/nvidia/gpus").join(procfs_bus_id(bus_id)).join("information");
    let minor: u32 = read(&info)?
        .lines()
        .find_map(|l| l.strip_prefix("Device Minor:").map(str::trim))
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("{}: no \"Device Minor:\" line", info.display()))?;
    let devices = procfs.join("devices");
    let major: u32 = read(&devices)?
        .lines()
        .find_map(|l| l.trim().strip_suffix(" nvidia-caps").and_then(|n| n.trim().parse().ok()))
        .ok_or_else(|| format!("{}: no nvidia-caps character device (is the driver loaded with MIG support?)", devices.display()))?;
    let minors_file = procfs.join("driver/nvidia-caps/mig-minors");
    let minors = read(&minors_file)?;
    let want = [format!("gpu{minor}/gi{gi}/access"), format!("gpu{minor}/gi{gi}/ci{ci}/access")];
    let caps_dir = dev.join("nvidia-caps");
    let mut caps = Vec::new();
    for w in &want {
        let m: u32 = minors
            .lines()
            .find_map(|l| l.strip_prefix(w.as_str()).and_then(|r| r.trim().parse().ok()))
            .ok_or_else(|| format!("{}: no {w} (does GPU instance {gi} / compute instance {ci} exist?)", minors_file.display()))?;
        caps.push((cstr(&caps_dir.join(format!("nvidia-cap{m}")))?, major, m));
    }
    let mut hide = Vec::new();
    for e in std::fs::read_dir(dev).map_err(|e| format!("reading {}: {e}", dev.display()))?.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        let other_gpu =
            n.strip_prefix("nvidia").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && d != minor.to_string());
        if other_gpu {
            hide.push(cstr(&e.path())?);
        }
    }
    hide.sort();
    Ok(DeviceView { hide, caps_dir: cstr(&caps_dir)?, caps })
}

/// Runs `view` in `cmd`'s child before exec: a private mount namespace with the other GPUs
/// and capabilities out of sight.
pub fn apply(cmd: &mut std::process::Command, view: DeviceView) {
    use rustix::mount::{MountFlags, MountPropagationFlags};
    let null = c"/dev/null";
    let root = c"/";
    let tmpfs = c"tmpfs";
    let opts = c"mode=0755";
    let f = move || -> std::io::Result<()> {
        // SAFETY: a new mount namespace for this single-threaded child about to exec; no
        // other thread shares its filesystem state.
        #[allow(unsafe_code)]
        unsafe {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)?;
        }
        // Nothing done here may reach the host's mounts.
        rustix::mount::mount_change(root, MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)?;
        for p in &view.hide {
            rustix::mount::mount_bind(null, p.as_c_str())?;
        }
        rustix::mount::mount(tmpfs, view.caps_dir.as_c_str(), tmpfs, MountFlags::NOSUID | MountFlags::NOEXEC, Some(opts))?;
        for (p, major, minor) in &view.caps {
            let mode = rustix::fs::Mode::from_raw_mode(0o444);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                p.as_c_str(),
                rustix::fs::FileType::CharacterDevice,
                mode,
                rustix::fs::makedev(*major, *minor),
            )?;
        }
        Ok(())
    };
    // SAFETY: between fork and exec only system calls run (unshare, mount, mknod) on
    // strings built before the fork: no allocation, no lock.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake driver: GPUs at minors 0 and 1 (the one at 0000:18:00.0 is minor 1), with GPU
    /// instance 1 / compute instance 0 on it at capability minors 12 and 13.
    fn fake(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (dev, proc) = (root.join("dev"), root.join("proc"));
        std::fs::create_dir_all(dev.join("nvidia-caps")).unwrap();
        std::fs::create_dir_all(proc.join("driver/nvidia/gpus/0000:18:00.0")).unwrap();
        std::fs::create_dir_all(proc.join("driver/nvidia-caps")).unwrap();
        std::fs::write(proc.join("driver/nvidia/gpus/0000:18:00.0/information"), "Model: NVIDIA H100\nDevice Minor: 1\n").unwrap();
        std::fs::write(proc.join("devices"), "Character devices:\n  1 mem\n195 nvidia\n508 nvidia-caps\n").unwrap();
        std::fs::write(
            proc.join("driver/nvidia-caps/mig-minors"),
            "config 1\nmonitor 2\ngpu0/gi1/access 3\ngpu0/gi1/ci0/access 4\ngpu1/gi1/access 12\ngpu1/gi1/ci0/access 13\ngpu1/gi2/access 21\n",
        )
        .unwrap();
        for n in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"] {
            std::fs::write(dev.join(n), "").unwrap();
        }
        (dev, proc)
    }

    #[test]
    fn the_plan_keeps_one_gpu_and_the_instances_two_capabilities() {
        let tmp = tempfile::tempdir().unwrap();
        let (dev, proc) = fake(tmp.path());
        let v = plan(&dev, &proc, "00000000:18:00.0", 1, 0).unwrap();
        assert_eq!(v.hide, vec![cstr(&dev.join("nvidia0")).unwrap()], "other GPUs only: nvidiactl and nvidia-uvm stay");
        let caps: Vec<(String, u32, u32)> = v.caps.iter().map(|(p, a, b)| (p.to_string_lossy().into_owned(), *a, *b)).collect();
        let d = dev.join("nvidia-caps");
        assert_eq!(caps, vec![(format!("{}/nvidia-cap12", d.display()), 508, 12), (format!("{}/nvidia-cap13", d.display()), 508, 13)]);
        let e = plan(&dev, &proc, "00000000:18:00.0", 3, 0).unwrap_err();
        assert!(e.contains("no gpu1/gi3/access"), "{e}");
        let e = plan(&dev, &proc, "00000000:3b:00.0", 1, 0).unwrap_err();
        assert!(e.contains("0000:3b:00.0/information"), "{e}");
    }

    /// As root (the suite's privileged tests): the child sees only its instance; the host's
    /// directory is unchanged.
    #[test]
    fn a_child_sees_only_its_instance_and_the_host_is_untouched() {
        assert!(rustix::process::geteuid().is_root(), "this test needs root (mount namespaces and mknod), as the test command runs");
        let tmp = tempfile::tempdir().unwrap();
        let (dev, proc) = fake(tmp.path());
        for m in [3, 4, 12, 13, 21] {
            std::fs::write(dev.join(format!("nvidia-caps/nvidia-cap{m}")), "").unwrap();
        }
        std::fs::write(dev.join("nvidia0"), "other GPU").unwrap();
        let v = plan(&dev, &proc, "00000000:18:00.0", 1, 0).unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg("ls \"$1/nvidia-caps\" | tr '\\n' ' '; stat -c '%F %t:%T' \"$1/nvidia-caps/nvidia-cap12\"; cat \"$1/nvidia0\" | wc -c")
            .arg("sh")
            .arg(&dev);
        apply(&mut cmd, v);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].trim(), "nvidia-cap12 nvidia-cap13 character special file 1fc:c", "{text}");
        assert_eq!(lines[1].trim(), "0", "the other GPU reads as /dev/null: {text}");
        let mut host: Vec<String> =
            std::fs::read_dir(dev.join("nvidia-caps")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        host.sort();
        assert_eq!(host, ["nvidia-cap12", "nvidia-cap13", "nvidia-cap21", "nvidia-cap3", "nvidia-cap4"]);
        assert_eq!(std::fs::read_to_string(dev.join("nvidia0")).unwrap(), "other GPU");
    }
}
