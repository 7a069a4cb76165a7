//! The receiving side of credit-based flow control on the wire: status
//! reports in, grants out, over plain NATS subjects. The decisions are the
//! [`crate::protocol::credit::Ledger`]'s; this loop only carries them.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_model::key_group::KeyGroup;

use crate::protocol::credit;
use crate::transport::hop::Hop;
use crate::transport::nats::{NatsSettings, TransportError, js_err};

/// A control message (credit status or grant) that cannot be read: count
/// it and go on. Nothing is lost: the next one of its sender replaces it.
pub(crate) fn unreadable(metrics: &crate::observe::metrics::Metrics, subject: &str, e: &dyn std::fmt::Display) {
    metrics.dead_letter(crate::transport::dead_letter::Reason::ControlMessage);
    tracing::warn!(%subject, error = %e, "skipped a control message that cannot be read");
}

/// The receiving side of flow control for one instance: take the status
/// reports of the senders to its key groups on `hop`, and announce every
/// channel's limit from `ledger` (which the stage thread feeds with what it
/// consumed): at once to a sender that reports, every `credit_interval` for
/// the limits that changed, and every ten intervals all of them (repairing
/// lost announcements). Ends with `shutdown`.
pub async fn run_credit_receiver(
    client: async_nats::Client,
    settings: NatsSettings,
    hop: Hop,
    owned: sluice_model::key_group::KeyGroupSet,
    ledger: std::sync::Arc<std::sync::Mutex<credit::Ledger>>,
    metrics: std::sync::Arc<crate::observe::metrics::Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), TransportError> {
    let subject = credit::status_subject(&settings.prefix, hop);
    let mut statuses = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| js_err(format!("subscribing to {subject}"))(Box::new(e)))?;
    let mut tick = tokio::time::interval(settings.credit_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced: HashMap<(KeyGroup, credit::Sender), credit::Usage> = HashMap::new();
    let mut ticks = 0u64;
    let announce = |grant: &credit::Grant| {
        let subject = credit::grant_subject(&settings.prefix, hop, &grant.sender.name);
        (subject, serde_json::to_vec(grant).unwrap_or_default())
    };
    loop {
        let due: Vec<credit::Grant> = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = statuses.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let status = match serde_json::from_slice::<credit::Status>(&msg.payload) {
                    Ok(status) => status,
                    Err(e) => {
                        unreadable(&metrics, &msg.subject, &e);
                        continue;
                    }
                };
                if let Err(e) = status.v.check("credit status") {
                    unreadable(&metrics, &msg.subject, &e);
                    continue;
                }
                if !owned.contains(status.key_group) {
                    continue;
                }
                let mut l = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                l.status(&status);
                l.grants().into_iter().filter(|g| g.key_group == status.key_group && g.sender == status.sender).collect()
            }
            _ = tick.tick() => {
                ticks += 1;
                let mut l = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                l.tick();
                metrics.credit_granted.set(i64::try_from(l.outstanding().bytes).unwrap_or(i64::MAX));
                let all = ticks.is_multiple_of(10);
                let grants = l.grants();
                if all {
                    // Forget what was announced to channels the ledger forgot.
                    let live: std::collections::HashSet<_> =
                        grants.iter().map(|g| (g.key_group, g.sender.clone())).collect();
                    announced.retain(|k, _| live.contains(k));
                }
                grants
                    .into_iter()
                    .filter(|g| all || announced.get(&(g.key_group, g.sender.clone())) != Some(&g.limit))
                    .collect()
            }
        };
        for grant in due {
            let (subject, body) = announce(&grant);
            announced.insert((grant.key_group, grant.sender.clone()), grant.limit);
            // Lost announcements are repaired by the next ones.
            let _ = client.publish(subject, body.into()).await;
        }
    }
}
