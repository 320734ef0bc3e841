//! A panic inside the store engine while `vppd run` serves ends the daemon
//! with exit status 78 and the damaged-store error naming data_dir, not a
//! task that dies while the daemon limps on.
//!
//! The fault is real: sled keeps a value too large for its log in a file
//! of its own (`db/blobs/N`), read when the page is first needed after a
//! start. Under the running daemon, the blob's kind byte is changed to a
//! counter's, with its checksum made to match, so sled accepts the file
//! and then panics when it finds a counter where a tree page must be.
//! The daemon must still be serving when it panics (it is told that
//! the store is open by its "listening" line), so the panic is not the
//! one of opening, which the store turns into an error itself.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

/// sled's message kinds (vendor/sled/src/pagecache/mod.rs).
const COUNTER: u8 = 5;
const BLOB_NODE: u8 = 9;
const BLOB_LINK: u8 = 11;

/// CRC-32 (IEEE), as sled checks its blobs with.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Turns every tree page kept as a blob into a counter with a valid
/// checksum; returns how many it changed.
fn counters_for_pages(blobs: &std::path::Path) -> usize {
    let mut changed = 0;
    for entry in std::fs::read_dir(blobs).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if bytes.len() < 6 || ![BLOB_NODE, BLOB_LINK].contains(&bytes[4]) {
            continue;
        }
        assert_eq!(
            u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            crc32(&bytes[4..]),
            "blob layout not as expected: {}",
            path.display()
        );
        bytes[4] = COUNTER;
        let crc = crc32(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        changed += 1;
    }
    changed
}

fn sigterm(child: &std::process::Child) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_panic_while_running_exits_78_naming_data_dir() {
    let asset = adam(0);
    let env = Env::new(
        sim_config(vppd::apple::types::Limits::default()),
        vec![SimAsset::app(&asset, Some(100_000))],
    )
    .await;
    let data = env.dir.path().join("data");

    // A job whose spec is larger than a quarter of a log segment.
    let (config, mut child) = env.spawn_quiet().await;
    let targets = serials("big", 20_000);
    let (code, body) = post_job(&env.admin(), &job("big", &[asset], &[], &targets)).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "big", Duration::from_secs(180)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    let mut child = env
        .vppd_run(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Damaged under the running daemon once it has opened the store (sled
    // reads every blob of its log's tail while it opens, and would refuse
    // it then) and before its stages start reading jobs: the page is read
    // from disk the first time it is needed.
    let stderr = child.stderr.take().unwrap();
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening") {
                let _ = opened_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if opened.recv_timeout(Duration::from_secs(30)).is_ok() {
        let changed = counters_for_pages(&data.join("db").join("blobs"));
        assert!(changed > 0, "sled kept no page as a blob");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // Reading the job's failures reads its spec, if nothing did before.
    let _ = http
        .get(format!("{}/v1/jobs/big/failures", env.admin()))
        .send()
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            sigterm(&child);
            break child.wait().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(
        stderr.contains(&data.display().to_string()),
        "data_dir not named\n{stderr}"
    );
    assert!(stderr.contains("--accept-store-loss"), "{stderr}");
}
