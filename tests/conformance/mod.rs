//! What every [`Store`] backend must do, as one suite a backend's tests run
//! with a way to open its stores, one test per check:
//!
//! ```ignore
//! #[macro_use]
//! mod conformance;
//! conformance_suite!(stores); // one test per check
//! ```
//!
//! `open(name)` opens the store called `name`: a name not used before is an
//! empty store, and opening a name again after every handle of it was
//! dropped must find what was committed (durability across a restart).
//! Every check uses its own names, so backends may share one database.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use vppd::domain::job::{JobAsset, JobSpec, JobState, Phase, Targets};
use vppd::domain::lifecycle::{BatchState, Decision, FailureRecord, JobChange, JobRecord};
use vppd::domain::plan::Shape;
use vppd::store::{
    Created, Decide, EventId, Fold, InboxId, LicenseDelta, LicenseRecord, OutboxAck, OutboxItem,
    Recorded, Store, TokenRecord, UserRecord,
};

/// Expands one `#[tokio::test]` per check, so that a failure names its
/// check. `$stores(check)` gives the check its way to open stores (`None`:
/// the backend is not there, and the check is skipped):
///
/// ```ignore
/// #[macro_use]
/// mod conformance;
/// fn stores(check: &str) -> Option<impl Fn(String) -> F> { ... }
/// conformance_suite!(stores);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($stores:ident) => {
        conformance_suite!(@checks $stores:
            jobs_are_created_once_in_order,
            job_changes_follow_the_state_machine,
            batches_go_from_sending_to_sent_and_events_find_them,
            a_refused_batch_returns_to_the_plan,
            a_canceled_jobs_sending_batch_is_withdrawn,
            pairs_are_decided_once_and_confirmations_fill_the_outbox,
            one_fold_commits_many_notifications,
            outbox_commands_are_acknowledged_by_identity,
            acknowledgements_beside_folds_count_once,
            notifications_are_recorded_once_in_order,
            notifications_for_unknown_events_park_until_recorded_or_expired,
            meta_licenses_and_users_round_trip,
            tokens_are_put_replaced_listed_and_deleted,
            concurrent_commits_lose_nothing,
            everything_survives_a_reopen,
            leases_go_to_one_holder_at_a_time,
            the_first_value_stored_is_kept,
            user_installs_are_held_until_their_user_is_settled,
            finished_jobs_are_pruned_with_all_that_is_theirs,
            the_watermark_never_goes_down,
            a_reconciliation_keeps_what_it_checked_across_a_reopen,
            drift_changes_are_atomic_and_durable,
        );
    };
    (@checks $stores:ident: $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                if let Some(open) = $stores(stringify!($check)) {
                    conformance::$check(&open).await;
                }
            }
        )*
    };
}

/// The record of a job that has not started, as the job API makes it
/// (its spec hash: SHA-256 of the spec's JSON).
pub fn new_record(spec: &JobSpec, shape: Shape) -> JobRecord {
    use sha2::Digest;
    let bytes = serde_json::to_vec(spec).unwrap();
    let hash = hex::encode(sha2::Sha256::digest(bytes));
    JobRecord::new(spec, hash, shape, vppd::domain::lifecycle::now_ms())
}

