//! `hearth local`: a controller and an agent in one process on loopback, with simulated
//! accelerators and real mTLS from a dev CA generated on each start. It publishes its
//! addresses and operator credentials in `<state dir>/local/local.json`, which `hearth
//! status` reads when given no flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// The embedded controller: the agent's only path to controller code, and only in builds
// with the `local` feature (the default `hearth` build; the DaemonSet image builds without).
#[cfg(feature = "local")]
mod run;
#[cfg(feature = "local")]
pub use run::{LocalArgs, run};

/// What `hearth status` needs to reach a running local mode.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalInfo {
    pub pid: u32,
    pub controller_url: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub controller_metrics: String,
    pub agent_metrics: String,
    pub node_name: String,
    /// The kube-scheduler extender's base URL (operator certificate), when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extender_url: Option<String>,
}

/// `$HEARTH_STATE_DIR`, else `$XDG_STATE_HOME/hearth`, else `~/.local/state/hearth`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HEARTH_STATE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("hearth");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/hearth")
}

pub fn info_path(state_dir: &Path) -> PathBuf {
    state_dir.join("local").join("local.json")
}
