//! Shutdown: SIGTERM or SIGINT cancel one token that every loop of a service
//! watches. The input end stops pulling first; downstream loops end when
//! their input closes, after committing, so a drained exit loses nothing (and
//! a forced one is as safe as a crash: the restart resumes from the last commit).

use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT. Must be called inside a
/// tokio runtime.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        cancel.cancel();
    });
    Ok(token)
}
