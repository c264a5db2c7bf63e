//! Every command of `docs/decisions.md`, run in order against a real `hearth local`, so the
//! docs cannot drift from the binary: each `sh` block runs as the reader would run it (with
//! the setup block's variables and `g`/`c` helpers), and must succeed, or fail with exactly
//! the error the docs show after it. Blocks for a real cluster (kubectl, a cluster DNS name)
//! and the grpcurl alternatives are skipped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_tests::{Proc, bin, wait_for};

/// A shell block and what the docs show right after it, if anything.
struct Example {
    line: usize,
    script: String,
    shown: Option<String>,
}

fn examples(doc: &str) -> Vec<Example> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```sh" {
            i += 1;
            continue;
        }
        let start = i + 1;
        let end = start + lines[start..].iter().position(|l| l.trim() == "```").unwrap_or(lines.len() - start);
        let script = lines[start..end].join("\n");
        // A fenced block right after is what the command prints.
        let shown = (lines.get(end + 1).is_some_and(|l| l.starts_with("```") && l.trim() != "```sh")).then(|| {
            let s = end + 2;
            let e = s + lines[s..].iter().position(|l| l.trim() == "```").unwrap_or(lines.len() - s);
            lines[s..e].join("\n")
        });
        out.push(Example { line: start, script, shown });
        i = end + 1;
    }
    out
}

/// The reader's setup (`L=`, `CA=`, the helpers) is replaced by the test's own prelude.
fn runnable(script: &str) -> Option<String> {
    if ["kubectl", "grpcurl", "hearth-system.svc", "/etc/hearth"].iter().any(|w| script.contains(w)) {
        return None;
    }
    let kept: Vec<&str> = script
        .lines()
        .filter(|l| !["L=", "CA=", "GRPC=", "EXT=", "g() {", "c() {"].iter().any(|p| l.trim_start().starts_with(p)))
        .collect();
    // Streams are shown with a minute of patience; a few seconds prove the same here.
    Some(kept.join("\n").replace("--max-time 60s", "--max-time 3s"))
}

/// What a block leaves defined in the reader's shell for the blocks after it: functions and
/// variables (`fixture() {...}`, `SO=...`).
fn definitions(script: &str) -> String {
    let mut out = String::new();
    let mut in_fn = false;
    for l in script.lines() {
        let starts_fn = l.contains("() {") && !l.starts_with(' ');
        let assigns = l.split_once('=').is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        if in_fn || starts_fn || assigns {
            out.push_str(l);
            out.push('\n');
        }
        in_fn = (in_fn || starts_fn) && l.trim() != "}";
    }
    out
}

#[tokio::test]
async fn every_documented_decision_command_runs_against_local_mode() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(repo.join("docs/decisions.md"))?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let local = Proc::spawn("local", &mut hearth_tests::local_mode(&state, "0", "0"), dir.path())?;
    let hearth = bin("hearth");
    // Ready for the docs: the node reports, and its sample model is cached.
    wait_for("local mode with its sample model cached", Duration::from_secs(60), || async {
        let out = Command::new(&hearth).args(["call", "hearth.v1.Operator/ListNodes", "--state-dir"]).arg(&state).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok((v["nodes"][0]["cachedModels"].as_u64() == Some(1) && v["nodes"][0]["connection"] == "NODE_CONNECTION_CONNECTED").then_some(()))
    })
    .await
    .map_err(|e| e.context(local.log_text()))?;
    // And the sample-chat replica the controller starts serves on its GPU (the docs count it).
    wait_for("the sample-chat replica ready", Duration::from_secs(60), || async {
        let out = Command::new(&hearth).args(["status", "--output", "json", "--state-dir"]).arg(&state).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok((v["runtimes"][0]["state"] == "ready").then_some(()))
    })
    .await
    .map_err(|e| e.context(local.log_text()))?;
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("local/local.json"))?)?;
    let s = |k: &str| info[k].as_str().unwrap_or_default().to_owned();
    let port = s("controller_url").rsplit(':').next().unwrap_or_default().to_owned();
    let prelude = format!(
        "export PATH={bin_dir}:$PATH\nCA={ca}; CERT={cert}; KEY={key}; GRPC=localhost:{port}; EXT={ext}\n\
         g() {{ hearth call --state-dir {state} \"$@\"; }}\n\
         c() {{ curl -s --cacert \"$CA\" --cert \"$CERT\" --key \"$KEY\" \"$@\"; }}\n",
        bin_dir = hearth.parent().context("hearth's directory")?.display(),
        ca = s("ca"),
        cert = s("cert"),
        key = s("key"),
        ext = s("extender_url"),
        state = state.display(),
    );

    let mut ran = 0;
    let mut defined = String::new();
    for ex in examples(&doc) {
        let Some(script) = runnable(&ex.script) else { continue };
        let out = Command::new("bash").arg("-c").arg(format!("{prelude}{defined}{script}")).current_dir(&repo).output()?;
        defined.push_str(&definitions(&script));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let at = format!("docs/decisions.md line {}:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}", ex.line);
        match ex.shown.as_deref().filter(|s| s.starts_with("error: ")) {
            Some(error) => {
                ensure!(!out.status.success(), "the docs show an error, the command succeeded: {at}");
                ensure!(stderr.trim() == error.trim(), "the docs show\n{error}\n{at}");
            }
            None => {
                ensure!(out.status.success(), "failed: {at}");
                ensure!(!stderr.contains("error:"), "a command failed: {at}");
                // What the docs print as JSON comes out as JSON with the same fields at the
                // top (values such as timestamps and bandwidths differ from run to run).
                if let Some(json) = ex.shown.as_deref().filter(|s| s.trim_start().starts_with('{'))
                    && let Ok(want) = serde_json::from_str::<serde_json::Value>(json)
                    && let Some(want) = want.as_object()
                {
                    // A block of several commands prints several objects; one of them is shown.
                    let got: Vec<serde_json::Value> = serde_json::Deserializer::from_str(stdout.trim())
                        .into_iter()
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("not JSON: {at}"))?;
                    let keys = |v: &serde_json::Map<String, serde_json::Value>| v.keys().cloned().collect::<Vec<_>>();
                    ensure!(
                        got.iter().any(|g| g.as_object().map(keys) == Some(keys(want))),
                        "no answer has the fields the docs show in {json}\n{at}"
                    );
                }
            }
        }
        ran += 1;
    }
    ensure!(ran >= 15, "only {ran} blocks ran: the parser lost the docs' commands");
    println!("ran {ran} documented command blocks against hearth local");
    Ok(())
}
