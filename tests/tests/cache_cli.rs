//! `hearth cache` commands as a user runs them.

use std::process::Command;

use hearth_tests::bin;

#[test]
fn cache_ls_on_a_missing_directory_says_so_and_fails() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("no-such-cache");
    let out = Command::new(bin("hearth")).args(["cache", "ls", "--dest"]).arg(&missing).output().expect("run hearth");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cache directory {} does not exist", missing.display())), "{err}");

    // An existing, empty cache is empty, not an error.
    let out = Command::new(bin("hearth")).args(["cache", "ls", "--json", "--dest"]).arg(dir.path()).output().expect("run hearth");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}