/// What a reconciliation of a `Sending` batch learned survives a crash
/// (here: a reopen): the pairs it asked Apple about and those it confirmed,
/// in one commit; its end forgets the checked set, and a batch Apple took
/// has none.
pub async fn a_reconciliation_keeps_what_it_checked_across_a_reopen<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("reconcile".into()).await;
    let spec = spec("r", 2, 3);
    create(store.as_ref(), &spec).await;
    store
        .update_job(&"r".into(), JobChange::Start)
        .await
        .unwrap();
    let batch = store
        .start_batch(&"r".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    let no = batch.no();
    assert_eq!(batch.to_check().count(), 6);
    assert!(!batch.reconciling());
    // One read asked about pairs 0..3 and found 0 and 2 assigned.
    let applied = store
        .decide(Decide {
            job_id: "r".into(),
            batch: no,
            decisions: [0, 2]
                .map(|p| (p, Decision::Confirmed { event_id: None }))
                .to_vec(),
            checked: vec![0, 1, 2],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(applied.confirmed, 2);
    drop(store);
    let store = open("reconcile".into()).await;
    let batch = store.batch(&"r".into(), no).await.unwrap().unwrap();
    assert_eq!(batch.state(), BatchState::Sending);
    assert!(batch.reconciling(), "the checked set survives a reopen");
    assert_eq!(batch.to_check().collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(
        batch.undecided_pairs().collect::<Vec<_>>(),
        vec![1, 3, 4, 5]
    );
    assert_eq!(
        store
            .job(&"r".into())
            .await
            .unwrap()
            .unwrap()
            .tally(Phase::Associate)
            .confirmed(),
        2
    );
    store
        .decide(Decide {
            job_id: "r".into(),
            batch: no,
            checked: vec![3, 4, 5],
            reconciled: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = store.batch(&"r".into(), no).await.unwrap().unwrap();
    assert!(
        !batch.reconciling(),
        "the end of a reconciliation forgets it"
    );
    assert_eq!(batch.to_check().collect::<Vec<_>>(), vec![1, 3, 4, 5]);
    // Apple took the batch: nothing is "checked" about a sent batch.
    assert!(
        store
            .batch_sent(&"r".into(), no, &"r-e".into())
            .await
            .unwrap()
    );
    store
        .decide(Decide {
            job_id: "r".into(),
            batch: no,
            checked: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        !store
            .batch(&"r".into(), no)
            .await
            .unwrap()
            .unwrap()
            .reconciling()
    );
}

pub async fn the_watermark_never_goes_down<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("watermark".into()).await;
    let empty = store.watermark().await.unwrap();
    assert_eq!((empty.jobs, empty.finished), (0, 0));
    create(store.as_ref(), &spec("w1", 1, 1)).await;
    create(store.as_ref(), &spec("w2", 1, 1)).await;
    store
        .update_job(&"w2".into(), JobChange::Cancel)
        .await
        .unwrap();
    let two = store.watermark().await.unwrap();
    assert_eq!((two.jobs, two.finished), (2, 1));
    assert!(two.generation >= empty.generation);
    drop(store);
    let store = open("watermark".into()).await;
    let again = store.watermark().await.unwrap();
    assert_eq!((again.jobs, again.finished), (2, 1));
    assert!(
        again.generation >= two.generation,
        "generation went back after a reopen"
    );
}

const SHAPE: Shape = Shape {
    max_assets: 2,
    max_serials: 3,
    max_users: 3,
    max_revoke_serials: 3,
    max_revoke_users: 3,
};

/// `assets` x `serials`: with [`SHAPE`], batches of up to 2 x 3 pairs.
fn spec(id: &str, assets: usize, serials: usize) -> JobSpec {
    JobSpec {
        id: id.into(),
        token: "main".into(),
        assets: (0..assets)
            .map(|i| JobAsset {
                adam_id: (1000 + i).to_string(),
                pricing_param: "STDQ".into(),
            })
            .collect(),
        disassociate: Targets::default(),
        associate: Targets {
            serial_numbers: (0..serials).map(|i| format!("{id}-S{i}")).collect(),
            client_user_ids: Vec::new(),
        },
        install: true,
        allow_partial: false,
        revoke: Default::default(),
        uninstall: false,
        wait_for_licenses: false,
        users: Vec::new(),
        retire_users: Vec::new(),
        priority: Default::default(),
    }
}

async fn create(store: &dyn Store, spec: &JobSpec) {
    let spec = Arc::new(spec.clone());
    let created = store
        .create_job(&spec, new_record(&spec, SHAPE))
        .await
        .unwrap();
    assert!(matches!(created, Created::New(_)), "{created:?}");
    // The store hands out the spec it was given, not a copy of its own.
    let stored = store.spec(&spec.id).await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&stored, &spec));
}

/// A running job with its first batch sent as event `{id}-e0`.
async fn running_with_batch(store: &dyn Store, spec: &JobSpec) -> u32 {
    create(store, spec).await;
    store.update_job(&spec.id, JobChange::Start).await.unwrap();
    let batch = store.start_batch(&spec.id, SHAPE).await.unwrap().unwrap();
    let event = EventId::from(format!("{}-e{}", spec.id, batch.no()));
    assert!(
        store
            .batch_sent(&spec.id, batch.no(), &event)
            .await
            .unwrap()
    );
    batch.no()
}

fn confirm(pairs: impl IntoIterator<Item = u32>, event: &str) -> Vec<(u32, Decision)> {
    pairs
        .into_iter()
        .map(|p| {
            (
                p,
                Decision::Confirmed {
                    event_id: Some(event.into()),
                },
            )
        })
        .collect()
}

fn fail(pair: u32, number: i32) -> (u32, Decision) {
    (
        pair,
        Decision::Failed(FailureRecord {
            error_number: number,
            error_message: format!("error {number}"),
            event_id: None,
        }),
    )
}

fn decide(job: &str, batch: u32, decisions: Vec<(u32, Decision)>) -> Decide {
    Decide {
        job_id: job.into(),
        batch,
        decisions,
        activity: true,
        finished: false,
        revoked: Vec::new(),
        ..Default::default()
    }
}

pub async fn jobs_are_created_once_in_order<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("jobs".into()).await;
    for id in ["c", "a", "b"] {
        create(store.as_ref(), &spec(id, 1, 1)).await;
    }
    let again = Arc::new(spec("a", 1, 1));
    let existing = store
        .create_job(&again, new_record(&again, SHAPE))
        .await
        .unwrap();
    assert!(matches!(existing, Created::Existing(j) if j.id() == "a"));
    let other = Arc::new(spec("a", 2, 1));
    let conflict = store
        .create_job(&other, new_record(&other, SHAPE))
        .await
        .unwrap();
    assert_eq!(conflict, Created::Conflict);
    let ids: Vec<String> = store
        .jobs()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id().to_string())
        .collect();
    assert_eq!(ids, ["c", "a", "b"], "jobs in creation order");
    assert_eq!(
        store.spec(&"a".into()).await.unwrap().as_deref(),
        Some(&*again),
        "the first spec is kept"
    );
    assert!(store.job(&"nope".into()).await.unwrap().is_none());
    assert!(store.spec(&"nope".into()).await.unwrap().is_none());

    // A token's jobs: only its own, in creation order, as they are now.
    let elsewhere = JobSpec {
        token: "elsewhere".into(),
        ..spec("d", 1, 1)
    };
    create(store.as_ref(), &elsewhere).await;
    let ids_of = async |token: &str| -> Vec<(String, JobState)> {
        store
            .jobs_of(token)
            .await
            .unwrap()
            .iter()
            .map(|j| (j.id().to_string(), j.state()))
            .collect()
    };
    let accepted = |ids: &[&str]| -> Vec<(String, JobState)> {
        ids.iter()
            .map(|i| (i.to_string(), JobState::Accepted))
            .collect()
    };
    assert_eq!(ids_of("main").await, accepted(&["c", "a", "b"]));
    assert_eq!(ids_of("elsewhere").await, accepted(&["d"]));
    assert!(ids_of("nobody").await.is_empty());
    store
        .update_job(&"a".into(), JobChange::Start)
        .await
        .unwrap();
    assert_eq!(
        ids_of("main").await[1],
        ("a".to_string(), JobState::Running),
        "a job changed since the last read is read as it is now"
    );
    assert_eq!(store.jobs().await.unwrap().len(), 4);
}

pub async fn job_changes_follow_the_state_machine<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("changes".into()).await;
    create(store.as_ref(), &spec("j", 1, 1)).await;
    let job = store
        .update_job(&"j".into(), JobChange::Start)
        .await
        .unwrap();
    assert_eq!(job.map(|j| j.state()), Some(JobState::Running));
    let job = store
        .update_job(&"j".into(), JobChange::PreflightPassed)
        .await
        .unwrap()
        .unwrap();
    assert!(job.preflight_done());
    let job = store
        .update_job(&"j".into(), JobChange::Fail("short".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (job.state(), job.error()),
        (JobState::Failed, Some("short"))
    );
    let job = store
        .update_job(&"j".into(), JobChange::Cancel)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state(), JobState::Failed, "a final job stays final");
    assert_eq!(
        store.job(&"j".into()).await.unwrap().map(|j| j.state()),
        Some(JobState::Failed)
    );
    assert!(
        store
            .update_job(&"nope".into(), JobChange::Start)
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn batches_go_from_sending_to_sent_and_events_find_them<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("batches".into()).await;
    // 2 assets x 6 serials: two batches of 2 x 3.
    create(store.as_ref(), &spec("j", 2, 6)).await;
    store
        .update_job(&"j".into(), JobChange::Start)
        .await
        .unwrap();
    let b0 = store
        .start_batch(&"j".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (b0.no(), b0.state(), b0.pairs()),
        (0, BatchState::Sending, 6)
    );
    assert!(
        store
            .start_batch(&"j".into(), SHAPE)
            .await
            .unwrap()
            .is_none(),
        "one batch sending at a time"
    );
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!((job.sending(), job.open_batches()), (Some(0), 1));
    assert_eq!(store.open_batches("main").await.unwrap().len(), 1);
    assert!(store.open_batches("other").await.unwrap().is_empty());

    assert!(
        store
            .batch_sent(&"j".into(), 0, &"ev-0".into())
            .await
            .unwrap()
    );
    let b0 = store.batch(&"j".into(), 0).await.unwrap().unwrap();
    assert_eq!(b0.state(), BatchState::Sent);
    assert_eq!(b0.events(), ["ev-0"]);
    let event = store.event(&"ev-0".into()).await.unwrap().unwrap();
    assert_eq!((event.job_id.as_str(), event.batch), ("j", 0));
    assert!(store.event(&"ev-x".into()).await.unwrap().is_none());
    assert!(
        !store
            .batch_sent(&"nope".into(), 0, &"ev-y".into())
            .await
            .unwrap()
    );
    assert!(
        store.event(&"ev-y".into()).await.unwrap().is_none(),
        "no event without its batch"
    );

    store.schedule_poll(&"j".into(), 0, 12345).await.unwrap();
    assert_eq!(
        store
            .batch(&"j".into(), 0)
            .await
            .unwrap()
            .unwrap()
            .next_poll_ms(),
        12345
    );
    let b1 = store
        .start_batch(&"j".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b1.no(), 1);
    let all = store.batches_of(&"j".into()).await.unwrap();
    assert_eq!(all.iter().map(|b| b.no()).collect::<Vec<_>>(), [0, 1]);
    assert!(
        store
            .start_batch(&"j".into(), SHAPE)
            .await
            .unwrap()
            .is_none()
    );
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert!(job.plan_done());
    assert_eq!((job.requests().submitted, job.open_batches()), (1, 2));
}

pub async fn a_refused_batch_returns_to_the_plan<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("refused".into()).await;
    create(store.as_ref(), &spec("j", 2, 3)).await;
    store
        .start_batch(&"j".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    let tighter = Shape {
        max_serials: 1,
        ..SHAPE
    };
    assert!(store.return_batch(&"j".into(), 0, tighter).await.unwrap());
    assert!(
        store.batch(&"j".into(), 0).await.unwrap().is_none(),
        "record deleted"
    );
    assert!(store.open_batches("main").await.unwrap().is_empty());
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!((job.sending(), job.open_batches()), (None, 0));
    assert_eq!(job.requests().planned, 3);
    let again = store
        .start_batch(&"j".into(), tighter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.no(), again.pairs()), (0, 2));
    assert!(
        store
            .batch_sent(&"j".into(), 0, &"ev".into())
            .await
            .unwrap()
    );
    assert!(
        !store.return_batch(&"j".into(), 0, tighter).await.unwrap(),
        "a batch Apple took never returns to the plan"
    );
}

