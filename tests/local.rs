//! README.md's "Try it locally in three terminals", run as written: the
//! commands are read from the README's code block and run with the real
//! binary in a scratch copy of the repository layout (examples/ and an empty
//! target/). Only the ports are swapped for free ones, so that parallel test
//! runs on one machine do not collide.

#[path = "common/signal.rs"]
mod signal;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use signal::{Signal, signal};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `target/release/vppd ...` lines of the README's local recipe.
fn recipe() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = readme
        .split("## Try it locally in three terminals")
        .nth(1)
        .expect("README.md has the local recipe");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```sh block in the recipe");
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("target/release/vppd "))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Kills the process on drop, so a failing assertion leaves nothing behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(running: &mut Running) -> std::process::ExitStatus {
    signal(running.0.id(), Signal::Term);
    running.0.wait().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_readme_local_recipe_works_as_written() {
    let commands = recipe();
    let verbs: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(
        verbs,
        ["sim", "sink", "run", "submit", "status"],
        "{commands:?}"
    );

    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::create_dir_all(dir.join("examples")).unwrap();
    // `cargo build` makes target/; the recipe keeps its files there.
    std::fs::create_dir_all(dir.join("target")).unwrap();
    let ports = [
        ("127.0.0.1:8443", free_port()),
        ("127.0.0.1:8000", free_port()),
        ("127.0.0.1:8088", free_port()),
        ("127.0.0.1:9180", free_port()),
    ];
    let swap = |text: &str| {
        ports.iter().fold(text.to_string(), |t, (from, port)| {
            t.replace(from, &format!("127.0.0.1:{port}"))
        })
    };
    for file in ["local.toml", "local-job.json"] {
        let text = std::fs::read_to_string(Path::new("examples").join(file)).unwrap();
        std::fs::write(dir.join("examples").join(file), swap(&text)).unwrap();
    }
    let admin = format!("http://127.0.0.1:{}", ports[3].1);
    let vppd = |args: &[String]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vppd"));
        cmd.args(args.iter().map(|a| swap(a)))
            .current_dir(dir)
            // The recipe relies on the CLI's default admin address; the
            // port swap moves it.
            .env("VPPD_ADMIN", &admin)
            .env_remove("VPPD_ADMIN_TOKEN_FILE");
        cmd
    };

    // Terminal 1: the simulator writes the token it serves.
    let mut sim = Running(
        vppd(&commands[0])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for("vppd sim listening", Duration::from_secs(30), || {
        if let Ok(Some(status)) = sim.0.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(sim.0.stderr.as_mut().unwrap(), &mut err);
            panic!("vppd sim exited ({status}): {err}");
        }
        port_open(ports[0].1)
    });
    assert!(
        dir.join("target/local.vpptoken").is_file(),
        "vppd sim --token-file did not write the token it serves"
    );

    // Terminal 2: the stand-in MDM.
    let mut sink = Running(
        vppd(&commands[1])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("vppd sink listening", Duration::from_secs(30), || {
        port_open(ports[1].1)
    });

    // Terminal 3: the daemon.
    let mut daemon = Running(
        vppd(&commands[2])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("vppd run ready", Duration::from_secs(60), || ready(&admin));

    let out = vppd(&commands[3]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "local-trial");
    let out = vppd(&commands[4]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["assignments"]["confirmed"], 12, "{doc}");
    assert_eq!(doc["installs"]["released"], 12, "{doc}");

    assert!(terminate(&mut daemon).success());
    assert!(terminate(&mut sink).success());
    let lines: Vec<String> = BufReader::new(sink.0.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert_eq!(lines.len(), 12, "{lines:#?}");
    for line in &lines {
        assert!(
            line.starts_with("InstallApplication adamId=10000000")
                && line.contains("serialNumber=LOCAL000")
                && line.contains("jobId=local-trial"),
            "{line}"
        );
    }
    assert!(terminate(&mut sim).success());
}

/// `GET /readyz` answered 200, without an async runtime.
fn ready(admin: &str) -> bool {
    use std::io::{Read, Write};
    let Some(hostport) = admin.strip_prefix("http://") else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect(hostport) else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
