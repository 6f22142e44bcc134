//! Following the generation pointer: noticing a switch or a rebuild's
//! handover, and pausing while a handover is under way.

use super::*;

/// How often a live worker checks whether readers moved to another generation.
const POINTER_POLL: Duration = Duration::from_millis(500);

/// Why a generation's consumer was told to stop by the pointer watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Readers now follow another generation.
    Switched { to: u32 },
    /// A rebuild asks this generation's workers to pause until `until`
    /// (Unix ms) while it hands over to `to`.
    Handover { to: u32, until: i64 },
}

/// An operator's pause as the pointer last said (`None`: not paused); a
/// failed read leaves it as it was, so only `courseview resume` lifts it.
pub type Paused = tokio::sync::watch::Receiver<Option<PauseInfo>>;

/// Cancels `moved` once the serving generation is no longer `generation`,
/// or a rebuild asks this generation's workers to pause for its handover,
/// and says which; `None` if `moved` fired for another reason (shutdown).
/// Meanwhile it tells `paused` whether an operator paused the projection.
pub(super) async fn watch_pointer(
    store: Store,
    projection: &'static str,
    generation: u32,
    moved: CancellationToken,
    paused: tokio::sync::watch::Sender<Option<PauseInfo>>,
) -> Option<Moved> {
    loop {
        tokio::select! {
            () = moved.cancelled() => return None,
            () = tokio::time::sleep(POINTER_POLL) => {}
        }
        // Cancellable: the worker waits for this task once it is told to
        // stop, and a read from an unreachable MongoDB must not hold that.
        let read = tokio::select! {
            () = moved.cancelled() => return None,
            read = store.pointer(projection) => read,
        };
        if let Ok(pointer) = read {
            let now = chrono::Utc::now().timestamp_millis();
            // A handover comes first: a rebuild of a paused projection
            // needs its workers out of the serving generation too.
            let why = if pointer.generation != generation {
                Some(Moved::Switched { to: pointer.generation })
            } else {
                pointer
                    .handover
                    .filter(|(to, until)| now < *until && *to != generation)
                    .map(|(to, until)| Moved::Handover { to, until })
            };
            if why.is_some() {
                moved.cancel();
                return why;
            }
            paused.send_if_modified(|was| {
                let changed = *was != pointer.paused;
                was.clone_from(&pointer.paused);
                changed
            });
        }
    }
}

/// How a pause for a rebuild's handover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pause {
    /// No handover (any more): the pointer switched, or the handover was
    /// withdrawn or expired. Go on with the serving generation.
    Over,
    /// Shutdown came first.
    Shutdown,
}

/// While a rebuild hands over from `generation` (still serving), applies
/// nothing: the serving generation must stop moving so the new one can
/// reach it. Returns when the pointer switched, the handover was withdrawn
/// or expired.
pub(super) async fn pause_for_handover(
    settings: &WorkerSettings,
    store: &Store,
    projection: &'static str,
    generation: u32,
    cancel: &CancellationToken,
) -> Pause {
    let mut announced = false;
    // Until when the last pointer read asked us to pause: a failed read
    // (MongoDB slow or away) must not end the pause early and let the
    // serving generation move under a rebuild that is closing the gap.
    let mut paused_until: Option<i64> = None;
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        match store.pointer(projection).await {
            Ok(p) if p.generation == generation && p.handing_over(now).is_some() => {
                let until = p.handover.map(|(_, until)| until);
                // A new request (a rebuild asking again) is reported anew.
                if until != paused_until {
                    if !announced {
                        info!(projection, generation, "Pausing for a rebuild's handover.");
                        announced = true;
                    }
                    report_paused(settings, generation, until.unwrap_or_default());
                }
                paused_until = until;
            }
            Ok(_) => return Pause::Over,
            Err(_) if paused_until.is_some_and(|until| now < until) => {}
            // MongoDB unreachable and no handover known: the next
            // generation start retries it.
            Err(_) => return Pause::Over,
        }
        tokio::select! {
            () = cancel.cancelled() => return Pause::Shutdown,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// A token that fires `after` once `cancel` has fired: the deadline of the
/// work in hand when shutdown starts.
pub(super) fn deadline_after(cancel: &CancellationToken, after: Duration) -> CancellationToken {
    let hard = CancellationToken::new();
    let (cancel, trigger) = (cancel.clone(), hard.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            // Nobody holds the deadline any more: nothing to time.
            () = trigger.cancelled() => return,
        }
        tokio::time::sleep(after).await;
        trigger.cancel();
    });
    hard
}
