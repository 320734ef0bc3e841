//! `rust-version` in Cargo.toml is what the README and docs/dependencies.md
//! promise, and no dependency resolved for this platform needs a newer
//! Rust.

/// `1.89` and `1.89.0` compare equal.
fn version(v: &str) -> [u32; 3] {
    let mut out = [0; 3];
    for (slot, part) in out.iter_mut().zip(v.split('.')) {
        *slot = part.parse().unwrap_or(0);
    }
    out
}

#[test]
fn rust_version_covers_every_dependency_and_is_documented() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string("Cargo.toml").unwrap()).unwrap();
    let declared = manifest["package"]["rust-version"]
        .as_str()
        .expect("rust-version in Cargo.toml")
        .to_string();
    let readme = std::fs::read_to_string("README.md").unwrap();
    assert!(
        readme.contains(&format!("Rust {declared} or later")),
        "README.md"
    );
    let deps = std::fs::read_to_string("docs/dependencies.md").unwrap();
    assert!(
        deps.contains(&format!("Rust {declared} or later")),
        "docs/dependencies.md"
    );

    // The packages built here: a machine fetches only its own platform's,
    // so a metadata of every platform's would need the network.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut newer = Vec::new();
    for p in metadata["packages"].as_array().unwrap() {
        if let Some(rv) = p["rust_version"].as_str()
            && version(rv) > version(&declared)
        {
            newer.push(format!("{} {} needs {rv}", p["name"], p["version"]));
        }
    }
    assert!(
        newer.is_empty(),
        "rust-version {declared} is too old: {newer:?}"
    );
}