pub async fn a_canceled_jobs_sending_batch_is_withdrawn<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("withdrawn".into()).await;
    create(store.as_ref(), &spec("j", 2, 6)).await;
    store
        .update_job(&"j".into(), JobChange::Start)
        .await
        .unwrap();
    store
        .start_batch(&"j".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !store.withdraw_batch(&"j".into(), 0).await.unwrap(),
        "a running job's batch is not withdrawn"
    );
    let job = store
        .update_job(&"j".into(), JobChange::Cancel)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state(), JobState::Canceled);
    assert!(
        job.wants_submitter(),
        "its sending batch is still to reconcile"
    );
    // Reconciled: Apple holds two of its pairs.
    let applied = store
        .decide(decide("j", 0, confirm([0, 4], "")))
        .await
        .unwrap();
    assert_eq!(applied.outboxed, 2);
    assert!(store.withdraw_batch(&"j".into(), 0).await.unwrap());
    let batch = store.batch(&"j".into(), 0).await.unwrap().unwrap();
    assert_eq!(batch.state(), BatchState::Withdrawn);
    assert!(store.open_batches("main").await.unwrap().is_empty());
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!((job.sending(), job.open_batches()), (None, 0));
    assert!(!job.wants_submitter());
    assert!(
        !store
            .batch_sent(&"j".into(), 0, &"late".into())
            .await
            .unwrap(),
        "a withdrawn batch is never sent"
    );
    assert!(
        store
            .start_batch(&"j".into(), SHAPE)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.outbox(100).await.unwrap().len(),
        1,
        "its installs stay"
    );
}

pub async fn pairs_are_decided_once_and_confirmations_fill_the_outbox<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("decide".into()).await;
    let no = running_with_batch(store.as_ref(), &spec("j", 2, 3)).await;
    let first = store
        .decide(decide(
            "j",
            no,
            [confirm([0, 1], "e"), vec![fail(2, 9709)]].concat(),
        ))
        .await
        .unwrap();
    assert_eq!((first.confirmed, first.failed, first.outboxed), (2, 1, 2));
    let again = store
        .decide(decide(
            "j",
            no,
            [confirm([2, 0], "e"), vec![fail(1, 9603), fail(3, 9610)]].concat(),
        ))
        .await
        .unwrap();
    assert_eq!(
        (again.confirmed, again.failed, again.outboxed),
        (0, 1, 0),
        "decided pairs keep their first decision"
    );
    let (failures, more) = store.failures(&"j".into(), 10).await.unwrap();
    assert!(!more);
    assert_eq!(
        failures
            .iter()
            .map(|f| (f.pair, f.record.error_number))
            .collect::<Vec<_>>(),
        [(2, 9709), (3, 9610)]
    );
    let (one, more) = store.failures(&"j".into(), 1).await.unwrap();
    assert_eq!((one.len(), more), (1, true));
    let outbox = store.outbox(100).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].entry.pairs, [0, 1]);
    assert_eq!(outbox[0].entry.event_id, Some("e".into()));

    let last = store
        .decide(Decide {
            finished: true,
            ..decide("j", no, confirm([4, 5], "e"))
        })
        .await
        .unwrap();
    assert!(last.batch_decided);
    let batch = store.batch(&"j".into(), no).await.unwrap().unwrap();
    assert_eq!(batch.state(), BatchState::Decided);
    assert!(batch.terminal_ms().is_some());
    assert!(store.open_batches("main").await.unwrap().is_empty());
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!(job.tally(Phase::Associate).confirmed(), 4);
    assert_eq!(job.tally(Phase::Associate).failed(), 2);
    assert_eq!(job.installs().pending, 4);
    assert_eq!(job.state(), JobState::Running, "installs still to release");
    assert_eq!(
        store
            .decide(decide("nope", 0, confirm([0], "e")))
            .await
            .unwrap(),
        Default::default()
    );
}

