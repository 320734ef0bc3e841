use super::*;
use crate::domain::job::{JobAsset, RequestType, Targets};

/// `assets` (1000, 1001, ..) x `serials` (S0, S1, ..) to associate, on token `main`.
pub(crate) fn spec(assets: usize, serials: usize, install: bool) -> JobSpec {
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

pub(crate) const SHAPE: Shape = Shape {
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

fn outbox_entry(
    job: &str,
    batch: u32,
    event: Option<&str>,
    pairs: std::ops::Range<u32>,
) -> OutboxEntry {
    OutboxEntry {
        job_id: job.into(),
        batch,
        request_type: RequestType::InstallApplication,
        event_id: event.map(EventId::from),
        pairs: pairs.collect(),
        confirmed_ms: 7,
        invitations: Vec::new(),
    }
}

#[test]
fn a_folds_run_of_one_event_is_one_outbox_entry() {
    let mut out = Vec::new();
    for n in 0..16 {
        push_outbox(
            &mut out,
            outbox_entry("j", 3, Some("e1"), n * 100..n * 100 + 100),
        );
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].pairs, (0..1600).collect::<Vec<u32>>());
    // Another event, then the first one again: three entries, in order.
    push_outbox(&mut out, outbox_entry("j", 4, Some("e2"), 0..10));
    push_outbox(&mut out, outbox_entry("j", 3, Some("e1"), 1600..1610));
    assert_eq!(out.len(), 3);
    assert_eq!(out[2].pairs, (1600..1610).collect::<Vec<u32>>());
    // An entry stops growing at OUTBOX_ENTRY_MAX commands.
    let mut big = Vec::new();
    for n in 0..50 {
        push_outbox(&mut big, outbox_entry("j", 0, None, n * 100..n * 100 + 100));
    }
    assert!(big.iter().all(|e| e.pairs.len() <= OUTBOX_ENTRY_MAX));
    assert_eq!(big.iter().map(|e| e.pairs.len()).sum::<usize>(), 5000);
    assert_eq!(big.len(), 2);
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

#[test]
fn a_bitmap_in_long_runs_is_stored_in_a_few_bytes() {
    let mut b = Bitmap::new(25_000);
    for i in 0..12_345 {
        b.set(i);
    }
    for i in 20_000..20_100 {
        b.set(i);
    }
    let json = serde_json::to_string(&b).unwrap();
    assert!(json.len() < 24, "{json}");
    let back: Bitmap = serde_json::from_str(&json).unwrap();
    assert_eq!(back, b);
}

#[test]
fn a_bitmap_stored_as_words_by_an_earlier_version_still_reads() {
    // Base64 of the two little-endian words 0b101 and 1 << 63.
    let mut words = Vec::new();
    words.extend_from_slice(&5u64.to_le_bytes());
    words.extend_from_slice(&(1u64 << 63).to_le_bytes());
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD_NO_PAD.encode(words);
    let back: Bitmap = serde_json::from_value(serde_json::Value::String(stored)).unwrap();
    let mut want = Bitmap::new(128);
    want.set(0);
    want.set(2);
    want.set(127);
    assert_eq!(back, want);
}

#[test]
fn damaged_bitmap_runs_are_refused() {
    for bad in ["\"~\"", "\"~gA\"", "\"~AYA\"", "\"~Af8B\""] {
        assert!(serde_json::from_str::<Bitmap>(bad).is_err(), "{bad}");
    }
}

proptest::proptest! {
    /// Taking commands removes exactly the named ones still there, and
    /// counts them, whether they are the whole entry or not.
    #[test]
    fn taking_outbox_commands_removes_the_named_ones(
        pairs in proptest::collection::hash_set(0u32..40, 0..30),
        named in proptest::collection::vec(0u32..40, 0..30),
        how in 0u8..3,
        cut in 0usize..31,
    ) {
        // An entry names each pair once.
        let pairs: Vec<u32> = pairs.into_iter().collect();
        let mut entry = OutboxEntry {
            job_id: "j".into(),
            batch: 0,
            request_type: RequestType::InstallApplication,
            event_id: None,
            pairs: pairs.clone(),
            confirmed_ms: 0,
            invitations: Vec::new(),
        };
        // The whole entry, the front of it (as the release takes it), or
        // any pairs at all.
        let named = match how {
            0 => pairs.clone(),
            1 => pairs[..cut.min(pairs.len())].to_vec(),
            _ => named,
        };
        let kept: Vec<u32> = pairs.iter().copied().filter(|p| !named.contains(p)).collect();
        let taken = entry.take(&named);
        proptest::prop_assert_eq!(taken as usize, pairs.len() - kept.len());
        proptest::prop_assert_eq!(entry.pairs, kept);
    }

    /// Entries pushed one after another keep every command, in order, each
    /// with its own job, batch, command, event and confirmation time; only
    /// neighbours are joined, invitations never, and none grows past
    /// OUTBOX_ENTRY_MAX.
    #[test]
    fn pushed_outbox_entries_keep_every_command_in_order(
        entries in proptest::collection::vec(
            (0u8..2, 0u32..2, 0u8..2, proptest::option::of(0u8..2), 0u64..2, 0u32..2500, proptest::bool::weighted(0.1)),
            0..40,
        ),
    ) {
        let mut next = 0u32;
        let mut input = Vec::new();
        for (job, batch, kind, event, at, len, invite) in entries {
            let pairs: Vec<u32> = (next..next + len).collect();
            next += len;
            input.push(OutboxEntry {
                job_id: format!("j{job}").into(),
                batch,
                request_type: if kind == 0 { RequestType::InstallApplication } else { RequestType::RemoveApplication },
                event_id: event.map(|e| format!("e{e}").into()),
                invitations: if invite { pairs.iter().map(|p| (format!("u{p}"), String::new())).collect() } else { Vec::new() },
                pairs,
                confirmed_ms: at,
            });
        }
        let mut out = Vec::new();
        for e in input.clone() {
            push_outbox(&mut out, e);
        }
        type Command = (JobId, u32, RequestType, Option<EventId>, u64, u32);
        let flat = |v: &[OutboxEntry]| -> Vec<Command> {
            v.iter()
                .flat_map(|e| e.pairs.iter().map(move |p| (e.job_id.clone(), e.batch, e.request_type, e.event_id.clone(), e.confirmed_ms, *p)))
                .collect()
        };
        proptest::prop_assert_eq!(flat(&out), flat(&input));
        let invitations = |v: &[OutboxEntry]| v.iter().filter(|e| !e.invitations.is_empty()).cloned().collect::<Vec<_>>();
        proptest::prop_assert_eq!(invitations(&out), invitations(&input));
        let largest = input.iter().map(|e| e.pairs.len()).max().unwrap_or(0);
        proptest::prop_assert!(out.iter().all(|e| e.pairs.len() <= OUTBOX_ENTRY_MAX.max(largest)));
        proptest::prop_assert!(out.len() <= input.len());
    }

    #[test]
    fn any_bitmap_round_trips(bits in 0u64..3000, set in proptest::collection::vec(0u32..3000, 0..400), fill in proptest::option::of((0u32..3000, 0u32..3000))) {
        let mut b = Bitmap::new(bits);
        for i in set {
            b.set(i);
        }
        if let Some((from, len)) = fill {
            for i in from..from.saturating_add(len) {
                b.set(i);
            }
        }
        let json = serde_json::to_string(&b).unwrap();
        let back: Bitmap = serde_json::from_str(&json).unwrap();
        proptest::prop_assert_eq!(back, b);
    }
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Pairs(#[serde(with = "super::pair_list")] Vec<u32>);

#[test]
fn outbox_pairs_in_a_stretch_are_stored_in_a_few_bytes() {
    let pairs = Pairs((4_000..4_100).chain([7, 3, 4, 5]).collect());
    let json = serde_json::to_string(&pairs).unwrap();
    assert!(json.len() < 20, "{json}");
    assert_eq!(serde_json::from_str::<Pairs>(&json).unwrap(), pairs);
    // What earlier versions stored.
    assert_eq!(
        serde_json::from_str::<Pairs>("[9,1,2]").unwrap(),
        Pairs(vec![9, 1, 2])
    );
    for bad in ["\"9\"", "\"~\\u0000\"", "\"~gA\"", "\"~AQ\"", "\"~AwE\""] {
        assert!(serde_json::from_str::<Pairs>(bad).is_err(), "{bad}");
    }
}

proptest::proptest! {
    #[test]
    fn any_outbox_pairs_round_trip(v in proptest::collection::vec(proptest::prop_oneof![0u32..50, proptest::num::u32::ANY], 0..300)) {
        let pairs = Pairs(v);
        let json = serde_json::to_string(&pairs).unwrap();
        proptest::prop_assert_eq!(serde_json::from_str::<Pairs>(&json).unwrap(), pairs);
    }
}
