//! Users accepting their invitations over time: the rate mode of
//! [`InvitationAcceptance`]. One task per token; it sleeps while nobody
//! waits, so an idle simulator costs nothing.
//!
//! The `all` mode needs no task: the event task accepts right after a
//! CREATE's notifications are out ([`Org::invitations_sent`]), and switching
//! the mode to `all` accepts whoever waits at that moment.

use std::sync::Arc;
use std::time::Duration;

use super::state::Org;
use super::{InvitationAcceptance, Shared};

/// Acceptances are batched per tick; a tick is never shorter than this, so
/// a high rate sends one USER_ASSOCIATED for several users, as a busy
/// morning of real acceptances could.
const MIN_TICK: Duration = Duration::from_millis(50);

pub(crate) async fn accept_over_time(shared: Arc<Shared>, org: Arc<Org>) {
    let mut settings = shared.invitations.subscribe();
    // Acceptances owed but not yet made (the fraction carries over ticks).
    let mut credit = 0.0f64;
    loop {
        let mode = *settings.borrow_and_update();
        let per_second = match mode {
            InvitationAcceptance::Rate { per_second } if per_second > 0.0 => per_second,
            _ => {
                credit = 0.0;
                if settings.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !org.has_waiting_invitations() {
            // Nobody waits: no burst of saved-up acceptances later.
            credit = 0.0;
            tokio::select! {
                changed = settings.changed() => if changed.is_err() { return },
                _ = org.invitations_waiting.notified() => {}
            }
            continue;
        }
        let tick = Duration::from_secs_f64(1.0 / per_second).max(MIN_TICK);
        tokio::select! {
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep(tick) => {}
        }
        credit += per_second * tick.as_secs_f64();
        let due = credit.floor();
        credit -= due;
        if due >= 1.0 {
            org.accept_waiting(&shared, due as usize);
        }
    }
}