pub async fn one_fold_commits_many_notifications<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("fold".into()).await;
    let a = running_with_batch(store.as_ref(), &spec("a", 1, 3)).await;
    let b = running_with_batch(store.as_ref(), &spec("b", 1, 3)).await;
    for n in 0..3 {
        store
            .record_notification(&format!("n{n}"), b"{}")
            .await
            .unwrap();
    }
    let inbox = store.inbox(10).await.unwrap();
    let applied = store
        .fold(Fold {
            decide: vec![
                decide("a", a, confirm([0], "e")),
                decide("b", b, confirm([0, 1, 2], "e")),
                decide("a", a, confirm([0, 1], "e")),
                decide("gone", 0, confirm([0], "e")),
            ],
            license_deltas: vec![LicenseDelta {
                token: "main".into(),
                adam_id: "1000".into(),
                pricing_param: "STDQ".into(),
                delta: 5,
                notification_id: "count-1".into(),
            }],
            users: vec![(
                "main".into(),
                UserRecord {
                    client_user_id: "u1".into(),
                    status: Some("Registered".into()),
                    ..Default::default()
                },
            )],
            consumed: inbox[..2].iter().map(|i| i.id).collect(),
        })
        .await
        .unwrap();
    assert_eq!(
        applied.iter().map(|a| a.confirmed).collect::<Vec<_>>(),
        [1, 3, 1, 0],
        "in order, each pair once"
    );
    assert!(applied[1].batch_decided);
    assert_eq!(store.inbox_len().await.unwrap(), 1);
    assert_eq!(store.inbox(10).await.unwrap()[0].id, inbox[2].id);
    let job = store.job(&"a".into()).await.unwrap().unwrap();
    assert_eq!(job.tally(Phase::Associate).confirmed(), 2);
    let license = store
        .license("main", "1000", "STDQ")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((license.available_count, license.total_count), (5, 5));
    // The same count notification folded again changes nothing again.
    store
        .fold(Fold {
            license_deltas: vec![LicenseDelta {
                token: "main".into(),
                adam_id: "1000".into(),
                pricing_param: "STDQ".into(),
                delta: 5,
                notification_id: "count-1".into(),
            }],
            ..Fold::default()
        })
        .await
        .unwrap();
    let license = store
        .license("main", "1000", "STDQ")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((license.available_count, license.total_count), (5, 5));
    let user = store.user("main", "u1").await.unwrap().unwrap();
    assert_eq!(user.status.as_deref(), Some("Registered"));
}

pub async fn outbox_commands_are_acknowledged_by_identity<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("outbox".into()).await;
    let no = running_with_batch(store.as_ref(), &spec("j", 2, 3)).await;
    store
        .decide(decide("j", no, confirm([0, 1, 2], "e1")))
        .await
        .unwrap();
    store
        .decide(decide("j", no, confirm([3, 4, 5], "e2")))
        .await
        .unwrap();
    let items = store.outbox(2).await.unwrap();
    assert_eq!(items.len(), 1, "entries until the commands asked for");
    let items = store.outbox(100).await.unwrap();
    assert_eq!(items.len(), 2);
    assert!(items[0].id < items[1].id, "oldest first");
    let (first, second) = (items[0].id, items[1].id);

    // Two releasers read the same entry and acknowledge overlapping commands.
    let one = store
        .ack_outbox(&[OutboxAck {
            entry: first,
            pairs: vec![2, 0],
        }])
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].job_id.as_str(), one[0].commands), ("j", 2));
    let two = store
        .ack_outbox(&[
            OutboxAck {
                entry: first,
                pairs: vec![0, 1, 2],
            },
            OutboxAck {
                entry: second,
                pairs: vec![4],
            },
        ])
        .await
        .unwrap();
    assert_eq!(two[0].commands, 2, "commands 0 and 2 were already released");
    let left = store.outbox(100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].id, left[0].entry.pairs.clone()),
        (second, vec![3, 5])
    );
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!((job.installs().released, job.installs().pending), (4, 2));
    let done = store
        .ack_outbox(&[OutboxAck {
            entry: second,
            pairs: vec![3, 5],
        }])
        .await
        .unwrap();
    assert_eq!(done[0].finished, Some(JobState::Completed));
    assert!(store.outbox(100).await.unwrap().is_empty());
    assert!(
        store
            .ack_outbox(&[OutboxAck {
                entry: second,
                pairs: vec![3],
            }])
            .await
            .unwrap()
            .is_empty(),
        "a gone entry counts nothing"
    );
    assert_eq!(
        store.job(&"j".into()).await.unwrap().unwrap().state(),
        JobState::Completed
    );
}

/// An acknowledgement made while the applier folds (a backend may carry it
/// in the fold's commit) counts its commands once, beside the fold's own
/// confirmations, and so does one that no fold comes to carry.
pub async fn acknowledgements_beside_folds_count_once<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("ack-beside-fold".into()).await;
    for round in 0..12u64 {
        let job = format!("j{round}");
        let no = running_with_batch(store.as_ref(), &spec(&job, 2, 3)).await;
        store
            .decide(decide(&job, no, confirm([0, 1], "e")))
            .await
            .unwrap();
        let entry = store
            .outbox(1000)
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.entry.job_id == *job)
            .unwrap();
        assert_eq!(entry.entry.pairs, [0, 1]);
        store
            .record_notification(&format!("beside-{round}"), b"{}")
            .await
            .unwrap();
        let inbox = store.inbox(10).await.unwrap();
        let ack = OutboxAck {
            entry: entry.id,
            pairs: vec![0, 1],
        };
        let acker = {
            let store = store.clone();
            let ack = ack.clone();
            tokio::spawn(async move { store.ack_outbox(&[ack]).await })
        };
        // The fold comes a little later each round (0 to 5.5 ms): it takes
        // the acknowledgement with it, or finds it committed already.
        tokio::time::sleep(std::time::Duration::from_micros(500 * round)).await;
        let applied = store
            .fold(Fold {
                decide: vec![decide(&job, no, confirm([2], "e"))],
                consumed: inbox.iter().map(|i| i.id).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((applied[0].confirmed, applied[0].outboxed), (1, 1));
        let acked = acker.await.unwrap().unwrap();
        assert_eq!(acked.len(), 1, "round {round}");
        assert_eq!(
            (acked[0].job_id.as_str(), acked[0].commands),
            (job.as_str(), 2)
        );
        assert!(
            store.ack_outbox(&[ack]).await.unwrap().is_empty(),
            "acknowledged once"
        );
        let record = store.job(&job.as_str().into()).await.unwrap().unwrap();
        assert_eq!(record.tally(Phase::Associate).confirmed(), 3);
        assert_eq!(
            (record.installs().released, record.installs().pending),
            (2, 1)
        );
    }
    // A notification waits, and no fold comes to carry the acknowledgement.
    store
        .record_notification("beside-last", b"{}")
        .await
        .unwrap();
    let waiting = store.outbox(1000).await.unwrap();
    assert_eq!(
        waiting
            .iter()
            .map(|i| i.entry.pairs.clone())
            .collect::<Vec<_>>(),
        vec![vec![2]; 12],
        "each fold's own command is still to release"
    );
    let acked = store.ack_outbox(&acks_of(&waiting)).await.unwrap();
    assert_eq!(acked.iter().map(|r| r.commands).sum::<u64>(), 12);
    assert!(store.outbox(1000).await.unwrap().is_empty());
    for round in 0..12 {
        let record = store
            .job(&format!("j{round}").into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (record.installs().released, record.installs().pending),
            (3, 0)
        );
    }
}

