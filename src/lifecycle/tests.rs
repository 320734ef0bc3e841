use super::*;
use crate::job::{JobAsset, RequestType, Targets};

fn spec(assets: usize, serials: usize, install: bool) -> JobSpec {
    JobSpec {
        id: "j".into(),
        token: "main".into(),
        assets: (0..assets)
            .map(|i| JobAsset {
                adam_id: (1000 + i).to_string(),
                pricing_param: "STDQ".into(),
            })
            .collect(),
        disassociate: Targets::default(),
        associate: Targets {
            serial_numbers: (0..serials).map(|i| format!("S{i}")).collect(),
            client_user_ids: Vec::new(),
        },
        install,
        allow_partial: false,
        revoke: Default::default(),
        uninstall: false,
        wait_for_licenses: false,
        users: Vec::new(),
        retire_users: Vec::new(),
        priority: Default::default(),
    }
}

const SHAPE: Shape = Shape {
    max_assets: 2,
    max_serials: 3,
    max_users: 3,
    max_revoke_serials: 3,
    max_revoke_users: 3,
};

fn confirmed(pairs: impl IntoIterator<Item = u32>) -> Vec<(u32, Decision)> {
    pairs
        .into_iter()
        .map(|p| {
            (
                p,
                Decision::Confirmed {
                    event_id: Some("e".into()),
                },
            )
        })
        .collect()
}

fn failed(pair: u32) -> (u32, Decision) {
    (
        pair,
        Decision::Failed(FailureRecord {
            error_number: 9709,
            error_message: "not enough licenses".into(),
            event_id: Some("e".into()),
        }),
    )
}

#[test]
fn a_job_runs_to_completion_through_its_transitions() {
    // 2 assets x 3 serials: one batch of 6 pairs.
    let mut job = JobRecord::new(&spec(2, 3, true), "h".into(), SHAPE, 1);
    assert_eq!(job.state(), JobState::Accepted);
    assert_eq!(job.requests().planned, 1);
    assert!(job.wants_submitter());
    assert!(job.apply(&JobChange::Start, 2));
    assert!(!job.apply(&JobChange::Start, 2), "start is taken once");
    let mut batch = job.start_batch(SHAPE, 3).unwrap();
    assert_eq!(batch.state(), BatchState::Sending);
    assert_eq!(job.sending(), Some(0));
    assert!(
        job.start_batch(SHAPE, 3).is_none(),
        "one batch sending at a time"
    );
    assert!(job.batch_sent(&mut batch, "e", 4));
    assert_eq!(batch.state(), BatchState::Sent);
    assert_eq!(job.sending(), None);
    assert_eq!(job.requests().submitted, 1);
    assert!(!job.wants_submitter(), "nothing left to send");

    let d = job.decide(&mut batch, &confirmed(0..4), &[], true, false, 5);
    assert_eq!(d.applied.confirmed, 4);
    assert_eq!(d.outbox.len(), 1);
    assert_eq!(d.outbox[0].pairs, vec![0, 1, 2, 3]);
    assert_eq!(job.installs().pending, 4);
    let d = job.decide(&mut batch, &[failed(4), failed(5)], &[], false, true, 6);
    assert_eq!(d.applied.failed, 2);
    assert_eq!(d.failures.len(), 2);
    assert!(d.applied.batch_decided);
    assert_eq!(batch.state(), BatchState::Decided);
    assert_eq!(batch.terminal_ms(), Some(6));
    assert_eq!(job.state(), JobState::Running, "installs still pending");
    assert_eq!(job.released(3, RequestType::InstallApplication, 7), None);
    assert_eq!(
        job.released(1, RequestType::InstallApplication, 8),
        Some(JobState::Completed)
    );
    assert_eq!(job.tally(Phase::Associate).confirmed(), 4);
    assert_eq!(job.tally(Phase::Associate).failed(), 2);
    assert_eq!(job.requests().completed, 1);
}

#[test]
fn a_pair_is_decided_once() {
    let mut job = JobRecord::new(&spec(1, 3, true), "h".into(), SHAPE, 1);
    let mut batch = job.start_batch(SHAPE, 1).unwrap();
    job.batch_sent(&mut batch, "e", 2);
    let first = job.decide(&mut batch, &[failed(0)], &[], false, false, 3);
    assert_eq!(first.applied.failed, 1);
    let again = job.decide(
        &mut batch,
        &[confirmed([0]), confirmed([0, 1, 1, 99])].concat(),
        &[],
        false,
        false,
        4,
    );
    assert_eq!(
        again.applied.confirmed, 1,
        "pair 0 kept its failure, 1 once, 99 is out of range"
    );
    assert_eq!(again.outbox[0].pairs, vec![1]);
    assert_eq!(job.tally(Phase::Associate).confirmed(), 1);
    assert_eq!(job.tally(Phase::Associate).failed(), 1);
}

