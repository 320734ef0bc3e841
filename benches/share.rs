//! Sharing a token: the demo's 10,000 devices x 25 apps with the simulator
//! at a steady pace, and a one-device `"priority": "high"` job submitted
//! when half of the rollout is confirmed. Reports how long the small job
//! took and the rollout's wall time, before and after the scheduler:
//!
//! - before: every batch of the rollout leaves as fast as the rate limit
//!   allows (what vppd did when a token's jobs ran one after another; here
//!   `max_events_in_flight` = 10,000), so the small job queues at Apple
//!   behind everything already sent;
//! - after: `max_events_in_flight` = 2 (the default), high priority first.
//!
//! `VPPD_BENCH_RATE` sets Apple's pace (assignments per second, default
//! 20,000), `VPPD_BENCH_DEVICES` the rollout's devices (default 10,000).

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rate: f64 = env_or("VPPD_BENCH_RATE", 20_000.0);
    let devices: usize = env_or("VPPD_BENCH_DEVICES", 10_000);
    for (label, in_flight) in [("before", Some(10_000)), ("after", None)] {
        let mut opts = vppd::cli::demo::DemoOptions {
            devices,
            progress: false,
            urgent: true,
            max_events_in_flight: in_flight,
            ..Default::default()
        };
        opts.sim.assignments_per_second = Some(rate);
        let report = vppd::cli::demo::run(opts).await.expect("demo run");
        let urgent = report.urgent.as_ref().expect("urgent report");
        println!(
            "share {label} (max_events_in_flight {}): {} x {} at {rate} assignments/s: urgent 1-device job {} in {:.2} s (submitted at {} of {} confirmed); rollout {:.2} s wall; ok={}",
            in_flight.map_or("2 (default)".to_string(), |n| n.to_string()),
            report.devices,
            report.apps,
            urgent.job_state,
            urgent.wait.as_secs_f64(),
            urgent.submitted_at_confirmed,
            report.assignments_expected,
            report.wall.as_secs_f64(),
            report.ok()
        );
    }
}
