//! Resubmitting an event Apple left PENDING past `tracking.resubmit_after`,
//! as Apple advises. The tracker only decides that one is due
//! ([`crate::runtime::context::Resubmissions`]); the submitter sends it, so that it
//! leaves in the token's order, one request at a time with the token's
//! batches, and within `max_events_in_flight`.
//!
//! Only the batch's undecided pairs are sent (for a revoke, its targets not
//! yet done), never a pair already decided. The new eventIds join the
//! batch, so late reports of the old event still count (each pair once).

use crate::apple::requests::{exact_requests_for, revoke_request_for};
use crate::domain::job::Phase;
use crate::domain::lifecycle::{BatchRecord, BatchState};
use crate::runtime::context::Resubmission;
use crate::store::EventId;

use super::{StepError, Submitter};

/// Whether a resubmission may leave while `unfinished` of the token's
/// events are unfinished at Apple, its own batch among them. The batch
/// keeps its one place in the count (the new event takes the place of the
/// one Apple left PENDING), so it leaves while the others are fewer than
/// `max_events_in_flight`, as a new batch would.
pub(super) fn fits(unfinished: usize, max_events_in_flight: usize) -> bool {
    unfinished.saturating_sub(1) < max_events_in_flight
}

/// Whether a resubmission asked for `old_event` of `batch` is still to be
/// made: the batch is sent, its event unfinished, it has undecided pairs,
/// and `old_event` is still its last event (a resubmission made since
/// answers the request).
pub(super) fn still_due(batch: &BatchRecord, old_event: &EventId) -> bool {
    batch.state() == BatchState::Sent
        && batch.terminal_ms().is_none()
        && batch.undecided() > 0
        && batch.events().last() == Some(old_event)
}

impl Submitter {
    /// The oldest resubmission asked for of this token that may leave now,
    /// given its unfinished batches; requests that are moot are dropped.
    /// The second value: a request waits for a slot.
    pub(super) fn due_resubmission(
        &self,
        unfinished: &[&BatchRecord],
    ) -> (Option<Resubmission>, bool) {
        let waiting = self.ctx.resubmissions.waiting(&self.token);
        let mut blocked = false;
        for r in waiting {
            let batch = unfinished
                .iter()
                .find(|b| *b.job_id() == r.job_id && b.no() == r.batch);
            match batch {
                Some(b) if still_due(b, &r.old_event) => {
                    if fits(unfinished.len(), self.ctx.max_events_in_flight) {
                        return (Some(r), false);
                    }
                    blocked = true;
                }
                _ => self.ctx.resubmissions.take(&self.token, &r),
            }
        }
        (None, blocked)
    }