pub async fn notifications_are_recorded_once_in_order<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("inbox".into()).await;
    assert_eq!(
        store.record_notification("a", b"first").await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        store.record_notification("b", b"second").await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        store.record_notification("a", b"again").await.unwrap(),
        Recorded::Duplicate
    );
    let inbox = store.inbox(10).await.unwrap();
    assert_eq!(
        inbox
            .iter()
            .map(|i| i.envelope.as_slice())
            .collect::<Vec<_>>(),
        [b"first".as_slice(), b"second".as_slice()]
    );
    assert_eq!(store.inbox(1).await.unwrap().len(), 1);
    assert_eq!(store.inbox_len().await.unwrap(), 2);
    store
        .fold(Fold {
            consumed: vec![inbox[0].id],
            ..Fold::default()
        })
        .await
        .unwrap();
    assert_eq!(
        store.record_notification("a", b"late").await.unwrap(),
        Recorded::Duplicate,
        "applied, still remembered"
    );
    assert_eq!(store.prune_seen(0).await.unwrap(), 0);
    let future = vppd::domain::lifecycle::now_ms() + 60_000;
    assert_eq!(store.prune_seen(future).await.unwrap(), 2);
    assert_eq!(
        store.record_notification("a", b"a week on").await.unwrap(),
        Recorded::New
    );
    assert_eq!(store.inbox_len().await.unwrap(), 2);
}

pub async fn notifications_for_unknown_events_park_until_recorded_or_expired<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("parked".into()).await;
    let known = spec("k", 1, 1);
    running_with_batch(store.as_ref(), &known).await; // event k-e0
    create(store.as_ref(), &spec("late", 1, 1)).await;
    store
        .update_job(&"late".into(), JobChange::Start)
        .await
        .unwrap();
    let late = store
        .start_batch(&"late".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    for (n, body) in ["late-1", "foreign-1", "known", "late-2", "foreign-2"]
        .iter()
        .enumerate()
    {
        store
            .record_notification(&format!("n{n}"), body.as_bytes())
            .await
            .unwrap();
    }
    let inbox = store.inbox(10).await.unwrap();
    let events = ["ev-late", "ev-foreign", "k-e0", "ev-late", "ev-foreign"];
    let park: Vec<(InboxId, EventId)> = inbox
        .iter()
        .zip(events)
        .map(|(i, e)| (i.id, e.into()))
        .collect();
    assert_eq!(
        store.park_notifications(&park).await.unwrap(),
        4,
        "a recorded event's notification is not parked"
    );
    let left = store.inbox(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].envelope, b"known");
    assert_eq!(
        store.park_notifications(&park).await.unwrap(),
        0,
        "parked once"
    );
    assert!(
        store.expire_parked(0, 10).await.unwrap().is_empty(),
        "nothing expires before its time"
    );

    // Recording the event brings its notifications back, in arrival order.
    assert!(
        store
            .batch_sent(&"late".into(), late.no(), &"ev-late".into())
            .await
            .unwrap()
    );
    let back = store.inbox(10).await.unwrap();
    assert_eq!(
        back.iter()
            .map(|i| i.envelope.as_slice())
            .collect::<Vec<_>>(),
        [b"late-1".as_slice(), b"known", b"late-2"]
    );
    assert!(back[0].id < back[1].id && back[1].id < back[2].id);

    // The rest expire, oldest first, a bounded run at a time, once.
    let future = vppd::domain::lifecycle::now_ms() + 60_000;
    let first = store.expire_parked(future, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].envelope, b"foreign-1");
    let rest = store.expire_parked(future, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].envelope, b"foreign-2");
    assert!(store.expire_parked(future, 10).await.unwrap().is_empty());
    assert_eq!(
        store.inbox_len().await.unwrap(),
        3,
        "expiry leaves the inbox alone"
    );

    // Parked notifications survive a reopen.
    store
        .record_notification("n9", b"parked-over-restart")
        .await
        .unwrap();
    let id = store.inbox(10).await.unwrap()[3].id;
    assert_eq!(
        store
            .park_notifications(&[(id, "ev-restart".into())])
            .await
            .unwrap(),
        1
    );
    drop(store);
    let store = open("parked".into()).await;
    let kept = store.expire_parked(future, 10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].envelope, b"parked-over-restart");
}

pub async fn meta_licenses_and_users_round_trip<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("meta".into()).await;
    assert!(store.meta("uid/1").await.unwrap().is_none());
    store.put_meta("uid/1", "main").await.unwrap();
    store.put_meta("uid/1", "other").await.unwrap();
    assert_eq!(store.meta("uid/1").await.unwrap().as_deref(), Some("other"));
    let record = LicenseRecord {
        assigned_count: 3,
        available_count: 7,
        total_count: 10,
        read_ms: 1,
        updated_ms: 0,
        product_type: Some("App".into()),
        applied: vec!["n-1".into()],
    };
    store
        .put_license("main", "1", "STDQ", &record)
        .await
        .unwrap();
    assert_eq!(
        store.license("main", "1", "STDQ").await.unwrap(),
        Some(record.clone())
    );
    assert!(store.license("other", "1", "STDQ").await.unwrap().is_none());
    assert!(store.license("main", "1", "PLUS").await.unwrap().is_none());
    // A token's records are listed by (adamId, pricingParam), no other token's.
    store
        .put_license("mainx", "2", "STDQ", &record)
        .await
        .unwrap();
    store
        .put_license("main", "1", "PLUS", &record)
        .await
        .unwrap();
    let mut listed = store.licenses("main").await.unwrap();
    listed.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        listed,
        vec![
            ("1".to_string(), "PLUS".to_string(), record.clone()),
            ("1".to_string(), "STDQ".to_string(), record.clone()),
        ]
    );
    assert!(store.user("main", "nobody").await.unwrap().is_none());
}

