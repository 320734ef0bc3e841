//! A damaged store is refused, not run on: the real `vppd run` binary on a
//! store that was truncated, deleted or overwritten with random bytes exits
//! non-zero (78, which the systemd unit does not restart) with an error that
//! names data_dir and says how to restore or accept the loss; with
//! `--accept-store-loss` it starts on what is left.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

/// A store with two finished jobs, left by a clean SIGTERM (which writes the
/// marker).
async fn used_store() -> (Env, std::path::PathBuf) {
    let assets: Vec<String> = (0..2).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    let (config, mut child) = env.spawn_quiet().await;
    for id in ["one", "two"] {
        let (code, _) = post_job(&env.admin(), &job(id, &assets, &[], &serials(id, 30))).await;
        assert_eq!(code, 202);
        let s = wait_job(&env.admin(), id, Duration::from_secs(60)).await;
        assert_eq!(s.state, JobState::Completed, "{s:?}");
    }
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
    (env, config)
}

/// Runs `vppd run` to its end (it is expected to refuse to start).
fn refused(env: &Env, config: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = env.vppd_run(config);
    cmd.args(extra);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that did start is stopped, and the test fails below.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = common::signal::send(child.id(), Signal::Term);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(env: &Env, config: &std::path::Path, what: &str) {
    let (code, stderr) = refused(env, config, &[]);
    let data = env.dir.path().join("data");
    assert_eq!(code, Some(78), "{what}: exit {code:?}\n{stderr}");
    assert!(
        stderr.contains(&data.display().to_string()),
        "{what}: data_dir not named\n{stderr}"
    );
    assert!(
        stderr.contains("--accept-store-loss") && stderr.contains("operator-guide.md"),
        "{what}: no way out named\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{what}: a raw panic\n{stderr}"
    );
}

fn db_files(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![data.join("db")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_store_is_refused_until_the_loss_is_accepted() {
    let (env, config) = used_store().await;
    let data = env.dir.path().join("data");
    std::fs::remove_dir_all(data.join("db")).unwrap();
    assert_refused(&env, &config, "deleted store");
    assert!(!data.join("db").exists(), "an empty store was created");

    // Accepted: it starts on an empty store, and the next start is normal.
    let mut child = env
        .vppd_run(&config)
        .arg("--accept-store-loss")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&env.admin()).await;
    assert!(job_status(&env.admin(), "one").await.is_none());
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_store_is_refused() {
    let (env, config) = used_store().await;
    let data = env.dir.path().join("data");
    for file in db_files(&data) {
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
    }
    assert_refused(&env, &config, "truncated store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bytes_in_the_store_are_refused_without_a_crash() {
    let (env, config) = used_store().await;
    let data = env.dir.path().join("data");
    // Deterministic "random" bytes at several offsets of every file.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for file in db_files(&data) {
        let len = std::fs::metadata(&file).unwrap().len();
        if len == 0 {
            continue;
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        for _ in 0..10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.seek(SeekFrom::Start(x % len)).unwrap();
            f.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    // Bytes that land where nothing lives change nothing: then vppd starts
    // with both jobs intact. Anything else is refused with the clear error.
    let mut child = env
        .vppd_run(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The listeners are bound before vppd opens its store: a request
    // waits in their backlog until it serves, so each try is bounded.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(status.code(), Some(78), "{stderr}");
            assert!(stderr.contains(&data.display().to_string()), "{stderr}");
            assert!(stderr.contains("--accept-store-loss"), "{stderr}");
            return;
        }
        if let Ok(r) = http.get(format!("{}/readyz", env.admin())).send().await
            && r.status().is_success()
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "neither ready nor refused\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in ["one", "two"] {
        let s = job_status(&env.admin(), id).await;
        assert!(
            s.as_ref().is_some_and(|s| s.state == JobState::Completed),
            "started on a store that lost job {id}: {s:?}"
        );
    }
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}

/// A store created by `vppd run` is said, naming data_dir: a store that
/// went missing never starts silently empty. A start on it later says
/// nothing of the kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_store_is_said_naming_data_dir() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let config = env.dir.path().join("vppd.toml");
    std::fs::write(&config, env.config_text(&FAST_TRACKING, "")).unwrap();
    let data = env.dir.path().join("data");
    let mut logs = Vec::new();
    for n in 0..2 {
        let log = env.dir.path().join(format!("vppd-{n}.log"));
        let mut child = env
            .vppd_run(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_ready(&env.admin()).await;
        signal(child.id(), Signal::Term);
        assert!(child.wait().unwrap().success());
        logs.push(std::fs::read_to_string(&log).unwrap());
    }
    let said = |log: &str| {
        log.lines().any(|l| {
            l.contains("creating a new, empty one") && l.contains(&*data.to_string_lossy())
        })
    };
    assert!(said(&logs[0]), "{}", logs[0]);
    assert!(!said(&logs[1]), "{}", logs[1]);
}
