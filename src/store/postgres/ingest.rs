//! Group commit for the notification listener: Apple's senders arrive
//! concurrently, and one transaction (one WAL flush) for each would bound
//! ingest by the disk's flush rate.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;

use super::tx::PgTx;
use super::{CONFLICT_RETRIES, is_conflict};
use crate::domain::lifecycle::now_ms;
use crate::store::{Recorded, StoreError};

type R<T> = Result<T, StoreError>;

/// Notifications recorded per transaction at most.
const INGEST_GROUP: usize = 512;

/// A notification waiting for the next group commit, and who to tell.
pub(super) struct PendingNotification {
    id: String,
    envelope: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<Recorded, String>>,
}

/// Group commit for the notification listener: Apple's senders arrive
/// concurrently, and one transaction (one WAL flush) for each would bound
/// ingest by the disk's flush rate. Whoever takes `commit` records
/// everything queued so far in one transaction; the others wait for their
/// answer. sled's backend does the same with its flush thread.
pub(super) struct Ingest {
    pub(super) pool: Pool,
    pub(super) queue: Mutex<Vec<PendingNotification>>,
    pub(super) commit: Arc<tokio::sync::Mutex<()>>,
}

impl Ingest {
    pub(super) async fn record(
        self: &Arc<Self>,
        id: &str,
        envelope: &[u8],
    ) -> Result<Recorded, StoreError> {
        let (done, mut answer) = tokio::sync::oneshot::channel();
        self.lock_queue().push(PendingNotification {
            id: id.to_string(),
            envelope: envelope.to_vec(),
            done,
        });
        let settle = |r: Result<Result<Recorded, String>, _>| match r {
            Ok(Ok(recorded)) => Ok(recorded),
            Ok(Err(e)) => Err(StoreError::Backend(e.into())),
            Err(tokio::sync::oneshot::error::RecvError { .. }) => Err(StoreError::Backend(
                "the notification's commit was abandoned".into(),
            )),
        };
        loop {
            tokio::select! {
                biased;
                r = &mut answer => return settle(r),
                guard = self.commit.clone().lock_owned() => {
                    let group: Vec<PendingNotification> = {
                        let mut queue = self.lock_queue();
                        let n = queue.len().min(INGEST_GROUP);
                        queue.drain(..n).collect()
                    };
                    if group.is_empty() {
                        // An earlier group took ours; its answer is on the way.
                        drop(guard);
                        return settle(answer.await);
                    }
                    // Its own task, so that a sender hanging up on its
                    // leader does not abandon the others' commit.
                    let this = self.clone();
                    let _ = tokio::spawn(async move {
                        let result = this.commit_group(&group).await;
                        for (p, r) in group.into_iter().zip(result) {
                            let _ = p.done.send(r);
                        }
                        drop(guard);
                    })
                    .await;
                }
            }
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<PendingNotification>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One transaction for the group: the ids not seen before claim their
    /// place in the inbox, in arrival order; a repeat (also within the
    /// group) is a duplicate. Answers in the group's order.
    async fn commit_group(&self, group: &[PendingNotification]) -> Vec<Result<Recorded, String>> {
        let ids: Vec<&str> = group.iter().map(|p| p.id.as_str()).collect();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self.try_group(&ids, group).await {
                Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => break other,
            }
        };
        match result {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            // A failed commit leaves nothing: every sender's retry is
            // recorded anew.
            Err(e) => group.iter().map(|_| Err(e.to_string())).collect(),
        }
    }

    async fn try_group(&self, ids: &[&str], group: &[PendingNotification]) -> R<Vec<Recorded>> {
        let t = PgTx::begin(&self.pool).await?;
        let sql = "INSERT INTO seen (notification_id, at_ms)
                   SELECT id, $2 FROM unnest($1::text[]) AS u(id)
                   ON CONFLICT (notification_id) DO NOTHING
                   RETURNING notification_id";
        let rows = t.rows(sql, &[&ids, &(now_ms() as i64)]).await?;
        let mut fresh: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let answers: Vec<Recorded> = group
            .iter()
            .map(|p| {
                if fresh.remove(&p.id) {
                    Recorded::New
                } else {
                    Recorded::Duplicate
                }
            })
            .collect();
        let envelopes: Vec<&[u8]> = group
            .iter()
            .zip(&answers)
            .filter(|(_, a)| matches!(a, Recorded::New))
            .map(|(p, _)| p.envelope.as_slice())
            .collect();
        if !envelopes.is_empty() {
            let sql = "INSERT INTO inbox (envelope)
                       SELECT e FROM unnest($1::bytea[]) WITH ORDINALITY AS u(e, n) ORDER BY n";
            t.exec(sql, &[&envelopes]).await?;
        }
        t.commit().await?;
        Ok(answers)
    }
}