pub async fn tokens_are_put_replaced_listed_and_deleted<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let record = |name: &str, stoken: &str, takeover: bool| TokenRecord {
        name: name.into(),
        stoken: stoken.into(),
        takeover,
        updated_ms: 1,
    };
    {
        let store = open("tokens".into()).await;
        assert!(store.tokens().await.unwrap().is_empty());
        store
            .put_token(&record("acme", "secret-1", false))
            .await
            .unwrap();
        store
            .put_token(&record("zeta", "secret-2", true))
            .await
            .unwrap();
        // Replaced, not added twice.
        store
            .put_token(&record("acme", "secret-3", true))
            .await
            .unwrap();
        let mut all = store.tokens().await.unwrap();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            all,
            vec![
                record("acme", "secret-3", true),
                record("zeta", "secret-2", true)
            ]
        );
        // States are stored beside the tokens, config-file ones included
        // (no stored token), and replaced in place.
        store
            .put_token_state("acme", r#"{"state":"registering"}"#)
            .await
            .unwrap();
        store
            .put_token_state("acme", r#"{"state":"ready"}"#)
            .await
            .unwrap();
        store
            .put_token_state("zeta", r#"{"state":"failed"}"#)
            .await
            .unwrap();
        store
            .put_token_state("from-file", r#"{"state":"ready"}"#)
            .await
            .unwrap();
        let mut states = store.token_states().await.unwrap();
        states.sort();
        assert_eq!(
            states,
            vec![
                ("acme".to_string(), r#"{"state":"ready"}"#.to_string()),
                ("from-file".to_string(), r#"{"state":"ready"}"#.to_string()),
                ("zeta".to_string(), r#"{"state":"failed"}"#.to_string()),
            ]
        );
        assert!(store.delete_token("zeta").await.unwrap());
        assert!(!store.delete_token("zeta").await.unwrap());
        // Deleting a token drops its state with it.
        let mut states = store.token_states().await.unwrap();
        states.sort();
        assert_eq!(
            states.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["acme", "from-file"]
        );
        assert!(
            !format!("{all:?}").contains("secret"),
            "Debug shows an sToken"
        );
    }
    // Durable across a reopen.
    let store = open("tokens".into()).await;
    assert_eq!(
        store.tokens().await.unwrap(),
        vec![record("acme", "secret-3", true)]
    );
    assert_eq!(store.token_states().await.unwrap().len(), 2);
}

pub async fn concurrent_commits_lose_nothing<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("concurrent".into()).await;
    // 2 x 3 pairs; six tasks decide one pair each of the same batch, and
    // eight race to record the same notification.
    let no = running_with_batch(store.as_ref(), &spec("j", 2, 3)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..6 {
        let store = store.clone();
        tasks.spawn(async move {
            let a = store
                .decide(decide("j", no, confirm([p], "e")))
                .await
                .unwrap();
            (a.confirmed, false)
        });
    }
    for _ in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            let r = store.record_notification("same", b"{}").await.unwrap();
            (0, r == Recorded::New)
        });
    }
    let mut confirmed = 0;
    let mut new = 0;
    while let Some(r) = tasks.join_next().await {
        let (c, n) = r.unwrap();
        confirmed += c;
        new += n as u32;
    }
    assert_eq!(confirmed, 6);
    assert_eq!(new, 1, "one notification recorded, seven duplicates");
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!(job.tally(Phase::Associate).confirmed(), 6);
    assert_eq!(job.installs().pending, 6);
    let commands: usize = store
        .outbox(100)
        .await
        .unwrap()
        .iter()
        .map(|i| i.entry.pairs.len())
        .sum();
    assert_eq!(commands, 6);
    assert_eq!(
        store.batch(&"j".into(), no).await.unwrap().unwrap().state(),
        BatchState::Decided
    );
    assert_eq!(job.requests().completed, 1, "decided once");

    // Many senders at once, each id four times: one New per id, and the
    // inbox holds exactly the envelope of the sender told New.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.spawn(async move {
            let envelope = format!("e{i}");
            let r = store
                .record_notification(&format!("m{}", i % 50), envelope.as_bytes())
                .await
                .unwrap();
            (r == Recorded::New).then_some(envelope)
        });
    }
    let mut told_new = std::collections::BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        if let Some(e) = r.unwrap() {
            told_new.insert(e.into_bytes());
        }
    }
    assert_eq!(told_new.len(), 50, "one New for each of the 50 ids");
    let inbox: std::collections::BTreeSet<Vec<u8>> = store
        .inbox(1000)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.envelope)
        .filter(|e| e.starts_with(b"e"))
        .collect();
    assert_eq!(inbox, told_new);
}

pub async fn everything_survives_a_reopen<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("reopen".into()).await;
    let no = running_with_batch(store.as_ref(), &spec("j", 2, 3)).await;
    store
        .decide(decide(
            "j",
            no,
            [confirm([0, 1], "e"), vec![fail(2, 9709)]].concat(),
        ))
        .await
        .unwrap();
    store.record_notification("n", b"kept").await.unwrap();
    store.put_meta("k", "v").await.unwrap();
    drop(store);

    let store = open("reopen".into()).await;
    let job = store.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!(job.state(), JobState::Running);
    assert_eq!(job.tally(Phase::Associate).confirmed(), 2);
    assert!(store.spec(&"j".into()).await.unwrap().is_some());
    assert_eq!(
        store.batch(&"j".into(), no).await.unwrap().unwrap().state(),
        BatchState::Sent
    );
    assert_eq!(
        store.event(&"j-e0".into()).await.unwrap().map(|e| e.batch),
        Some(no)
    );
    assert_eq!(store.open_batches("main").await.unwrap().len(), 1);
    assert_eq!(store.failures(&"j".into(), 10).await.unwrap().0.len(), 1);
    assert_eq!(store.outbox(10).await.unwrap()[0].entry.pairs, [0, 1]);
    assert_eq!(store.inbox(10).await.unwrap()[0].envelope, b"kept");
    assert_eq!(
        store.record_notification("n", b"again").await.unwrap(),
        Recorded::Duplicate
    );
    assert_eq!(store.meta("k").await.unwrap().as_deref(), Some("v"));
    // Ids keep increasing across the reopen.
    store.record_notification("m", b"later").await.unwrap();
    let inbox = store.inbox(10).await.unwrap();
    assert_eq!(inbox.len(), 2);
    assert!(inbox[0].id < inbox[1].id);
}

