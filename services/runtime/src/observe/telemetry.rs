//! Logs of every sluice binary: `tracing` to stderr, filtered by `SLUICE_LOG`
//! (an `EnvFilter` directive such as `info` or `sluice_runtime=debug`).

/// Install the subscriber; `default` applies when `SLUICE_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| default.into());
    // A second init (tests in one process) keeps the first subscriber.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
