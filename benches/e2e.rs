//! End to end: the demo's 10,000 devices x 25 apps against the simulator at
//! the demo's pace (`vppd::cli::demo::APPLE_PACE`), in one process. Prints wall time, peak RSS and the
//! confirmation-to-release latency.

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::var("VPPD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for run in 0..runs {
        let opts = vppd::cli::demo::DemoOptions {
            progress: false,
            ..Default::default()
        };
        let report = vppd::cli::demo::run(opts).await.expect("demo run");
        println!(
            "e2e run {run}: {} x {} in {:.2} s wall, peak RSS {} MB, {} requests (minimum {}), {} notifications, release latency p50 {:.1} ms p99 {:.1} ms, ok={}",
            report.devices,
            report.apps,
            report.wall.as_secs_f64(),
            report.peak_rss_mb.unwrap_or(0),
            report.requests_made,
            report.requests_minimum,
            report.notifications_received,
            report.release_latency_p50.unwrap_or(0.0) * 1000.0,
            report.release_latency_p99.unwrap_or(0.0) * 1000.0,
            report.ok()
        );
    }
}