pub async fn leases_go_to_one_holder_at_a_time<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    use std::time::Duration;
    let store = open("leases".into()).await;
    let names: Vec<String> = vec!["token/a".into(), "token/b".into()];
    let long = Duration::from_secs(60);
    let mut got = store.take_leases(&names, "r1", long).await.unwrap();
    got.sort();
    assert_eq!(got, names);
    // Held and unexpired: another holder gets nothing; the holder renews.
    assert!(
        store
            .take_leases(&names, "r2", long)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.take_leases(&names[..1], "r1", long).await.unwrap(),
        names[..1]
    );
    // Given up: another holder takes it once the linger has passed.
    store
        .release_leases(&names[1..], "r1", Duration::ZERO)
        .await
        .unwrap();
    // Only the holder can give a lease up.
    store
        .release_leases(&names[..1], "r2", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        store.take_leases(&names, "r2", long).await.unwrap(),
        names[1..]
    );
    // Expired without renewal (a dead replica): taken over.
    store
        .take_leases(&["token/c".to_string()], "r1", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store
            .take_leases(&["token/c".to_string()], "r2", long)
            .await
            .unwrap(),
        ["token/c"]
    );
    let leases = store.leases().await.unwrap();
    let holders: Vec<(&str, &str, bool)> = leases
        .iter()
        .map(|l| (l.name.as_str(), l.holder.as_str(), l.remaining_ms > 0))
        .collect();
    assert_eq!(
        holders,
        [
            ("token/a", "r1", true),
            ("token/b", "r2", true),
            ("token/c", "r2", true)
        ]
    );
    // Racing holders: each lease goes to exactly one.
    let wanted: Vec<String> = (0..20).map(|i| format!("race/{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..4 {
        let store = store.clone();
        let wanted = wanted.clone();
        tasks.spawn(async move {
            store
                .take_leases(&wanted, &format!("h{h}"), long)
                .await
                .unwrap()
        });
    }
    let mut taken = Vec::new();
    while let Some(r) = tasks.join_next().await {
        taken.extend(r.unwrap());
    }
    taken.sort();
    assert_eq!(
        taken,
        wanted
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
}

pub async fn the_first_value_stored_is_kept<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("first-value".into()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .meta_or_insert("notifications/secret", &format!("s{i}"))
                .await
                .unwrap()
        });
    }
    let mut kept = std::collections::HashSet::new();
    while let Some(r) = tasks.join_next().await {
        kept.insert(r.unwrap());
    }
    assert_eq!(
        kept.len(),
        1,
        "every caller sees the one value kept: {kept:?}"
    );
    let value = kept.into_iter().next().unwrap();
    assert_eq!(
        store.meta("notifications/secret").await.unwrap(),
        Some(value.clone())
    );
    drop(store);
    let store = open("first-value".into()).await;
    assert_eq!(
        store
            .meta_or_insert("notifications/secret", "late")
            .await
            .unwrap(),
        value
    );
}

/// Installs for user targets wait in the held set; settling moves them to
/// the outbox or drops them by identity, once; the users step writes its
/// invitations once; users are listed per token.
pub async fn user_installs_are_held_until_their_user_is_settled<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let name = "held".to_string();
    let store = open(name.clone()).await;
    let mut spec = spec("uj", 1, 1);
    spec.associate.client_user_ids = vec!["A".into(), "B".into()];
    // One batch: pair 0 the serial, 1 user A, 2 user B.
    let no = running_with_batch(store.as_ref(), &spec).await;
    let invitations = vec![("A".to_string(), "https://apple.example/i?c=a".to_string())];
    assert!(
        store
            .users_ready(&"uj".into(), &invitations, &[])
            .await
            .unwrap()
    );
    assert!(
        !store
            .users_ready(&"uj".into(), &invitations, &[])
            .await
            .unwrap(),
        "the users step ends once"
    );
    assert!(
        !store
            .users_ready(&"nope".into(), &invitations, &[])
            .await
            .unwrap()
    );
    let outbox = store.outbox(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "one invitation entry");
    assert_eq!(outbox[0].entry.invitations, invitations);
    let invite = outbox[0].id;

    let applied = store
        .decide(decide("uj", no, confirm([0, 1, 2], "e1")))
        .await
        .unwrap();
    assert_eq!((applied.outboxed, applied.held), (1, 2), "{applied:?}");
    drop(store);
    let store = open(name.clone()).await;
    let held = store.held("main").await.unwrap();
    assert_eq!(held.len(), 1, "held survives a reopen");
    let mut pairs = held[0].entry.pairs.clone();
    pairs.sort();
    assert_eq!(pairs, vec![1, 2]);
    assert!(store.held("other").await.unwrap().is_empty());
    let job = store.job(&"uj".into()).await.unwrap().unwrap();
    assert_eq!(job.installs().pending, 3, "held installs are pending");

    let h = held[0].id;
    let settled = store
        .settle_held(
            "main",
            &[OutboxAck {
                entry: h,
                pairs: vec![1],
            }],
            &[OutboxAck {
                entry: h,
                pairs: vec![2],
            }],
        )
        .await
        .unwrap();
    assert_eq!((settled.released, settled.dropped), (1, 1), "{settled:?}");
    let again = store
        .settle_held(
            "main",
            &[OutboxAck {
                entry: h,
                pairs: vec![1, 2],
            }],
            &[],
        )
        .await
        .unwrap();
    assert_eq!((again.released, again.dropped), (0, 0), "settled once");
    assert!(store.held("main").await.unwrap().is_empty());
    let outbox = store.outbox(100).await.unwrap();
    let installs: Vec<Vec<u32>> = outbox
        .iter()
        .filter(|i| i.id != invite)
        .map(|i| i.entry.pairs.clone())
        .collect();
    assert_eq!(installs.len(), 2, "{outbox:?}");
    assert!(installs.contains(&vec![0]) && installs.contains(&vec![1]));

    // Associated users are counted once.
    store
        .update_job(&"uj".into(), JobChange::UsersAssociated(vec![0, 0]))
        .await
        .unwrap();
    let job = store
        .update_job(&"uj".into(), JobChange::UsersAssociated(vec![0]))
        .await
        .unwrap()
        .unwrap();
    let counts = job.status(None, false).users;
    assert_eq!((counts.total, counts.associated, counts.invited), (2, 1, 0));

    // Everything acknowledged: the invitation counts as invited, and the
    // job completes (the dropped install is no longer pending).
    let acks: Vec<OutboxAck> = outbox
        .iter()
        .map(|i| OutboxAck {
            entry: i.id,
            pairs: i.entry.pairs.clone(),
        })
        .collect();
    store.ack_outbox(&acks).await.unwrap();
    let job = store.job(&"uj".into()).await.unwrap().unwrap();
    let status = job.status(None, false);
    assert_eq!(status.users.invited, 1);
    assert_eq!((status.installs.released, status.installs.pending), (2, 0));
    assert_eq!(job.state(), JobState::Completed);

    // Users per token, by clientUserId.
    let user = |id: &str, status: &str| UserRecord {
        client_user_id: id.into(),
        status: Some(status.into()),
        ..Default::default()
    };
    store
        .fold(Fold {
            users: vec![
                ("main".into(), user("B", "Registered")),
                ("main".into(), user("A", "Associated")),
                ("other".into(), user("C", "Registered")),
            ],
            ..Fold::default()
        })
        .await
        .unwrap();
    let users = store.users("main").await.unwrap();
    let ids: Vec<&str> = users.iter().map(|u| u.client_user_id.as_str()).collect();
    assert_eq!(ids, ["A", "B"]);
    assert_eq!(users[0].status.as_deref(), Some("Associated"));
}

