//! Planner benchmark: 1,000,000 devices x 25 apps (25 million pairs).
//! Streams every batch and builds every request body, and shows that the
//! planner's memory does not grow with the job (peak RSS, before and after).
//! Figures are recorded in docs/performance.md; nothing is asserted.

use std::time::Instant;

use vppd::domain::job::{JobAsset, JobSpec, Targets};
use vppd::domain::plan::{Plan, Shape};

fn spec(devices: usize, apps: usize) -> JobSpec {
    JobSpec {
        id: "bench".into(),
        token: "main".into(),
        assets: (0..apps)
            .map(|i| JobAsset {
                adam_id: (100_000_001 + i).to_string(),
                pricing_param: "STDQ".into(),
            })
            .collect(),
        disassociate: Targets::default(),
        associate: Targets {
            serial_numbers: (0..devices).map(|i| format!("SERIAL{i:010}")).collect(),
            client_user_ids: Vec::new(),
        },
        install: true,
        allow_partial: false,
        revoke: Targets::default(),
        uninstall: false,
        wait_for_licenses: false,
        users: Vec::new(),
        retire_users: Vec::new(),
        priority: Default::default(),
    }
}

fn rss_mb() -> u64 {
    vppd::cli::demo::peak_rss_mb().unwrap_or(0)
}

fn main() {
    let shape = Shape::uniform(25, 1000, 1000);
    for devices in [10_000usize, 1_000_000] {
        let s = spec(devices, 25);
        let rss_spec = rss_mb();

        // The planner alone: every batch of the job, carved one by one.
        let started = Instant::now();
        let mut plan = Plan::for_job(&s);
        let expected = plan.remaining(shape);
        let mut batches = 0u64;
        let mut pairs = 0u64;
        while let Some(b) = plan.next_batch(shape) {
            batches += 1;
            pairs += b.rect.pairs();
        }
        let plan_time = started.elapsed();
        assert_eq!(batches, expected);
        let rss_plan = rss_mb();

        // Plus what submitting needs per batch: its record (through the job's
        // state machine, as the store does it) and request body.
        let mut record = vppd::stages::admin::new_record(&s, shape);
        let started = Instant::now();
        let mut body_bytes = 0usize;
        while let Some(mut batch) = record.start_batch(shape, 0) {
            let request = vppd::stages::submit::request_for(&s, &batch);
            body_bytes += serde_json::to_vec(&request).map(|v| v.len()).unwrap_or(0);
            record.batch_sent(&mut batch, "bench", 0);
        }
        let body_time = started.elapsed();
        println!(
            "plan {devices} devices x 25 apps: {pairs} pairs, {batches} requests; planner {:.3} ms; with request bodies ({:.1} MB JSON) {:.1} ms; peak RSS {} MB with the job loaded, {} MB after planning",
            plan_time.as_secs_f64() * 1000.0,
            body_bytes as f64 / 1e6,
            body_time.as_secs_f64() * 1000.0,
            rss_spec,
            rss_plan,
        );
    }
}
