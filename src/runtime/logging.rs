//! Log output for the binary: `tracing` to stderr, plain or JSON.
//!
//! Plain lines are coloured only when stderr is a terminal: journald, a
//! file or a pipe would otherwise store the escape codes. When stderr is
//! journald's own stream (systemd says so in `JOURNAL_STREAM`), plain lines
//! also carry no timestamp, since journald stamps every line itself.

use std::io::IsTerminal;

use crate::runtime::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` overrides `default_level`.
/// A second call (tests) leaves the first in place.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match (format, stderr_is_journal()) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Plain, true) => builder.without_time().try_init(),
        (LogFormat::Plain, false) => builder.try_init(),
    };
}

/// True when stderr is the journal stream systemd connected: the
/// `JOURNAL_STREAM` variable holds that stream's `device:inode`, and it only
/// counts when stderr still is that stream (a child whose stderr was
/// redirected inherits the variable too).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    stderr_identity().is_some_and(|(d, i)| d == dev && i == ino)
}

#[cfg(unix)]
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn stderr_identity() -> Option<(u64, u64)> {
    None
}