#[test]
fn without_install_no_command_is_created() {
    let mut job = JobRecord::new(&spec(1, 2, false), "h".into(), SHAPE, 1);
    let mut batch = job.start_batch(SHAPE, 1).unwrap();
    let d = job.decide(&mut batch, &confirmed(0..2), &[], false, false, 2);
    assert!(d.outbox.is_empty());
    assert!(d.applied.batch_decided);
    assert_eq!(
        job.sending(),
        None,
        "a decided batch is no longer being sent"
    );
    assert_eq!(job.state(), JobState::Completed);
}

#[test]
fn a_refused_batch_goes_back_to_the_plan() {
    let mut job = JobRecord::new(&spec(2, 6, true), "h".into(), SHAPE, 1);
    assert_eq!(job.requests().planned, 2);
    let batch = job.start_batch(SHAPE, 1).unwrap();
    assert_eq!(job.open_batches(), 1);
    let tighter = Shape {
        max_serials: 1,
        ..SHAPE
    };
    assert!(job.return_batch(&batch, tighter));
    assert_eq!(job.open_batches(), 0);
    assert_eq!(job.sending(), None);
    assert_eq!(job.requests().planned, 6);
    let again = job.start_batch(tighter, 2).unwrap();
    assert_eq!(again.no(), 0, "the number is reused");
    assert_eq!(again.pairs(), 2);
}

#[test]
fn cancel_stops_the_plan_and_a_sending_batch_is_withdrawn() {
    let mut job = JobRecord::new(&spec(2, 6, true), "h".into(), SHAPE, 1);
    job.apply(&JobChange::Start, 1);
    let mut batch = job.start_batch(SHAPE, 2).unwrap();
    let mut other = batch.clone();
    assert!(
        !job.withdraw_batch(&mut other, 3),
        "only a final job withdraws"
    );
    assert!(job.apply(&JobChange::Cancel, 3));
    assert_eq!(job.state(), JobState::Canceled);
    assert!(job.plan_done());
    assert_eq!(job.requests().planned, 1);
    assert!(job.start_batch(SHAPE, 3).is_none());
    assert!(
        job.wants_submitter(),
        "the sending batch must be reconciled"
    );
    // What Apple did of it is confirmed (and released), then it is withdrawn.
    let d = job.decide(&mut batch, &confirmed([0, 1]), &[], false, false, 4);
    assert_eq!(d.applied.outboxed, 2);
    assert!(job.withdraw_batch(&mut batch, 5));
    assert_eq!(batch.state(), BatchState::Withdrawn);
    assert!(!batch.state().is_open());
    assert_eq!(job.sending(), None);
    assert_eq!(job.open_batches(), 0);
    assert!(!job.wants_submitter());
    assert!(
        !job.batch_sent(&mut batch, "late", 6),
        "a withdrawn batch is never sent"
    );
    assert!(
        !job.apply(&JobChange::Fail("x".into()), 6),
        "a final job stays final"
    );
    assert_eq!(job.state(), JobState::Canceled);
    assert_eq!(job.released(2, RequestType::InstallApplication, 7), None);
    assert_eq!(job.installs().released, 2);
}

#[test]
fn outbox_commands_are_taken_by_identity() {
    let mut entry = OutboxEntry {
        job_id: "j".into(),
        batch: 0,
        request_type: RequestType::InstallApplication,
        event_id: None,
        pairs: vec![5, 1, 9, 3],
        confirmed_ms: 0,
        invitations: Vec::new(),
    };
    assert_eq!(entry.take(&[1, 3]), 2);
    assert_eq!(entry.pairs, vec![5, 9]);
    // A second releaser acknowledging the same commands takes nothing.
    assert_eq!(entry.take(&[1, 3]), 0);
    assert_eq!(entry.take(&[9, 42]), 1);
    assert_eq!(entry.pairs, vec![5]);
}

#[test]
fn bitmap_round_trips_through_json() {
    let mut b = Bitmap::new(130);
    assert!(b.set(0));
    assert!(b.set(129));
    assert!(!b.set(129));
    assert!(!b.set(500));
    let json = serde_json::to_string(&b).unwrap();
    let back: Bitmap = serde_json::from_str(&json).unwrap();
    assert_eq!(back, b);
    assert!(back.get(0) && back.get(129) && !back.get(64));
}

#[test]
fn a_finished_job_expires_only_once_nothing_of_it_moves() {
    let mut job = JobRecord::new(&spec(2, 6, true), "h".into(), SHAPE, 1);
    assert!(!job.expired(u64::MAX), "not final");
    job.apply(&JobChange::Start, 1);
    let mut batch = job.start_batch(SHAPE, 2).unwrap();
    job.batch_sent(&mut batch, "e", 3);
    assert!(job.apply(&JobChange::Cancel, 10));
    assert!(!job.expired(u64::MAX), "a sent batch is still open");
    job.decide(&mut batch, &confirmed(0..6), &[], false, true, 11);
    assert_eq!(job.open_batches(), 0);
    assert!(!job.expired(u64::MAX), "its installs wait in the outbox");
    job.released(6, RequestType::InstallApplication, 12);
    assert!(!job.expired(9), "finished after the cutoff");
    assert!(job.expired(10), "finished at the cutoff");
    assert!(job.expired(u64::MAX));
}