/// Acknowledges every command of `job` in the outbox.
/// An acknowledgement of every command of `items`, as a releaser that
/// delivered them all makes it.
pub fn acks_of<'a>(items: impl IntoIterator<Item = &'a OutboxItem>) -> Vec<OutboxAck> {
    items
        .into_iter()
        .map(|i| OutboxAck {
            entry: i.id,
            pairs: i.entry.pairs.clone(),
        })
        .collect()
}

async fn ack_all(store: &dyn Store, job: &str) {
    let outbox = store.outbox(1000).await.unwrap();
    let acks = acks_of(outbox.iter().filter(|i| i.entry.job_id == job));
    assert!(!acks.is_empty(), "nothing of {job} in the outbox");
    store.ack_outbox(&acks).await.unwrap();
}

pub async fn finished_jobs_are_pruned_with_all_that_is_theirs<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open("prune".into()).await;
    // "done": completed, one pair failed, its installs acknowledged.
    let no = running_with_batch(store.as_ref(), &spec("done", 1, 3)).await;
    store
        .decide(Decide {
            finished: true,
            ..decide(
                "done",
                no,
                [confirm([0, 1], "done-e0"), vec![fail(2, 9709)]].concat(),
            )
        })
        .await
        .unwrap();
    ack_all(store.as_ref(), "done").await;
    assert_eq!(
        store.job(&"done".into()).await.unwrap().unwrap().state(),
        JobState::Completed
    );
    // "queued": failed, its install commands still in the outbox.
    let no = running_with_batch(store.as_ref(), &spec("queued", 1, 3)).await;
    store
        .decide(Decide {
            finished: true,
            ..decide("queued", no, confirm([0, 1, 2], "queued-e0"))
        })
        .await
        .unwrap();
    store
        .update_job(&"queued".into(), JobChange::Fail("token refused".into()))
        .await
        .unwrap();
    // "open": canceled while Apple still has its batch; "live": running.
    running_with_batch(store.as_ref(), &spec("open", 1, 3)).await;
    store
        .update_job(&"open".into(), JobChange::Cancel)
        .await
        .unwrap();
    running_with_batch(store.as_ref(), &spec("live", 1, 3)).await;

    let before = store.stats().await.unwrap();
    assert!(before.bytes > 0, "{before:?}");
    for (kind, n) in [("jobs", 4), ("batches", 4), ("events", 4), ("failures", 1)] {
        assert_eq!(before.count(kind), n, "{kind}: {before:?}");
    }
    assert!(before.count("outbox") >= 1, "{before:?}");

    assert!(
        store.prune_finished(0).await.unwrap().is_empty(),
        "nothing finished that long ago"
    );
    let mark = store.watermark().await.unwrap();
    assert_eq!(store.prune_finished(u64::MAX).await.unwrap(), ["done"]);
    // A pruned job still counts in the watermark: a store that forgot a
    // finished job on purpose did not go backwards.
    let after = store.watermark().await.unwrap();
    assert!(
        after.jobs >= mark.jobs && after.finished >= mark.finished,
        "{mark:?} -> {after:?}"
    );
    assert!(store.job(&"done".into()).await.unwrap().is_none());
    assert!(store.spec(&"done".into()).await.unwrap().is_none());
    assert!(store.batches_of(&"done".into()).await.unwrap().is_empty());
    assert!(store.batch(&"done".into(), 0).await.unwrap().is_none());
    assert!(store.event(&"done-e0".into()).await.unwrap().is_none());
    assert!(
        store
            .failures(&"done".into(), 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let ids: Vec<String> = store
        .jobs()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id().to_string())
        .collect();
    assert_eq!(ids, ["queued", "open", "live"]);
    assert!(store.event(&"open-e0".into()).await.unwrap().is_some());
    let after = store.stats().await.unwrap();
    for (kind, n) in [("jobs", 3), ("batches", 3), ("events", 3), ("failures", 0)] {
        assert_eq!(after.count(kind), n, "{kind}: {after:?}");
    }
    assert!(
        store.prune_finished(u64::MAX).await.unwrap().is_empty(),
        "pruning again changes nothing"
    );

    // Once its commands are acknowledged, the failed job goes too.
    ack_all(store.as_ref(), "queued").await;
    assert_eq!(store.prune_finished(u64::MAX).await.unwrap(), ["queued"]);
    drop(store);
    let store = open("prune".into()).await;
    assert!(store.job(&"done".into()).await.unwrap().is_none());
    assert!(store.job(&"queued".into()).await.unwrap().is_none());
    assert!(store.event(&"queued-e0".into()).await.unwrap().is_none());
    assert!(store.job(&"open".into()).await.unwrap().is_some());
    assert!(store.job(&"live".into()).await.unwrap().is_some());
}

pub async fn drift_changes_are_atomic_and_durable<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    use vppd::domain::lifecycle::{DriftChange, DriftItem};
    let item = |serial: String, job: Option<&str>| DriftItem {
        adam_id: "1".into(),
        pricing_param: "STDQ".into(),
        serial_number: Some(serial),
        client_user_id: None,
        seen_ms: 7,
        job_id: job.map(str::to_string),
    };
    let store = open("drift".into()).await;
    assert_eq!(store.drift("main").await.unwrap(), None);
    store
        .update_drift(
            "main",
            DriftChange::Baseline {
                version_id: "v1".into(),
                foreign: vec![item("OLD".into(), None).key()],
                now: 1,
            },
        )
        .await
        .unwrap();
    // Reads and removals race (the follower and the applier): none is lost.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            let change = if i % 2 == 0 {
                DriftChange::Read {
                    version_id: format!("v{}", i + 2),
                    unexplained: vec![item(format!("NEW{i}"), None), item("OLD".into(), None)],
                    now: 2,
                }
            } else {
                DriftChange::Removed {
                    items: vec![item(format!("MINE{i}"), None)],
                }
            };
            store.update_drift("main", change).await.unwrap()
        });
    }
    let (mut added, mut removed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let c = r.unwrap();
        added += c.added;
        removed += c.removed;
    }
    assert_eq!((added, removed), (4, 4));
    // The same removal again, now knowing its job: counted once, job kept.
    let c = store
        .update_drift(
            "main",
            DriftChange::Removed {
                items: vec![item("MINE1".into(), Some("job-1"))],
            },
        )
        .await
        .unwrap();
    assert_eq!(c.removed, 0);
    drop(store);
    let store = open("drift".into()).await;
    let d = store.drift("main").await.unwrap().unwrap();
    assert_eq!((d.added.count, d.removed.count), (4, 4));
    assert_eq!(d.added.items.len(), 4);
    let mine1 = d
        .removed
        .items
        .iter()
        .find(|i| i.serial_number.as_deref() == Some("MINE1"))
        .unwrap();
    assert_eq!(mine1.job_id.as_deref(), Some("job-1"));
    assert!(d.version_id.is_some() && d.checked_ms == Some(2));
    assert_eq!(store.drift("other").await.unwrap(), None);
}
