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
    /// An operator paused the projection (`courseview pause`).
    Paused,
}

/// Cancels `moved` once the serving generation is no longer `generation`,
/// or a rebuild asks this generation's workers to pause for its handover,
/// and says which; `None` if `moved` fired for another reason (shutdown).
pub(super) async fn watch_pointer(
    store: Store,
    projection: &'static str,
    generation: u32,
    moved: CancellationToken,
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
            let why = if pointer.generation != generation {
                Some(Moved::Switched { to: pointer.generation })
            } else if pointer.paused.is_some() {
                Some(Moved::Paused)
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
    /// An operator's pause held the worker, then was lifted: read the
    /// pointer again (a rebuild may have switched meanwhile).
    Resumed,
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

/// While an operator has the projection paused, applies nothing: no
/// consumer, so nothing is read; the offsets stay where the last flush
/// stored them. Returns once a pointer read says it is not paused: `Over`
/// if it never was, `Resumed` if it held. A failed read is retried, never
/// taken for "not paused": only `courseview resume` ends a pause.
pub(super) async fn wait_while_paused(
    settings: &WorkerSettings,
    store: &Store,
    projection: &'static str,
    cancel: &CancellationToken,
) -> Pause {
    let mut announced = false;
    let flag = |on: bool| {
        if let Some(flag) = &settings.operator_paused {
            flag.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    };
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        match store.pointer(projection).await {
            Ok(p) if p.paused.is_some() => {
                flag(true);
                if !announced {
                    let reason = p.paused.as_ref().and_then(|i| i.reason.clone()).unwrap_or_default();
                    let by = p.paused.as_ref().map(|i| i.by.clone()).unwrap_or_default();
                    info!(
                        projection,
                        generation = p.generation,
                        by,
                        reason,
                        "Paused by an operator; applying nothing until resumed."
                    );
                    announced = true;
                }
                // Applying nothing: a rebuild handing over from this
                // generation may count this worker as paused for it too.
                match p.handover.filter(|(to, until)| now < *until && *to != p.generation) {
                    Some((_, until)) => report_paused(settings, p.generation, until),
                    None => report(settings, p.generation, false),
                }
            }
            Ok(_) => {
                flag(false);
                if announced {
                    info!(projection, "Resumed; going on from the stored offsets.");
                    return Pause::Resumed;
                }
                return Pause::Over;
            }
            // Unknown: neither start consuming nor end a pause.
            Err(e) => debug!(projection, error = %e, "Cannot read the pointer to know whether paused; retrying."),
        }
        tokio::select! {
            () = cancel.cancelled() => return Pause::Shutdown,
            () = tokio::time::sleep(POINTER_POLL) => {}
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
