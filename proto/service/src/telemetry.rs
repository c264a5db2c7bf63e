//! Process set-up both binaries share: log format and filter, the runtime and exit code
//! around `run`, and the one signal handler.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines (colour on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default filter.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests, local mode) keeps the first subscriber; that is fine.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs a binary's async `run` on a multi-threaded runtime and maps the outcome to the exit
/// code both binaries use: 0 on success, 2 with the error chain on stderr otherwise.
pub fn run_main(run: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// An error and its causes, each said once: many error types already put their source in
/// their own message (`config file x: unknown field`), and printing the chain would say
/// it again (`...: unknown field: unknown field`).
pub fn describe(e: &anyhow::Error) -> String {
    describe_error(e.as_ref())
}

/// [`describe`] for any error and its sources.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for cause in std::iter::successors(Some(e), |c| c.source()) {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C): the one signal handler each binary installs.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("signal received, shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("config file {path}: {source}")]
    struct Parse {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::new(Parse { path: "a.yaml", source: std::io::Error::other("unknown field `x` at line 2 column 1") });
        assert_eq!(describe(&e), "config file a.yaml: unknown field `x` at line 2 column 1");
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound)).context("reading /etc/hearth/agent.yaml");
        assert_eq!(describe(&e), "reading /etc/hearth/agent.yaml: entity not found");
    }
}