    /// Resubmits the undecided pairs of the batch `r` names, if that is
    /// still due. Apple not taking it is logged: the tracker finds the
    /// event PENDING again and asks again.
    pub(super) async fn resubmit(&mut self, r: Resubmission) -> Result<(), StepError> {
        self.ctx.resubmissions.take(&self.token, &r);
        let store = self.ctx.store.clone();
        let (Some(spec), Some(batch)) = (
            store.spec(&r.job_id).await?,
            store.batch(&r.job_id, r.batch).await?,
        ) else {
            return Ok(());
        };
        if !still_due(&batch, &r.old_event) {
            return Ok(());
        }
        if !self.entry.is_ready() {
            return Err(StepError::TokenNotReady);
        }
        let events = match self.send_again(&spec, &batch).await {
            Ok(events) => events,
            Err(StepError::Apple(error)) => {
                tracing::warn!(job = %r.job_id, batch = r.batch, old_event = %r.old_event, %error, "cannot resubmit an event still PENDING; will retry");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for event_id in &events {
            store.batch_sent(&r.job_id, r.batch, event_id).await?;
            self.ctx.sent.sent(event_id, &r.job_id, r.batch);
        }
        self.ctx
            .metrics
            .events_resubmitted
            .with_label_values(&[&self.token])
            .inc();
        tracing::warn!(job = %r.job_id, batch = r.batch, old_event = %r.old_event, new_events = ?events, undecided = batch.undecided(), "event still PENDING after tracking.resubmit_after; resubmitted its undecided pairs");
        self.ctx.wake_tracker(&self.token);
        Ok(())
    }

    /// Sends the batch's undecided pairs in the fewest exact requests; the
    /// eventIds Apple answered, once it took them all.
    async fn send_again(
        &self,
        spec: &crate::domain::job::JobSpec,
        batch: &BatchRecord,
    ) -> Result<Vec<EventId>, StepError> {
        let mut events = Vec::new();
        match batch.phase() {
            Phase::Revoke => {
                let request = revoke_request_for(spec, batch);
                events.push(self.client.revoke(&request).await?.event_id);
            }
            phase => {
                for request in exact_requests_for(spec, batch) {
                    let event = match phase {
                        Phase::Associate => self.client.associate(&request).await?,
                        _ => self.client.disassociate(&request).await?,
                    };
                    events.push(event.event_id);
                }
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::fits;
    use crate::apple::Client;
    use crate::apple::client::ClientOptions;
    use crate::apple::token::SToken;
    use crate::apple::types::ManageAssetsRequest;
    use crate::domain::lifecycle::tests::{SHAPE, spec};
    use crate::domain::lifecycle::{Decision, JobChange, JobRecord, now_ms};
    use crate::runtime::context::{Context, Resubmission};
    use crate::runtime::metrics::Metrics;
    use crate::runtime::tokens::Source;
    use crate::sim::{HoldSettings, SimAsset, SimConfig, SimToken, Simulator};
    use crate::store::sled::SledStore;
    use crate::store::{Decide, JobId, Store};

    proptest! {
        /// A resubmission never takes the token past its limit: with it,
        /// the events unfinished at Apple (its own batch counted once) are
        /// at most `max`; and a batch alone always gets its slot back.
        #[test]
        fn a_resubmission_stays_within_the_limit(unfinished in 1usize..64, max in 1usize..16) {
            prop_assert_eq!(fits(unfinished, max), unfinished <= max);
            prop_assert!(fits(1, max));
        }
    }

    fn associate_posts(sim: &Simulator) -> Vec<serde_json::Value> {
        sim.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/assets/associate")
            .filter_map(|r| r.body)
            .collect()
    }

    /// Two batches sent and held PENDING against a limit of one event in
    /// flight (as after a restart with a lower limit), both asked to be
    /// resubmitted: nothing leaves while the other is unfinished at Apple;
    /// once one is decided, the other is resubmitted, once, as the
    /// submitter's own event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resubmission_waits_for_a_slot_like_any_event() {
        let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0")
            .await
            .unwrap();
        let expires = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let raw = SToken::encode("resubmit-slot", expires, "School");
        sim.add_token(SimToken {
            stoken: raw.clone(),
            assets: vec![SimAsset::app("1000", Some(10))],
            read_only: false,
        })
        .unwrap();
        sim.set_hold(HoldSettings {
            all: false,
            next: 2,
            after_tasks: 0,
        });
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let config = crate::runtime::config::Config::parse(
            crate::runtime::config::tests::EXAMPLE,
            Path::new("vppd.toml"),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let mut ctx = Context::new(
            store.clone(),
            metrics.clone(),
            config.tracking.clone(),
            config.install.clone(),
            rx,
        );
        ctx.max_events_in_flight = 1;
        let ctx = Arc::new(ctx);
        let opts = ClientOptions::new(&sim.base_url(), "main", 50, Duration::from_secs(10));
        let client = Client::new(opts, SToken::parse(&raw).unwrap(), metrics.clone()).unwrap();
        let entry = ctx
            .tokens
            .insert("main", Source::Config, client.clone(), None, false)
            .unwrap();
        ctx.tokens.set_ready(&entry);
        let mut asked = Vec::new();
        for (job, serial) in [("a", "A"), ("b", "B")] {
            let job = &JobId::from(job);
            let mut spec = spec(1, 1, false);
            spec.id = job.clone();
            spec.associate.serial_numbers = vec![serial.into()];
            let spec = Arc::new(spec);
            store
                .create_job(&spec, JobRecord::new(&spec, "h".into(), SHAPE, now_ms()))
                .await
                .unwrap();
            store.update_job(job, JobChange::Start).await.unwrap();
            let batch = store.start_batch(job, SHAPE).await.unwrap().unwrap();
            let request: ManageAssetsRequest = crate::apple::requests::request_for(&spec, &batch);
            let event = client.associate(&request).await.unwrap().event_id;
            assert!(store.batch_sent(job, batch.no(), &event).await.unwrap());
            asked.push(Resubmission {
                job_id: job.clone(),
                batch: batch.no(),
                old_event: event,
            });
        }
        // The simulator takes up an event after answering it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sim.held_events().len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sim.held_events().len(), 2);
        for r in &asked {
            ctx.resubmit("main", r.clone());
        }
        let submitter = tokio::spawn(super::super::run(ctx.clone(), entry.clone()));
        let resubmitted = || {
            metrics
                .events_resubmitted
                .with_label_values(&["main"])
                .get()
        };

        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            associate_posts(&sim).len(),
            2,
            "nothing left over the limit"
        );
        assert_eq!(resubmitted(), 0);
        assert_eq!(ctx.resubmissions.waiting("main"), asked, "both still wait");

        // Job a's event is over: its batch is decided, its slot free.
        let applied = store
            .decide(Decide {
                job_id: "a".into(),
                batch: asked[0].batch,
                decisions: vec![(0, Decision::Confirmed { event_id: None })],
                finished: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(applied.batch_decided);
        ctx.wake_submitter("main");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while resubmitted() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(resubmitted(), 1);
        let posts = associate_posts(&sim);
        assert_eq!(posts.len(), 3, "{posts:?}");
        assert_eq!(posts[2]["serialNumbers"], serde_json::json!(["B"]));
        let b = store
            .batch(&"b".into(), asked[1].batch)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.events().len(), 2, "the new event joins the batch");
        assert_eq!(b.events()[0], asked[1].old_event);
        assert!(ctx.resubmissions.waiting("main").is_empty());
        // Asked again for the event it replaced: moot, nothing leaves.
        ctx.resubmit("main", asked[1].clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(associate_posts(&sim).len(), 3);
        assert!(ctx.resubmissions.waiting("main").is_empty());

        shutdown.send(true).unwrap();
        submitter.await.unwrap();
        sim.release_held(None);
        sim.shutdown().await;
    }
}
